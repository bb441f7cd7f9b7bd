"""The ``k`` most likely next tokens of a batch of logits rows, with their softmax probabilities.

The recycle table records them at every verify step and the draft head proposes them: the
native op ``top_k_probs`` (``csrc/top_k_probs_cpu.cpp``, about the cost of a logsumexp) where it
is built, ``torch.topk`` + ``logsumexp`` otherwise. The fuzz suite holds the op to that fallback
and to a float64 softmax. Among equal logits the two may order columns differently; only
draft choices depend on it.
"""

from __future__ import annotations

import torch

from tree_attn_backend.ops.native import native_op

NATIVE_MAX_K = 64  # the native op's largest k


def top_k_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[N, k]`` probabilities ``softmax(logits[n])`` of each row's ``k`` largest logits,
    largest first, and int64 ``[N, k]`` their columns.

    ``logits``: float32 ``[N, V]`` on the CPU, each row contiguous (a column slice of a wider
    tensor is fine); ``1 <= k <= V``.
    """
    if logits.dim() != 2 or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k = {k} for logits {tuple(logits.shape)}: need 2-D logits and 1 <= k <= columns")
    op = native_op("top_k_probs") if k <= NATIVE_MAX_K else None
    if op is not None:
        probs, columns = op(logits, k)
        return probs, columns
    top_logits, columns = torch.topk(logits, k, dim=-1)
    return torch.exp(top_logits - torch.logsumexp(logits, dim=-1, keepdim=True)), columns

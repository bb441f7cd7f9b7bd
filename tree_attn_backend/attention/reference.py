"""The dense reference: slow, float64, obviously correct. Shares no code with the builder.

Every fast attention path is fuzzed against :func:`reference_tree_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def reference_tree_mask(parents: Sequence[int], context_len: int) -> torch.Tensor:
    """bool ``[T, context_len + T]``: node ``i`` sees the whole context, its ancestors and
    itself. Walks the parent pointers node by node."""
    t = len(parents)
    mask = torch.zeros(t, context_len + t, dtype=torch.bool)
    mask[:, :context_len] = True
    for i in range(t):
        node = i
        while node != -1:
            mask[i, context_len + node] = True
            node = int(parents[node])
    return mask


def reference_depths(parents: Sequence[int]) -> list[int]:
    """Number of ancestors of every node, by walking parent pointers."""
    out = []
    for i in range(len(parents)):
        depth, node = 0, int(parents[i])
        while node != -1:
            depth, node = depth + 1, int(parents[node])
        out.append(depth)
    return out


@dataclass
class ReferenceRequest:
    """One request for the reference, in dense form.

    query ``[T, Hq, D]``; context_key/context_value ``[C, Hkv, D]``; new_key/new_value
    ``[T, Hkv, D]``; parents: ``T`` local parent indices (``-1`` for the root).
    """

    query: torch.Tensor
    context_key: torch.Tensor
    context_value: torch.Tensor
    new_key: torch.Tensor
    new_value: torch.Tensor
    parents: Sequence[int]


def reference_tree_attention(requests: Sequence[ReferenceRequest], scale: float) -> torch.Tensor:
    """Masked softmax attention in float64, request by request; GQA by repeating KV heads.

    Returns float64 ``[sum T, Hq, D]`` in request order.
    """
    outputs = []
    for req in requests:
        q = req.query.double()
        k = torch.cat([req.context_key, req.new_key]).double()
        v = torch.cat([req.context_value, req.new_value]).double()
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,khd->htk", q, k) * scale
        mask = reference_tree_mask(req.parents, req.context_key.shape[0]).to(scores.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        outputs.append(torch.einsum("htk,khd->thd", torch.softmax(scores, dim=-1), v))
    return torch.cat(outputs) if outputs else torch.zeros(0)

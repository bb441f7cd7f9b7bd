"""The cascade formulation of tree attention, in torch: what the GPU path runs.

1. every new token attends the committed context (paged cache, no mask) -> ``(o1, lse1)``;
2. every new token attends its request's new tokens with the small ``[q, q]`` ancestor mask
   (straight from this step's K/V, no cache) -> ``(o2, lse2)``;
3. the two partial softmaxes are merged by their log-sum-exp.

Exact: the context columns of a tree row are all visible, so splitting the key set in two
and merging is the same softmax. Here it is written with explicit float32 math so that the
LSE is available on CPU; padding is per batch (this is a correctness path, not a fast one).
"""

from __future__ import annotations

import numpy as np
import torch

from metadata import TreeAttentionMetadata
from tree_attn_backend.attention.kv_layout import CPU_LAYOUT
from tree_attn_backend.ragged import segment_arange, segment_ids, segment_local


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention returning the natural-log LSE.

    q ``[B, Hq, Q, D]``, k/v ``[B, Hkv, K, D]``, mask bool ``[B, Q, K]``. Returns float32
    ``o [B, Hq, Q, D]`` and ``lse [B, Hq, Q]`` (``-inf`` and ``o = 0`` for a row that sees nothing).
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.matmul(probs, v), lse


def merge_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets (natural-log LSE, ``[..., Q]``)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)[..., None]
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)[..., None]
    return o1 * w1 + o2 * w2, lse


def cascade_attention(
    meta: TreeAttentionMetadata,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Tree attention as prefix pass + tree pass + merge.

    Args:
        query ``[N, Hq, D]``; key/value ``[N, Hkv, D]``: this step's new tokens.
        kv_cache: one layer's paged cache holding at least the committed context.
    Returns ``[N, Hq, D]`` in ``query.dtype``.
    """
    n, hq, d = query.shape
    qo = meta.qo_indptr.numpy().astype(np.int64)
    q_lens = np.diff(qo)
    b, qmax = meta.num_reqs, int(q_lens.max())
    valid = np.arange(qmax)[None, :] < q_lens[:, None]
    index = torch.from_numpy(np.where(valid, qo[:-1, None] + np.arange(qmax)[None, :], 0))
    valid_t = torch.from_numpy(valid)
    pad = lambda x: x[index].transpose(1, 2)  # noqa: E731  [B, H, Qmax, D]

    # Prefix pass: the committed context, all of it visible to every new token.
    ctx = meta.context_lens.numpy().astype(np.int64)
    pre_indptr = meta.prefix_kv_indptr.numpy().astype(np.int64)
    pages = np.diff(pre_indptr)
    pmax = max(int(pages.max()), 1)
    block_ids = np.zeros((b, pmax), dtype=np.int64)
    block_ids[np.arange(pmax)[None, :] < pages[:, None]] = meta.prefix_kv_indices.numpy()[
        segment_arange(pre_indptr[:-1], pages)
    ]
    k1, v1 = CPU_LAYOUT.read_blocks(kv_cache, torch.from_numpy(block_ids))
    width = k1.shape[2]
    prefix_mask = torch.from_numpy(np.arange(width)[None, :] < ctx[:, None])[:, None, :].expand(b, qmax, width)
    o1, lse1 = attend_with_lse(pad(query), k1, v1, prefix_mask, scale)

    # Tree pass: the step's own K/V with the [q, q] ancestor mask.
    tree_mask = np.zeros((b, qmax, qmax), dtype=bool)
    elems = q_lens * q_lens
    which, within = segment_ids(elems), segment_local(elems)
    tree_mask[which, within // q_lens[which], within % q_lens[which]] = meta.tree_mask.numpy()
    o2, lse2 = attend_with_lse(pad(query), pad(key), pad(value), torch.from_numpy(tree_mask), scale)

    o, _ = merge_states(o1, lse1, o2, lse2)
    return o.transpose(1, 2)[valid_t].to(query.dtype)

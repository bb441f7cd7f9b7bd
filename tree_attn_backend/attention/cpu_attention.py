"""The CPU attention path: ragged trees, prefill chunks and decodes over vLLM's paged cache.

``plan()`` runs once per step on the host (shared by all layers, like FlashInfer's), ``run()``
once per layer:

* when no request is a long linear chunk and the native op ``tree_paged_attention``
  (``csrc/tree_attention_cpu.cpp``) is built, it runs the whole step: online softmax over the
  paged cache, every K/V block read once per (request, KV head) for all of the request's tokens,
  scores and probabilities x V as register-tiled products, the new tokens' columns masked by
  ancestor bitsets; no gathers;
* otherwise requests with a tree, or with at most ``short_query_max`` new tokens, are padded into
  groups and run as one grouped-query masked attention per group (context + tree
  ancestors), in float32, reading K in its stored transposed layout (no transpose copy, no
  KV head repetition); groups are formed in order of KV length and capped in size, so
  padding stays small;
* long linear chunks (prefill) run one SDPA call each with an offset-causal mask.

The new tokens' K/V must already be in the cache (vLLM calls ``do_kv_cache_update`` first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from metadata import TreeAttentionMetadata
from metadata.masks import ancestor_bits
from tree_attn_backend.attention.kv_layout import CPU_LAYOUT
from tree_attn_backend.ops.native import native_op
from tree_attn_backend.ragged import indptr, segment_arange


@dataclass
class PaddedGroup:
    """Requests attended together by one masked SDPA call.

    token_index: int64 ``[G, Qmax]`` rows of the step's query (0 where padded);
    valid: bool ``[G, Qmax]``; block_ids: int64 ``[G, P]`` (0 where padded);
    mask: bool ``[G, 1, Qmax, W]``, ``W`` = the group's longest KV length (keys beyond
    it are gathered with their pages but never scored).
    """

    token_index: torch.Tensor
    valid: torch.Tensor
    block_ids: torch.Tensor
    mask: torch.Tensor


@dataclass
class CausalChunk:
    """One long linear chunk: tokens ``start:end`` after ``context_len`` cached tokens."""

    start: int
    end: int
    block_ids: torch.Tensor
    mask: torch.Tensor  # bool [q, P * block_size]


@dataclass
class CpuAttentionPlan:
    """Either ``native`` (int32 qo_indptr, context_lens, parents, paged_kv_indptr,
    paged_kv_indices for ``tree_paged_attention``) or ``groups`` + ``chunks``."""

    groups: list[PaddedGroup]
    chunks: list[CausalChunk]
    num_tokens: int
    native: tuple[torch.Tensor, ...] | None = None


def _padded_group(meta: TreeAttentionMetadata, reqs: np.ndarray) -> PaddedGroup:
    qo = meta.qo_indptr.numpy().astype(np.int64)
    q = np.diff(qo)[reqs]
    ctx = meta.context_lens.numpy().astype(np.int64)[reqs]
    pages_indptr = meta.paged_kv_indptr.numpy().astype(np.int64)
    pages = np.diff(pages_indptr)[reqs]
    g, qmax, pmax = len(reqs), int(q.max()), int(pages.max())
    width = int((ctx + q).max())  # keys past the longest request are never needed

    valid = np.arange(qmax)[None, :] < q[:, None]
    token_index = np.where(valid, qo[reqs][:, None] + np.arange(qmax)[None, :], 0)
    page_valid = np.arange(pmax)[None, :] < pages[:, None]
    block_ids = np.zeros((g, pmax), dtype=np.int64)
    block_ids[page_valid] = meta.paged_kv_indices.numpy()[segment_arange(pages_indptr[reqs], pages)]

    # Tree part: ancestor bitsets of this group's tokens, scattered after each context.
    tokens = segment_arange(qo[reqs], q)
    bits = ancestor_bits(meta.parents.numpy()[tokens], indptr(q))
    dense = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :qmax].astype(bool)
    rows = np.zeros((g, qmax, qmax), dtype=bool)
    rows[valid] = dense
    mask = np.zeros((g, qmax, width + qmax), dtype=bool)
    mask[:, :, :width] = np.arange(width)[None, None, :] < ctx[:, None, None]
    mask[:, :, :width] &= valid[:, :, None]
    cols = ctx[:, None, None] + np.arange(qmax)[None, None, :]
    np.put_along_axis(mask, np.broadcast_to(cols, rows.shape), rows, axis=2)
    return PaddedGroup(
        token_index=torch.from_numpy(token_index),
        valid=torch.from_numpy(valid),
        block_ids=torch.from_numpy(block_ids),
        mask=torch.from_numpy(np.ascontiguousarray(mask[:, None, :, :width])),
    )


def plan_cpu_attention(
    meta: TreeAttentionMetadata, short_query_max: int = 128, max_group_keys: int = 1 << 16, use_native: bool = True
) -> CpuAttentionPlan:
    """Plan the step (host side, once per step): the native op when it is built, allowed and
    no request is a long chain; else padded groups and long causal chunks.

    ``max_group_keys`` caps ``G * P * block_size`` of a group (memory of the gathered K/V).
    """
    q = meta.query_lens.numpy().astype(np.int64)
    kv = meta.kv_lens.numpy().astype(np.int64)
    is_chain = meta.is_chain.numpy()
    long_chain = is_chain & (q > short_query_max)
    if use_native and not long_chain.any() and native_op("tree_paged_attention") is not None:
        native = tuple(
            t.to(torch.int32).contiguous()
            for t in (meta.qo_indptr, meta.context_lens, meta.parents, meta.paged_kv_indptr, meta.paged_kv_indices)
        )
        return CpuAttentionPlan(groups=[], chunks=[], num_tokens=meta.num_tokens, native=native)
    short = np.flatnonzero(~long_chain)
    short = short[np.argsort(kv[short], kind="stable")]
    groups: list[PaddedGroup] = []
    bs = meta.block_size
    start = 0
    while start < len(short):
        end = start + 1
        # kv is sorted ascending, so the last member sets the padded width.
        while end < len(short) and (end + 1 - start) * -(-kv[short[end]] // bs) * bs <= max_group_keys:
            end += 1
        groups.append(_padded_group(meta, short[start:end]))
        start = end

    chunks = []
    qo = meta.qo_indptr.numpy()
    pages_indptr = meta.paged_kv_indptr.numpy()
    ctx = meta.context_lens.numpy()
    for b in np.flatnonzero(long_chain).tolist():
        block_ids = meta.paged_kv_indices[pages_indptr[b] : pages_indptr[b + 1]].to(torch.int64)
        width = block_ids.shape[0] * bs
        mask = torch.arange(width)[None, :] <= int(ctx[b]) + torch.arange(int(q[b]))[:, None]
        chunks.append(CausalChunk(start=int(qo[b]), end=int(qo[b + 1]), block_ids=block_ids, mask=mask))
    return CpuAttentionPlan(groups=groups, chunks=chunks, num_tokens=meta.num_tokens)


def _grouped_masked_attention(
    q: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q ``[G, Q, Hq, D]``, key_t ``[G, Hkv, D, L]``, value ``[G, Hkv, L, D]``, mask bool
    ``[G, 1, Q, L]`` -> ``[G, Q, Hq, D]`` float32. Query heads sharing a KV head are stacked
    into one matmul (GQA without repeating K/V). A row that sees nothing yields NaN; only
    padding rows do, and they are dropped."""
    g, nq, hq, d = q.shape
    hkv = key_t.shape[1]
    group = hq // hkv
    qg = q.float().view(g, nq, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(g, hkv, group * nq, d)
    scores = torch.matmul(qg, key_t.float()).mul_(scale).view(g, hkv, group, nq, -1)
    scores.masked_fill_(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(g, hkv, group * nq, -1)
    o = torch.matmul(probs, value.float()).view(g, hkv, group, nq, d)
    return o.permute(0, 3, 1, 2, 4).reshape(g, nq, hq, d)


def run_cpu_attention(
    plan: CpuAttentionPlan,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention for one layer.

    Args:
        query: ``[N, Hq, D]`` (RoPE applied with the tree positions).
        kv_cache: one layer's cache (see :data:`~tree_attn_backend.attention.kv_layout.CPU_LAYOUT`), already holding
            this step's K/V; ``Hq`` must be a multiple of its ``num_kv_heads``.
        out: optional ``[N, Hq, D]`` to write into.
    Returns ``[N, Hq, D]`` in ``query.dtype``.
    """
    if query.shape[0] != plan.num_tokens:
        raise ValueError(f"query has {query.shape[0]} tokens, the plan has {plan.num_tokens}")
    if query.shape[1] % kv_cache.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {kv_cache.shape[1]} KV heads")
    if out is None:
        out = torch.empty_like(query)
    if plan.native is not None:
        # The op computes in the cache's dtype into a contiguous buffer: ``out`` itself if it is one.
        q = query.to(kv_cache.dtype).contiguous()
        result = out if out.is_contiguous() and out.dtype == kv_cache.dtype else torch.empty_like(q)
        op = native_op("tree_paged_attention")
        if op is None:  # the plan only chooses the native path when the op is built
            raise RuntimeError("the plan uses tree_paged_attention, which is not built")
        op(q, kv_cache, *plan.native, scale, result)
        if result is not out:
            out.copy_(result)
        return out
    for group in plan.groups:
        key_t, value = CPU_LAYOUT.read_blocks_for_scores(kv_cache, group.block_ids)
        width = group.mask.shape[-1]
        out[group.token_index[group.valid]] = _grouped_masked_attention(
            query[group.token_index], key_t[..., :width], value[:, :, :width], group.mask, scale
        )[group.valid].to(out.dtype)
    for chunk in plan.chunks:
        q = query[chunk.start : chunk.end].transpose(0, 1)[None]  # [1, Hq, q, D]
        k, v = CPU_LAYOUT.read_blocks(kv_cache, chunk.block_ids[None])
        o = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=chunk.mask, scale=scale, enable_gqa=True
        )
        out[chunk.start : chunk.end] = o[0].transpose(0, 1)
    return out

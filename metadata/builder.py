"""The metadata builder: a :class:`StepBatch` in, a :class:`TreeAttentionMetadata` out.

Pure and deterministic. The per-token layout runs in the native ``tree_token_layout`` op when
it is built, else in numpy, vectorized over the batch (no Python loop over requests, nodes or
tokens); both give identical results (fuzzed).
"""

from __future__ import annotations

import numpy as np
import torch

from tree_attn_backend.ops.native import native_op
from tree_attn_backend.ragged import depths_from_parents, indptr, segment_ids

from .batch import StepBatch
from .tree_metadata import MaskWorkspace, TreeAttentionMetadata


def _pages(block_table: np.ndarray, num_tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, ...]:
    """FlashInfer paged layout of the first ``num_tokens[b]`` tokens of every request:
    ``(indptr [B+1], indices [pages], last_page_len [B])``; ``last_page_len`` is 0 for none."""
    num_pages = -(-num_tokens // block_size)
    used = np.arange(block_table.shape[1])[None, :] < num_pages[:, None]
    indices = block_table[used]  # row-major: request by request, pages in order
    last = np.where(num_pages > 0, num_tokens - (num_pages - 1) * block_size, 0)
    return indptr(num_pages), indices, last


_INT32_MAX = 2**31 - 1


def _i32(array: np.ndarray) -> torch.Tensor:
    """int32 tensor of values already known to fit (see the range check in the builder)."""
    return torch.from_numpy(array.astype(np.int32))


def token_layout_numpy(batch: StepBatch, qo_indptr: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(depths int32, positions int64, slot_mapping int64 [N], is_chain bool [B])`` followed
    by the paged layout (indptr, indices, last page length; int32) of the whole KV and of the
    context alone: the fallback and oracle of the native ``tree_token_layout`` op."""
    q, ctx = batch.query_lens, batch.context_lens
    req_of_token = segment_ids(q)
    local = np.arange(int(qo_indptr[-1])) - qo_indptr[:-1][req_of_token]
    parents = batch.parents
    depths = depths_from_parents(np.where(parents < 0, -1, parents + qo_indptr[:-1][req_of_token]))
    positions = ctx[req_of_token] + depths
    linear = ctx[req_of_token] + local
    block_ids = batch.block_table[req_of_token, linear // batch.block_size]
    slot_mapping = block_ids * batch.block_size + linear % batch.block_size
    # A request is a chain iff no token's parent differs from the token before it.
    off_chain = (parents != local - 1).astype(np.int64)
    is_chain = np.bincount(req_of_token, weights=off_chain, minlength=batch.num_reqs) == 0
    return (
        depths.astype(np.int32),
        positions.astype(np.int64),
        slot_mapping.astype(np.int64),
        is_chain,
        *(a.astype(np.int32) for a in _pages(batch.block_table, ctx + q, batch.block_size)),
        *(a.astype(np.int32) for a in _pages(batch.block_table, ctx, batch.block_size)),
    )


def build_tree_attention_metadata(batch: StepBatch, workspace: MaskWorkspace | None = None) -> TreeAttentionMetadata:
    """Build one step's metadata (see :class:`TreeAttentionMetadata` for every field).

    Pass the same ``workspace`` step after step to reuse the mask buffers."""
    q = batch.query_lens
    ctx = batch.context_lens
    kv = ctx + q
    if (
        int(kv.max()) * int(q.max()) > _INT32_MAX
        or int(batch.block_table.max(initial=0)) * batch.block_size > _INT32_MAX
    ):
        raise ValueError("batch too large for FlashInfer's int32 indices (context x tree size or block ids)")
    qo_indptr = indptr(q)
    n = int(qo_indptr[-1])
    op = native_op("tree_token_layout")
    if op is not None:
        layout = tuple(
            t.numpy()
            for t in op(
                torch.from_numpy(batch.parents),
                torch.from_numpy(qo_indptr),
                torch.from_numpy(ctx),
                torch.from_numpy(batch.block_table),
                batch.block_size,
            )
        )
    else:
        layout = token_layout_numpy(batch, qo_indptr)
    depths, positions, slot_mapping, is_chain, *pages = layout
    kv_indptr, kv_indices, kv_last, pre_indptr, pre_indices, pre_last = (torch.from_numpy(a) for a in pages)

    return TreeAttentionMetadata(
        num_reqs=batch.num_reqs,
        num_tokens=n,
        block_size=batch.block_size,
        qo_indptr=_i32(qo_indptr),
        context_lens=_i32(ctx),
        kv_lens=_i32(kv),
        parents=torch.from_numpy(batch.parents),
        depths=torch.from_numpy(depths),
        positions=torch.from_numpy(positions),
        slot_mapping=torch.from_numpy(slot_mapping),
        is_chain=torch.from_numpy(is_chain),
        paged_kv_indptr=kv_indptr,
        paged_kv_indices=kv_indices,
        paged_kv_last_page_len=kv_last,
        prefix_kv_indptr=pre_indptr,
        prefix_kv_indices=pre_indices,
        prefix_kv_last_page_len=pre_last,
        workspace=workspace,
    )

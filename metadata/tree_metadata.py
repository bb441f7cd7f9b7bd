"""``TreeAttentionMetadata``: everything the attention kernels need for one step.

Built once per step by :func:`metadata.builder.build_tree_attention_metadata` and shared by
every layer. Cheap ``O(tokens + pages)`` fields are computed eagerly; the masks, whose size
grows with context x tree size, are computed on first access and cached, so each attention
path pays only for the layout it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from tree_attn_backend.ops.native import native_op
from tree_attn_backend.ragged import gather_segments, segment_local

from .masks import ancestor_bits, pack_segments, row_columns, unpack_rows


class MaskWorkspace:
    """Reusable output buffers for the masks, owned by whoever builds metadata step after
    step (as FlashInfer's wrappers own theirs). Masks of several MB then land in pages that
    are already mapped instead of fresh ones. Metadata built with a workspace aliases it: its
    masks are valid until the next build that uses the same workspace."""

    def __init__(self) -> None:
        self.packed = torch.empty(0, dtype=torch.uint8)
        self.tree = torch.empty(0, dtype=torch.bool)

    def reserve(self, packed_bytes: int, tree_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grow (by at least 1.5x) to hold the given sizes; returns the buffers."""
        if self.packed.numel() < packed_bytes:
            self.packed = torch.empty(max(packed_bytes, self.packed.numel() * 3 // 2), dtype=torch.uint8)
        if self.tree.numel() < tree_elements:
            self.tree = torch.empty(max(tree_elements, self.tree.numel() * 3 // 2), dtype=torch.bool)
        return self.packed, self.tree


@dataclass(eq=False)
class TreeAttentionMetadata:
    """Kernel-ready layout of one step (all tensors on CPU; move what a kernel needs).

    Token order is the batch's query order: request ``b`` owns tokens
    ``qo_indptr[b]:qo_indptr[b+1]``, in node order for trees.

    Attributes:
        num_reqs, num_tokens: batch size and ``N = qo_indptr[-1]``.
        block_size: tokens per KV cache page.
        qo_indptr: int32 ``[B+1]``.
        context_lens: int32 ``[B]``, committed tokens before this step (the cascade prefix).
        kv_lens: int32 ``[B]``, ``context_lens + query_lens``.
        parents: int32 ``[N]``, request-local parent (``-1`` at a root).
        depths: int32 ``[N]``, depth in the request's tree (``i`` for a linear chunk).
        positions: int64 ``[N]``, ``context_lens[b] + depths`` (RoPE positions).
        slot_mapping: int64 ``[N]``, cache slot of each new token: linear position
            ``context_lens[b] + i`` mapped through the block table.
        is_chain: bool ``[B]``, the request's tokens form a chain (prefill chunk, decode, or a
            chain draft); its mask is plain causal.
        paged_kv_indptr: int32 ``[B+1]``, paged_kv_indices: int32 ``[pages]``,
        paged_kv_last_page_len: int32 ``[B]``: FlashInfer's paged layout of the whole
            ``kv_lens`` (context and new tokens).
        prefix_kv_indptr, prefix_kv_indices, prefix_kv_last_page_len: the same for the
            context alone (cascade prefix pass); a request with no context has no pages and
            ``last_page_len`` 0.
        workspace: optional reusable mask buffers (see :class:`MaskWorkspace`).
    Lazily computed masks: :attr:`custom_mask`, :attr:`packed_custom_mask` +
    :attr:`mask_indptr`, :attr:`tree_mask` + :attr:`tree_mask_indptr`.
    """

    num_reqs: int
    num_tokens: int
    block_size: int
    qo_indptr: torch.Tensor
    context_lens: torch.Tensor
    kv_lens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    is_chain: torch.Tensor
    paged_kv_indptr: torch.Tensor
    paged_kv_indices: torch.Tensor
    paged_kv_last_page_len: torch.Tensor
    prefix_kv_indptr: torch.Tensor
    prefix_kv_indices: torch.Tensor
    prefix_kv_last_page_len: torch.Tensor
    workspace: MaskWorkspace | None = None

    @property
    def query_lens(self) -> torch.Tensor:
        """int32 ``[B]``."""
        return self.qo_indptr[1:] - self.qo_indptr[:-1]

    @property
    def max_query_len(self) -> int:
        return int(self.query_lens.max()) if self.num_reqs else 0

    @cached_property
    def _native_masks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(packed, byte_indptr, tree_mask)`` from the native op, or ``None`` without it."""
        op = native_op("build_tree_masks")
        if op is None:
            return None
        qo = self.qo_indptr.numpy().astype(np.int64)
        ctx = self.context_lens.numpy().astype(np.int64)
        buffers: tuple = (None, None)
        if self.workspace is not None:
            q = np.diff(qo)
            buffers = self.workspace.reserve(int(((q * (ctx + q) + 7) // 8).sum()), int((q * q).sum()))
        packed, byte_indptr, tree_mask = op(self.parents, torch.from_numpy(qo), torch.from_numpy(ctx), *buffers)
        return packed, byte_indptr.to(torch.int32), tree_mask

    @cached_property
    def tree_mask(self) -> torch.Tensor:
        """bool ``[sum q_b^2]``: per request the ``[q, q]`` ancestor-or-self mask over its new
        tokens (row = query, column = key), row-major, concatenated (cascade tree pass)."""
        if self._native_masks is not None:
            return self._native_masks[2]
        return torch.from_numpy(self._numpy_tree_mask())

    def _numpy_tree_mask(self) -> np.ndarray:
        qo = self.qo_indptr.numpy().astype(np.int64)
        return unpack_rows(ancestor_bits(self.parents.numpy(), qo), qo)

    @cached_property
    def tree_mask_indptr(self) -> torch.Tensor:
        """int64 ``[B+1]`` element offsets of each request in :attr:`tree_mask`."""
        q = self.query_lens.to(torch.int64)
        return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(q * q, 0)])

    @cached_property
    def mask_bit_indptr(self) -> torch.Tensor:
        """int64 ``[B+1]`` element offsets of each request in :attr:`custom_mask`
        (``q_b * kv_b`` each)."""
        sizes = self.query_lens.to(torch.int64) * self.kv_lens.to(torch.int64)
        return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])

    @cached_property
    def custom_mask(self) -> torch.Tensor:
        """bool ``[sum q_b * kv_b]``: FlashInfer's flattened custom mask. Row ``i`` of request
        ``b`` is ``kv_b`` entries: the whole context (True), then its tree ancestors."""
        q = self.query_lens.numpy().astype(np.int64)
        ctx = self.context_lens.numpy().astype(np.int64)
        kv = ctx + q
        out = np.ones(int(self.mask_bit_indptr[-1]), dtype=bool)
        keep = row_columns(self.qo_indptr.numpy().astype(np.int64))
        columns = np.broadcast_to(np.arange(keep.shape[1]), keep.shape)[keep]
        local = segment_local(q)
        row_start = np.repeat(self.mask_bit_indptr.numpy()[:-1], q) + local * np.repeat(kv, q) + np.repeat(ctx, q)
        out[np.repeat(row_start, np.repeat(q, q)) + columns] = self.tree_mask.numpy()
        return torch.from_numpy(out)

    @cached_property
    def _packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._native_masks is not None:
            return self._native_masks[0], self._native_masks[1]
        packed, indptr = pack_segments(self.custom_mask.numpy(), self.mask_bit_indptr.numpy())
        return torch.from_numpy(packed), torch.from_numpy(indptr.astype(np.int32))

    @property
    def packed_custom_mask(self) -> torch.Tensor:
        """uint8 ``[bytes]``: :attr:`custom_mask` bit-packed little-endian per request, each
        request padded to a byte boundary (``np.packbits(..., bitorder="little")``)."""
        return self._packed[0]

    @property
    def mask_indptr(self) -> torch.Tensor:
        """int32 ``[B+1]`` *byte* offsets of each request in :attr:`packed_custom_mask`."""
        return self._packed[1]

    def token_indices(self, requests: torch.Tensor) -> torch.Tensor:
        """int64 indices of the listed requests' tokens in this batch, request after request."""
        return torch.from_numpy(gather_segments(self.qo_indptr.numpy(), self._request_indices(requests))[1])

    def _request_indices(self, requests: torch.Tensor | np.ndarray) -> np.ndarray:
        chosen = np.asarray(requests, dtype=np.int64)
        if chosen.ndim != 1 or (chosen.size and (chosen.min() < 0 or chosen.max() >= self.num_reqs)):
            raise ValueError(f"requests {chosen.tolist()} must be 1-D indices below {self.num_reqs}")
        return chosen

    def select(self, requests: torch.Tensor) -> TreeAttentionMetadata:
        """The metadata of the listed requests alone, in the given order (int64 ``[K]``):
        what :func:`~metadata.builder.build_tree_attention_metadata` gives for that sub-batch.
        Token fields are gathered, indptrs rebased, the mask workspace is not shared; all the
        requests in order give back this object itself."""
        chosen = self._request_indices(requests)
        if chosen.shape[0] == self.num_reqs and np.array_equal(chosen, np.arange(self.num_reqs)):
            return self
        # numpy: a few microseconds where the same in torch costs tens per op
        qo_indptr, tokens = gather_segments(self.qo_indptr.numpy(), chosen)
        kv_indptr, kv_pages = gather_segments(self.paged_kv_indptr.numpy(), chosen)
        pre_indptr, pre_pages = gather_segments(self.prefix_kv_indptr.numpy(), chosen)

        def take(field: torch.Tensor, index: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(field.numpy()[index])

        return TreeAttentionMetadata(
            num_reqs=int(chosen.shape[0]),
            num_tokens=int(tokens.shape[0]),
            block_size=self.block_size,
            qo_indptr=torch.from_numpy(qo_indptr.astype(np.int32)),
            context_lens=take(self.context_lens, chosen),
            kv_lens=take(self.kv_lens, chosen),
            parents=take(self.parents, tokens),
            depths=take(self.depths, tokens),
            positions=take(self.positions, tokens),
            slot_mapping=take(self.slot_mapping, tokens),
            is_chain=take(self.is_chain, chosen),
            paged_kv_indptr=torch.from_numpy(kv_indptr.astype(np.int32)),
            paged_kv_indices=take(self.paged_kv_indices, kv_pages),
            paged_kv_last_page_len=take(self.paged_kv_last_page_len, chosen),
            prefix_kv_indptr=torch.from_numpy(pre_indptr.astype(np.int32)),
            prefix_kv_indices=take(self.prefix_kv_indices, pre_pages),
            prefix_kv_last_page_len=take(self.prefix_kv_last_page_len, chosen),
        )

    def materialize(self) -> list[torch.Tensor]:
        """Dense per-request masks: bool ``[q_b, kv_b]`` (True = the query attends the key)."""
        flat = self.custom_mask
        indptr = self.mask_bit_indptr.tolist()
        q = self.query_lens.tolist()
        kv = self.kv_lens.tolist()
        return [flat[indptr[b] : indptr[b + 1]].view(q[b], kv[b]) for b in range(self.num_reqs)]

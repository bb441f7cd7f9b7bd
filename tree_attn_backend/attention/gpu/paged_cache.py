"""FlashInfer's / vLLM-CUDA's paged KV cache layout ("NHD"), in torch.

One layer's cache is ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``: K then V per
block, tokens contiguous, each token's heads contiguous. Slot ``s`` is token ``s % block_size``
of block ``s // block_size``. These torch functions are the oracle of the CUDA compaction in
``csrc/tree_helpers_cuda.cu`` and work on any device.
"""

from __future__ import annotations

import torch


def allocate_nhd_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A zeroed cache ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``."""
    return torch.zeros(num_blocks, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def check_nhd(kv_cache: torch.Tensor) -> None:
    """Raise unless ``kv_cache`` is ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``."""
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(
            f"kv_cache has shape {tuple(kv_cache.shape)}, expected [num_blocks, 2, block_size, num_kv_heads, head_dim]"
        )


def _block_and_offset(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_nhd(kv_cache)
    block_size = kv_cache.shape[2]
    return slots // block_size, slots % block_size


def read_kv(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key, value)``, each ``[n, H, D]``, of slots int64 ``[n]`` (copies)."""
    blocks, offsets = _block_and_offset(kv_cache, slots)
    return kv_cache[blocks, 0, offsets], kv_cache[blocks, 1, offsets]


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``key``/``value`` ``[n, H, D]`` at ``slot_mapping`` int64 ``[n]``, in place (what vLLM's
    ``reshape_and_cache_flash`` does before attention)."""
    blocks, offsets = _block_and_offset(kv_cache, slot_mapping)
    if key.shape != value.shape or key.shape[1:] != kv_cache.shape[3:]:
        raise ValueError(
            f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit cache {tuple(kv_cache.shape)}"
        )
    kv_cache[blocks, 0, offsets] = key.to(kv_cache.dtype)
    kv_cache[blocks, 1, offsets] = value.to(kv_cache.dtype)


def copy_slots(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy K and V of slots ``src`` to slots ``dst`` (int64 ``[M]``), every source read before
    any destination is written."""
    key, value = read_kv(kv_cache, src)  # advanced indexing copies: the gather is complete here
    write_kv(kv_cache, key, value, dst)

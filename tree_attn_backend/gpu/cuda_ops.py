"""The CUDA helpers of ``csrc/tree_helpers_cuda.cu``: masks from parent arrays and KV compaction.

The library has a plain C ABI and is loaded with ctypes, so it is independent of torch's
version. Every helper takes CUDA or CPU tensors; on CPU, or when the library is not built, it
runs the torch/numpy version (the oracle the GPU checks hold it to), which costs only speed and
is logged once.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from metadata import TreeAttentionMetadata

from . import paged_cache

logger = logging.getLogger("tree_attn_backend")

CUDA_LIBRARY_PATH = Path(__file__).resolve().parents[1] / "_C" / "tree_pruned_cuda.so"

_i32, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    # ... the kernel's own arguments, then (device index, stream)
    "tree_pruned_tree_mask": (_ptr, _ptr, _ptr, _i32, _i64, _ptr, _i32, _ptr),
    "tree_pruned_custom_mask": (_ptr, _ptr, _ptr, _ptr, _i32, _i64, _ptr, _i32, _ptr),
    "tree_pruned_packed_custom_mask": (_ptr, _ptr, _ptr, _ptr, _ptr, _i32, _i64, _ptr, _i32, _ptr),
    "tree_pruned_compact_kv": (_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i32, _ptr, _i32, _ptr),
}


@lru_cache(maxsize=None)
def cuda_library() -> "ctypes.CDLL | None":
    """The loaded helper library, or ``None`` (logged once) when it is not built."""
    if not CUDA_LIBRARY_PATH.exists():
        logger.warning(
            "tree_attn_backend: %s is not built (run `python -m tree_attn_backend.csrc_build` where nvcc exists); "
            "GPU masks and KV compaction use the torch versions, results are identical",
            CUDA_LIBRARY_PATH,
        )
        return None
    library = ctypes.CDLL(str(CUDA_LIBRARY_PATH))
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = list(argtypes)
        function.restype = ctypes.c_int
    library.tree_pruned_error_string.argtypes = [ctypes.c_int]
    library.tree_pruned_error_string.restype = ctypes.c_char_p
    return library


def _launch(library: ctypes.CDLL, name: str, device: torch.device, *args: object) -> None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    error = getattr(library, name)(*args, index, torch.cuda.current_stream(device).cuda_stream)
    if error:
        raise RuntimeError(f"{name} failed: CUDA error {error} ({library.tree_pruned_error_string(error).decode()})")


def _cuda_library_for(device: torch.device) -> "ctypes.CDLL | None":
    return cuda_library() if device.type == "cuda" else None


def _on(device: torch.device, *arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]


def tree_mask(meta: TreeAttentionMetadata, device: "torch.device | str") -> torch.Tensor:
    """:attr:`TreeAttentionMetadata.tree_mask` (bool ``[sum q_b^2]``), built on ``device``."""
    device = torch.device(device)
    library = _cuda_library_for(device)
    if library is None:
        return meta.tree_mask.to(device)
    out = torch.empty(int(meta.tree_mask_indptr[-1]), dtype=torch.bool, device=device)
    parents, qo, mask_indptr = _on(device, meta.parents.numpy(), meta.qo_indptr.numpy(), meta.tree_mask_indptr.numpy())
    _launch(library, "tree_pruned_tree_mask", device, parents.data_ptr(), qo.data_ptr(), mask_indptr.data_ptr(),
            meta.num_reqs, out.numel(), out.data_ptr())
    return out


def custom_mask(meta: TreeAttentionMetadata, device: "torch.device | str") -> torch.Tensor:
    """:attr:`TreeAttentionMetadata.custom_mask` (bool ``[sum q_b * kv_b]``), built on ``device``."""
    device = torch.device(device)
    library = _cuda_library_for(device)
    if library is None:
        return meta.custom_mask.to(device)
    out = torch.empty(int(meta.mask_bit_indptr[-1]), dtype=torch.bool, device=device)
    parents, qo, ctx, mask_indptr = _on(
        device, meta.parents.numpy(), meta.qo_indptr.numpy(), meta.context_lens.numpy(), meta.mask_bit_indptr.numpy()
    )
    _launch(library, "tree_pruned_custom_mask", device, parents.data_ptr(), qo.data_ptr(), ctx.data_ptr(),
            mask_indptr.data_ptr(), meta.num_reqs, out.numel(), out.data_ptr())
    return out


def packed_custom_mask(meta: TreeAttentionMetadata, device: "torch.device | str") -> tuple[torch.Tensor, torch.Tensor]:
    """:attr:`TreeAttentionMetadata.packed_custom_mask` (uint8, on ``device``) and its *byte*
    offsets :attr:`~TreeAttentionMetadata.mask_indptr` (int32 ``[B+1]``, on the CPU)."""
    device = torch.device(device)
    library = _cuda_library_for(device)
    if library is None:
        return meta.packed_custom_mask.to(device), meta.mask_indptr
    bit_indptr = meta.mask_bit_indptr.numpy()
    byte_indptr = np.concatenate([[0], np.cumsum((np.diff(bit_indptr) + 7) // 8)])
    out = torch.empty(int(byte_indptr[-1]), dtype=torch.uint8, device=device)
    parents, qo, ctx, bits, bytes_ = _on(
        device, meta.parents.numpy(), meta.qo_indptr.numpy(), meta.context_lens.numpy(), bit_indptr, byte_indptr
    )
    _launch(library, "tree_pruned_packed_custom_mask", device, parents.data_ptr(), qo.data_ptr(), ctx.data_ptr(),
            bits.data_ptr(), bytes_.data_ptr(), meta.num_reqs, out.numel(), out.data_ptr())
    return out, torch.from_numpy(byte_indptr.astype(np.int32))


def compact_kv(kv_caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy K/V of slots ``src`` to ``dst`` (int64 ``[M]``) in every layer's NHD cache
    (``[num_blocks, 2, block_size, H, D]``, see :mod:`.paged_cache`), sources read before any
    destination is written. One gather and one scatter launch cover all layers."""
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} must be equal 1-D shapes")
    if not kv_caches:
        return
    first = kv_caches[0]
    for layer, cache in enumerate(kv_caches):
        paged_cache.check_nhd(cache)
        if cache.shape != first.shape or cache.dtype != first.dtype or cache.device != first.device:
            raise ValueError(
                f"kv_caches[{layer}] is {tuple(cache.shape)} {cache.dtype} on {cache.device}; "
                f"kv_caches[0] is {tuple(first.shape)} {first.dtype} on {first.device}"
            )
        if not cache.is_contiguous():
            raise ValueError(f"kv_caches[{layer}] is not contiguous")
    num_slots = first.shape[0] * first.shape[2]
    for name, slots in (("src", src), ("dst", dst)):
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= num_slots):
            raise ValueError(f"{name} slots {slots.tolist()} must lie in [0, {num_slots})")
    library = _cuda_library_for(first.device)
    if library is None:
        src, dst = src.to(first.device), dst.to(first.device)
        for cache in kv_caches:
            paged_cache.copy_slots(cache, src, dst)
        return
    if src.numel() == 0:
        return
    device = first.device
    element = first.element_size()
    _, _, block_size, heads, dim = first.shape
    row_bytes = heads * dim * element
    layer_ptrs = torch.tensor([c.data_ptr() for c in kv_caches], dtype=torch.int64).to(device)
    src_d, dst_d = (s.to(device=device, dtype=torch.int64).contiguous() for s in (src, dst))
    scratch = torch.empty(len(kv_caches) * src.numel() * 2 * row_bytes, dtype=torch.uint8, device=device)
    aligned = all(c.data_ptr() % 16 == 0 for c in kv_caches)
    _launch(library, "tree_pruned_compact_kv", device, layer_ptrs.data_ptr(), len(kv_caches), src_d.data_ptr(),
            dst_d.data_ptr(), src.numel(), first.stride(0) * element, first.stride(1) * element,
            first.stride(2) * element, row_bytes, block_size, int(aligned), scratch.data_ptr())

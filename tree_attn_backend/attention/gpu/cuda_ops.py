"""The CUDA helpers of ``csrc/tree_helpers_cuda.cu``: masks from parent arrays and KV compaction.

The library has a plain C ABI and is loaded with ctypes, so it is independent of torch's
version. Every helper takes CUDA or CPU tensors; on CPU, or when the library is not built, it
runs the torch/numpy version (the oracle the GPU checks hold it to), which costs only speed and
is logged once. Before any launch the integer inputs are checked on the host
(:func:`check_mask_inputs`, the slot range in :func:`compact_kv`): the kernels trust them.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from functools import cache
from typing import NoReturn

import numpy as np
import torch

from metadata import TreeAttentionMetadata
from tree_attn_backend import ragged
from tree_attn_backend.attention.kv_layout import NHD_LAYOUT
from tree_attn_backend.ops.native import CUDA_LIBRARY_PATH

logger = logging.getLogger("tree_attn_backend")


_i32, _i64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    # ... the kernel's own arguments, then (device index, stream)
    "tree_pruned_tree_mask": (_ptr, _ptr, _ptr, _i32, _i64, _ptr, _i32, _ptr),
    "tree_pruned_custom_mask": (_ptr, _ptr, _ptr, _ptr, _i32, _i64, _ptr, _i32, _ptr),
    "tree_pruned_packed_custom_mask": (_ptr, _ptr, _ptr, _ptr, _ptr, _i32, _i64, _ptr, _i32, _ptr),
    "tree_pruned_compact_kv": (_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i32, _ptr, _i32, _ptr),
}


@cache
def cuda_library() -> ctypes.CDLL | None:
    """The loaded helper library, or ``None`` (logged once) when it is not built."""
    if not CUDA_LIBRARY_PATH.exists():
        logger.warning(
            "tree_attn_backend: %s is not built (run `python -m tree_attn_backend.ops.csrc_build` where nvcc exists); "
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


def _cuda_library_for(device: torch.device) -> ctypes.CDLL | None:
    return cuda_library() if device.type == "cuda" else None


def _on(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous().to(device) for t in tensors]


def _fail(op: str, message: str) -> NoReturn:
    raise RuntimeError(f"{op}: {message}")


def _host_vector(op: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``t`` as a numpy view, if it is a 1-D CPU tensor of ``dtype`` (the kernels read raw
    pointers of exactly that type)."""
    if t.device.type != "cpu" or t.dtype != dtype or t.dim() != 1:
        _fail(op, f"{name} must be a 1-D {dtype} CPU tensor, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t.numpy()


def _check_indptr(op: str, name: str, indptr: np.ndarray, length: int, of: str) -> None:
    """``indptr[0] == 0``, non-decreasing, ``indptr[-1] == length`` (the length of ``of``)."""
    if indptr[0] != 0:
        _fail(op, f"{name}[0] = {indptr[0]} (must be 0)")
    down = np.flatnonzero(indptr[1:] < indptr[:-1])
    if down.size:
        k = int(down[0]) + 1
        _fail(op, f"{name}[{k}] = {indptr[k]} < {name}[{k - 1}] = {indptr[k - 1]} (must be non-decreasing)")
    if indptr[-1] != length:
        _fail(op, f"{name}[{indptr.shape[0] - 1}] = {indptr[-1]} (must be {length}, the length of {of})")


def _check_offsets(op: str, name: str, indptr: np.ndarray, sizes: np.ndarray, what: str) -> None:
    """``indptr`` is exactly the running sum of ``sizes`` (each request's ``what``) from 0."""
    expected = ragged.indptr(sizes)
    wrong = np.flatnonzero(indptr != expected)
    if wrong.size:
        k = int(wrong[0])
        _fail(op, f"{name}[{k}] = {indptr[k]} (must be {expected[k]}: offsets of {what} per request)")


def packed_byte_indptr(bit_indptr: torch.Tensor) -> torch.Tensor:
    """int64 ``[B+1]`` byte offsets of the packed mask: each request's bits (offsets
    ``bit_indptr``, int64 ``[B+1]``) padded to a whole byte."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum((bit_indptr.diff() + 7) // 8, 0)])


def check_mask_inputs(
    op: str,
    parents: torch.Tensor,
    qo_indptr: torch.Tensor,
    mask_indptr: torch.Tensor,
    context_lens: torch.Tensor | None = None,
    byte_indptr: torch.Tensor | None = None,
) -> None:
    """Check, on the host, the arrays a mask entry point ``op`` is about to copy to the device.

    The kernels index memory with these values and trust them, so this is what keeps a bad
    input from reading or writing out of bounds. O(N) numpy passes; raises ``RuntimeError``
    naming ``op``, the array, the first bad index and its value.

    Args:
        parents: int32 ``[N]``; per request ``parents[0] == -1`` and ``parents[i]`` in ``[0, i)``
            (request-local), so every ancestor walk stays inside the request.
        qo_indptr: int32 ``[B+1]``, starts at 0, non-decreasing, ends at ``N``.
        mask_indptr: int64 ``[B+1]``, offsets of each request's mask elements: ``q_b * q_b``
            for the tree mask (``context_lens`` is ``None``), else ``q_b * (c_b + q_b)`` bits.
        context_lens: int32 ``[B]``, >= 0; for the custom masks.
        byte_indptr: int64 ``[B+1]``, offsets of ``ceil(bits_b / 8)`` bytes; packed mask only.
    """
    par = _host_vector(op, "parents", parents, torch.int32)
    qo = _host_vector(op, "qo_indptr", qo_indptr, torch.int32).astype(np.int64)
    bits = _host_vector(op, "mask_indptr", mask_indptr, torch.int64)
    if qo.shape[0] == 0 or bits.shape != qo.shape:
        _fail(op, f"qo_indptr {tuple(qo.shape)} and mask_indptr {tuple(bits.shape)} must both be [num_reqs + 1]")
    _check_indptr(op, "qo_indptr", qo, par.shape[0], "parents")
    q = np.diff(qo)
    ctx = np.zeros_like(q)
    if context_lens is not None:
        ctx = _host_vector(op, "context_lens", context_lens, torch.int32).astype(np.int64)
        if ctx.shape != q.shape:
            _fail(op, f"context_lens has {ctx.shape[0]} entries for {q.shape[0]} requests")
        if (ctx < 0).any():
            b = int(np.flatnonzero(ctx < 0)[0])
            _fail(op, f"context_lens[{b}] = {ctx[b]} < 0")
    # Request-local index of every token; the root must be -1, every other parent earlier.
    local = ragged.segment_local(q)
    bad = np.flatnonzero(np.where(local == 0, par != -1, (par < 0) | (par >= local)))
    if bad.size:
        t = int(bad[0])
        b = int(np.searchsorted(qo, t, side="right")) - 1
        i = int(local[t])
        rule = "must be -1 at the root" if i == 0 else f"must be in [0, {i})"
        _fail(op, f"request {b}: parents[{i}] = {par[t]} ({rule})")
    _check_offsets(op, "mask_indptr", bits, q * (ctx + q), "q * q" if context_lens is None else "q * (c + q)")
    if byte_indptr is not None:
        bytes_ = _host_vector(op, "byte_indptr", byte_indptr, torch.int64)
        if bytes_.shape != qo.shape:
            _fail(op, f"byte_indptr has {bytes_.shape[0]} entries, expected {qo.shape[0]}")
        _check_offsets(op, "byte_indptr", bytes_, (q * (ctx + q) + 7) // 8, "ceil(q * (c + q) / 8)")


def _mask_on_device(
    op: str,
    device: torch.device,
    out_size: int,
    out_dtype: torch.dtype,
    check_args: tuple[torch.Tensor, ...],
    launch_args: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Run the mask kernel ``op`` into a new ``[out_size]`` tensor on ``device``, after checking
    its inputs on the host (before anything touches the device): ``check_args`` as
    :func:`check_mask_inputs` takes them, ``launch_args`` in the kernel's pointer order
    (``qo_indptr`` second)."""
    library = _cuda_library_for(device)
    if library is None:
        raise RuntimeError(f"{op}: the CUDA helper library is not loaded for {device}")
    check_mask_inputs(op, *check_args)
    out = torch.empty(out_size, dtype=out_dtype, device=device)
    on_device = _on(device, *launch_args)
    _launch(
        library, op, device, *(t.data_ptr() for t in on_device), on_device[1].numel() - 1, out.numel(), out.data_ptr()
    )
    return out


def tree_mask(meta: TreeAttentionMetadata, device: torch.device | str) -> torch.Tensor:
    """:attr:`TreeAttentionMetadata.tree_mask` (bool ``[sum q_b^2]``), built on ``device``."""
    device = torch.device(device)
    if _cuda_library_for(device) is None:
        return meta.tree_mask.to(device)
    host = (meta.parents, meta.qo_indptr, meta.tree_mask_indptr)
    return _mask_on_device("tree_pruned_tree_mask", device, int(meta.tree_mask_indptr[-1]), torch.bool, host, host)


def custom_mask(meta: TreeAttentionMetadata, device: torch.device | str) -> torch.Tensor:
    """:attr:`TreeAttentionMetadata.custom_mask` (bool ``[sum q_b * kv_b]``), built on ``device``."""
    device = torch.device(device)
    if _cuda_library_for(device) is None:
        return meta.custom_mask.to(device)
    return _mask_on_device(
        "tree_pruned_custom_mask",
        device,
        int(meta.mask_bit_indptr[-1]),
        torch.bool,
        (meta.parents, meta.qo_indptr, meta.mask_bit_indptr, meta.context_lens),
        (meta.parents, meta.qo_indptr, meta.context_lens, meta.mask_bit_indptr),
    )


def packed_custom_mask(meta: TreeAttentionMetadata, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """:attr:`TreeAttentionMetadata.packed_custom_mask` (uint8, on ``device``) and its *byte*
    offsets :attr:`~TreeAttentionMetadata.mask_indptr` (int32 ``[B+1]``, on the CPU)."""
    device = torch.device(device)
    if _cuda_library_for(device) is None:
        return meta.packed_custom_mask.to(device), meta.mask_indptr
    bit_indptr = meta.mask_bit_indptr
    byte_indptr = packed_byte_indptr(bit_indptr)
    out = _mask_on_device(
        "tree_pruned_packed_custom_mask",
        device,
        int(byte_indptr[-1]),
        torch.uint8,
        (meta.parents, meta.qo_indptr, bit_indptr, meta.context_lens, byte_indptr),
        (meta.parents, meta.qo_indptr, meta.context_lens, bit_indptr, byte_indptr),
    )
    return out, byte_indptr.to(torch.int32)


def compact_kv(kv_caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy K/V of slots ``src`` to ``dst`` (int64 ``[M]``) in every layer's NHD cache
    (``[num_blocks, 2, block_size, H, D]``, see ``kv_layout.NHD_LAYOUT``), sources read before
    any destination is written. One gather and one scatter launch cover all layers."""
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} must be equal 1-D shapes")
    if not kv_caches:
        return
    first = kv_caches[0]
    for layer, layer_cache in enumerate(kv_caches):
        NHD_LAYOUT.check(layer_cache)
        if layer_cache.shape != first.shape or layer_cache.dtype != first.dtype or layer_cache.device != first.device:
            raise ValueError(
                f"kv_caches[{layer}] is {tuple(layer_cache.shape)} {layer_cache.dtype} on {layer_cache.device}; "
                f"kv_caches[0] is {tuple(first.shape)} {first.dtype} on {first.device}"
            )
        if not layer_cache.is_contiguous():
            raise ValueError(f"kv_caches[{layer}] is not contiguous")
    num_slots = first.shape[0] * first.shape[2]
    for name, slots in (("src", src), ("dst", dst)):
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= num_slots):
            raise ValueError(f"{name} slots {slots.tolist()} must lie in [0, {num_slots})")
    library = _cuda_library_for(first.device)
    if library is None:
        src, dst = src.to(first.device), dst.to(first.device)
        for layer_cache in kv_caches:
            NHD_LAYOUT.copy_slots(layer_cache, src, dst)
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
    _launch(
        library,
        "tree_pruned_compact_kv",
        device,
        layer_ptrs.data_ptr(),
        len(kv_caches),
        src_d.data_ptr(),
        dst_d.data_ptr(),
        src.numel(),
        first.stride(0) * element,
        first.stride(1) * element,
        first.stride(2) * element,
        row_bytes,
        block_size,
        int(aligned),
        scratch.data_ptr(),
    )

"""Tree masks from parent arrays, vectorized over the whole batch (numpy).

The ancestor relation is kept as bitsets: row ``t`` of :func:`ancestor_bits` has bit ``j``
set when request-local token ``j`` is an ancestor of token ``t`` or ``t`` itself. They are
built by pointer doubling, ``ceil(log2(max depth)) + 1`` gathers of ``[N, W]`` words, with no
Python loop over tokens.
"""

from __future__ import annotations

import numpy as np

from tree_attn_backend.ragged import global_parents, indptr, segment_local


def ancestor_bits(parents: np.ndarray, qo_indptr: np.ndarray) -> np.ndarray:
    """Ancestor-or-self bitsets of every new token.

    Args:
        parents: int32 ``[N]`` request-local parents (``-1`` at each request's root).
        qo_indptr: int ``[B+1]`` token offsets of the requests.

    Returns:
        uint64 ``[N, W]`` with ``W = ceil(max query length / 64)``; bit ``j`` of row ``t``
        (word ``j // 64``, bit ``j % 64``) is set iff local token ``j`` is on the path from the
        root to ``t``.
    """
    query_lens = np.diff(qo_indptr)
    num_tokens = parents.shape[0]
    words = max(1, -(-int(query_lens.max(initial=1)) // 64))
    local = segment_local(query_lens)
    bits = np.zeros((num_tokens, words), dtype=np.uint64)
    bits[np.arange(num_tokens), local // 64] = np.left_shift(np.uint64(1), (local % 64).astype(np.uint64))
    index = np.arange(num_tokens)
    jump = global_parents(parents, query_lens)
    jump = np.where(jump < 0, index, jump)  # roots point at themselves
    while True:
        bits |= bits[jump]
        next_jump = jump[jump]
        if np.array_equal(next_jump, jump):
            return bits
        jump = next_jump


def row_columns(qo_indptr: np.ndarray) -> np.ndarray:
    """Keep-mask of the padded ``[N, W * 64]`` bit matrix: column ``j`` of row ``t`` is kept
    iff ``j`` is below the row's request query length."""
    query_lens = np.diff(qo_indptr)
    words = max(1, -(-int(query_lens.max(initial=1)) // 64))
    return np.arange(words * 64)[None, :] < np.repeat(query_lens, query_lens)[:, None]


def unpack_rows(bits: np.ndarray, qo_indptr: np.ndarray) -> np.ndarray:
    """Per-request ``[q, q]`` ancestor masks, concatenated row-major over the batch:
    bool ``[sum q^2]``."""
    dense = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little").view(bool)
    return dense[row_columns(qo_indptr)]


def pack_segments(flat: np.ndarray, bit_indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack each segment of a flat bool array little-endian, padded to a byte boundary.

    Returns ``(packed uint8 [total_bytes], byte_indptr int64 [B+1])``. This is the torch-free
    fallback of the native ``build_tree_masks`` op and loops over segments.
    """
    pieces = [np.packbits(flat[a:b], bitorder="little") for a, b in zip(bit_indptr[:-1], bit_indptr[1:])]
    sizes = np.array([p.shape[0] for p in pieces], dtype=np.int64)
    byte_indptr = indptr(sizes)
    packed = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    return packed, byte_indptr

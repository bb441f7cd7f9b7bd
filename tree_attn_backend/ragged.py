"""Ragged index arithmetic on plain numpy arrays, shared by every stage.

Segments: a flat array holds segment 0's elements, then segment 1's, and so on. A layout is
given by ``sizes`` (int ``[S]``, each ``>= 0``) or by its ``indptr`` (int64 ``[S + 1]``,
``indptr[0] = 0``, ``indptr[s + 1] - indptr[s] = sizes[s]``). A batch's query tokens, its
KV pages and its mask bits are all laid out this way.

Trees: a forest in topological order is a parent array (int ``[N]``, ``-1`` at a root, every
other entry smaller than its own index). Parents may be local to their segment (each request's
tree numbered from 0) or global (numbered across the flat array): :func:`global_parents`
converts.

Nothing here knows about requests, caches, torch or vLLM.
"""

from __future__ import annotations

import numpy as np


def indptr(sizes: np.ndarray) -> np.ndarray:
    """int64 ``[S + 1]``: ``0`` then the running sum of ``sizes``."""
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def segment_ids(sizes: np.ndarray) -> np.ndarray:
    """int64 ``[sum(sizes)]``: the segment each element belongs to."""
    return np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)


def segment_local(sizes: np.ndarray) -> np.ndarray:
    """int64 ``[sum(sizes)]``: each element's index within its segment."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def segment_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """int64: the concatenation of ``arange(starts[i], starts[i] + lengths[i])``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.repeat(np.asarray(starts, dtype=np.int64), lengths) + segment_local(lengths)


def gather_segments(segment_indptr: np.ndarray, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chosen ``segments`` (int ``[K]``, any order) of a layout, packed anew: their indptr
    (int64 ``[K + 1]``) and the index of each of their elements in the original flat array
    (int64, segment after segment)."""
    sizes = np.diff(segment_indptr)[segments]
    return indptr(sizes), segment_arange(segment_indptr[:-1][segments], sizes)


def global_parents(parents: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """int64 ``[N]``: segment-local ``parents`` numbered across the flat array (roots stay ``-1``)."""
    parents = np.asarray(parents, dtype=np.int64)
    starts = np.repeat(indptr(sizes)[:-1], sizes)
    return np.where(parents < 0, -1, parents + starts)


def depths_from_parents(parents: np.ndarray) -> np.ndarray:
    """Depth of every node of a forest given in topological order.

    ``parents`` is int ``[N]``; a root has ``parents[i] == -1`` (any number of roots, so a
    whole flattened batch can be passed at once). Returns int32 ``[N]``. Pointer doubling:
    ``log2(max depth)`` vectorized passes, no Python loop over nodes.
    """
    parents = np.asarray(parents, dtype=np.int64)
    n = parents.shape[0]
    index = np.arange(n, dtype=np.int64)
    is_root = parents < 0
    jump = np.where(is_root, index, parents)  # roots point at themselves
    dist = (~is_root).astype(np.int32)  # distance from a node to jump[node]
    while True:
        next_jump = jump[jump]
        if np.array_equal(next_jump, jump):
            return dist
        dist = dist + dist[jump]
        jump = next_jump


def bad_parent_reason(index: int, parent: int, num_nodes: int) -> str:
    """Why ``parents[index] = parent`` breaks a topologically ordered tree of ``num_nodes``."""
    if index == 0:
        return "node 0 is the root and its parent must be -1"
    if parent == -1:
        return "more than one root (only node 0 may have parent -1)"
    if parent < -1 or parent >= num_nodes:
        return f"out of range for {num_nodes} nodes"
    if parent == index:
        return "a self reference"
    return "a forward reference (parents must come before their children)"


def validate_parents(parents: np.ndarray, what: str = "parents") -> None:
    """Raise ``ValueError`` naming the first bad index if ``parents`` is not a single tree
    in topological order (``parents[0] == -1``, ``0 <= parents[i] < i`` otherwise)."""
    if parents.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(parents.shape)}")
    n = parents.shape[0]
    if n == 0:
        raise ValueError(f"{what} is empty: a tree has at least its root (node 0)")
    if parents[0] != -1:
        raise ValueError(f"{what}[0] = {int(parents[0])}: {bad_parent_reason(0, int(parents[0]), n)}")
    if n == 1:
        return
    rest = parents[1:]
    index = np.arange(1, n)
    bad = np.flatnonzero((rest < 0) | (rest >= index))
    if bad.size:
        i = int(bad[0]) + 1
        raise ValueError(f"{what}[{i}] = {int(parents[i])}: {bad_parent_reason(i, int(parents[i]), n)}")

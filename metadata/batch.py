"""The builder's input: one forward step's batch, as vLLM lays it out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tree_attn_backend.ragged import bad_parent_reason, segment_local

SUPPORTED_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True, eq=False)
class StepBatch:
    """Requests of one step, in batch order.

    Every request contributes ``query_lens[b]`` new tokens after ``context_lens[b]`` tokens
    already in the paged KV cache. The new tokens of a request form a tree in topological
    order: a draft tree (node ``i`` is query token ``i``, root first), or a linear chunk (a
    prefill chunk or a plain decode), which is simply the chain ``[-1, 0, 1, ...]``.

    The new tokens' K/V go to the linear cache positions ``context_lens[b] + i`` (node order),
    wherever their tree depth puts them in the sequence.

    Attributes:
        context_lens: int64 ``[B]``, >= 0.
        query_lens: int64 ``[B]``, >= 1.
        parents: int32 ``[N]`` (``N = sum(query_lens)``), request-local parent index of every
            new token, ``-1`` for each request's first token; ``parents[i] < i`` locally.
        block_table: int64 ``[B, max_blocks]``; row ``b`` lists the cache blocks of request ``b``.
        block_size: tokens per cache block, one of :data:`SUPPORTED_BLOCK_SIZES`.
    """

    context_lens: np.ndarray
    query_lens: np.ndarray
    parents: np.ndarray
    block_table: np.ndarray
    block_size: int

    @classmethod
    def from_requests(
        cls,
        context_lens: Sequence[int] | np.ndarray,
        query_lens: Sequence[int] | np.ndarray,
        trees: Sequence[np.ndarray | None],
        block_table: np.ndarray,
        block_size: int,
    ) -> StepBatch:
        """Build from per-request parent arrays; ``None`` marks a linear chunk."""
        query_lens = np.asarray(query_lens, dtype=np.int64)
        if len(trees) != query_lens.shape[0]:
            raise ValueError(f"trees has {len(trees)} entries for {query_lens.shape[0]} requests")
        pieces = []
        for b, (tree, q) in enumerate(zip(trees, query_lens.tolist())):
            if tree is None:
                pieces.append(np.arange(-1, q - 1, dtype=np.int32))
                continue
            tree = np.asarray(tree)
            if tree.ndim != 1 or tree.shape[0] != q:
                raise ValueError(
                    f"request {b}: tree has {tree.shape[0] if tree.ndim == 1 else tuple(tree.shape)} nodes "
                    f"but query_lens[{b}] = {q}"
                )
            pieces.append(tree)
        parents = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        return cls(np.asarray(context_lens), query_lens, parents, block_table, block_size)

    def __post_init__(self) -> None:
        context_lens = np.asarray(self.context_lens)
        query_lens = np.asarray(self.query_lens)
        parents = np.asarray(self.parents)
        block_table = np.asarray(self.block_table)
        for name, value in (
            ("context_lens", context_lens),
            ("query_lens", query_lens),
            ("parents", parents),
            ("block_table", block_table),
        ):
            if value.dtype.kind not in "iu":
                raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
        context_lens = np.ascontiguousarray(context_lens, dtype=np.int64)
        query_lens = np.ascontiguousarray(query_lens, dtype=np.int64)
        if context_lens.ndim != 1 or query_lens.shape != context_lens.shape:
            raise ValueError(
                f"context_lens {tuple(context_lens.shape)} and query_lens {tuple(query_lens.shape)} "
                "must both be 1-D with one entry per request"
            )
        num_reqs = context_lens.shape[0]
        if (context_lens < 0).any():
            b = int(np.flatnonzero(context_lens < 0)[0])
            raise ValueError(f"context_lens[{b}] = {int(context_lens[b])} is negative")
        if (query_lens < 1).any():
            b = int(np.flatnonzero(query_lens < 1)[0])
            raise ValueError(f"query_lens[{b}] = {int(query_lens[b])}: every request needs at least one new token")
        if isinstance(self.block_size, bool) or self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size = {self.block_size!r} is not supported (one of {SUPPORTED_BLOCK_SIZES})")
        if block_table.ndim != 2 or block_table.shape[0] != num_reqs:
            raise ValueError(f"block_table has shape {tuple(block_table.shape)}, expected ({num_reqs}, max_blocks)")
        blocks_needed = -(-(context_lens + query_lens) // self.block_size)
        short = np.flatnonzero(blocks_needed > block_table.shape[1])
        if short.size:
            b = int(short[0])
            raise ValueError(
                f"block_table is too short for request {b}: context {int(context_lens[b])} + "
                f"{int(query_lens[b])} new tokens need {int(blocks_needed[b])} blocks of "
                f"{self.block_size}, the table has {block_table.shape[1]} columns"
            )
        if block_table.size and block_table.min() < 0:  # vLLM pads with 0, so look closer only then
            used = np.arange(block_table.shape[1])[None, :] < blocks_needed[:, None]
            if (block_table[used] < 0).any():
                b, col = (int(x[0]) for x in np.nonzero(used & (block_table < 0)))
                raise ValueError(f"block_table[{b}, {col}] = {int(block_table[b, col])} is a negative block id")
        num_tokens = int(query_lens.sum())
        if parents.shape != (num_tokens,):
            raise ValueError(f"parents has shape {tuple(parents.shape)}, expected ({num_tokens},) = sum(query_lens)")
        parents = np.ascontiguousarray(parents, dtype=np.int32)
        local = segment_local(query_lens)
        first = local == 0
        bad = np.flatnonzero(np.where(first, parents != -1, (parents < 0) | (parents >= local)))
        if bad.size:
            t = int(bad[0])
            b = int(np.searchsorted(np.cumsum(query_lens), t, side="right"))
            i, p = int(local[t]), int(parents[t])
            raise ValueError(f"request {b}: parents[{i}] = {p}: {bad_parent_reason(i, p, int(query_lens[b]))}")
        object.__setattr__(self, "context_lens", context_lens)
        object.__setattr__(self, "query_lens", query_lens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "block_table", np.ascontiguousarray(block_table, dtype=np.int64))

    @property
    def num_reqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.query_lens.sum())

"""Tree structure of the step being run, from the model runner to the attention builder.

vLLM's ``CommonAttentionMetadata`` has no field for per-request masks, so the runner
publishes the batch rows that carry a branching tree, with their parents, here (one process,
one step at a time) and the builder reads them. Every other row is a linear chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TreeRows:
    """rows: int64 ``[R]`` ascending batch rows with a branching tree; parents: int32
    ``[sum(query_lens[rows])]`` request-local parents of those rows' query tokens, row after row."""

    rows: np.ndarray
    parents: np.ndarray


class TreeStepChannel:
    def __init__(self) -> None:
        self._published: TreeRows | None = None

    def publish(self, rows: np.ndarray, parents: np.ndarray) -> None:
        self._published = TreeRows(np.asarray(rows, dtype=np.int64), np.asarray(parents, dtype=np.int32))

    def clear(self) -> None:
        self._published = None

    def tree_rows_for(self, query_lens: np.ndarray) -> TreeRows | None:
        """The published tree rows of a batch with these query lengths; ``None`` when the
        runner published nothing (no trees this step, warm-up and profiling runs).

        Raises ``RuntimeError`` when what was published does not fit this batch: attention
        would otherwise run with the wrong masks."""
        published = self._published
        if published is None:
            return None
        rows = published.rows
        if rows.size and int(rows[-1]) >= query_lens.shape[0]:
            raise RuntimeError(f"tree rows {rows.tolist()} published for a batch of {query_lens.shape[0]} requests")
        expected = int(query_lens[rows].sum())
        if expected != published.parents.shape[0]:
            raise RuntimeError(
                f"tree rows {rows.tolist()} have {expected} query tokens "
                f"but {published.parents.shape[0]} parents were published"
            )
        return published


TREE_STEP = TreeStepChannel()

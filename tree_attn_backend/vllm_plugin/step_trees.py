"""The trees of the step being run: one object from the runner to the attention builder.

The proposer keeps each request's :class:`~tree_attn_backend.drafting.DraftTree`; when vLLM
schedules its drafts, the runner lays the step's trees over the batch as a :class:`StepTrees`
and publishes it on :data:`STEP_TREES`. vLLM's ``CommonAttentionMetadata`` has no field for
per-request masks, so the attention builder reads it there (one process, one step at a time);
the runner verifies and compacts the same object after the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tree_attn_backend.ragged import segment_arange


@dataclass(frozen=True)
class StepTrees:
    """A batch's query tokens with the step's trees laid over them.

    Attributes:
        rows: int64 ``[R]`` ascending batch rows whose query is a draft tree (root, then the
            scheduled drafts in the tree's node order).
        branching_rows: int64 ``[K]`` the subset of ``rows`` whose tree is not a chain: only
            they need masked attention (a chain is what vLLM's causal kernel computes).
        query_start: int64 ``[B+1]`` query token offsets of every batch row.
        parents: int32 ``[N]`` request-local parent of every query token: the tree's for
            ``rows``, ``i - 1`` (a causal chunk) elsewhere.
        depths: int64 ``[N]`` depth of every query token in its row (``i`` in causal rows).
        slots: int64 ``[N]`` the KV-cache slot each query token is written to (node ``i`` of a
            tree at linear position ``context + i``).
    """

    rows: np.ndarray
    branching_rows: np.ndarray
    query_start: np.ndarray
    parents: np.ndarray
    depths: np.ndarray
    slots: torch.Tensor

    def tokens_of(self, rows: np.ndarray) -> np.ndarray:
        """int64 indices of the listed rows' query tokens, row after row."""
        return segment_arange(self.query_start[rows], np.diff(self.query_start)[rows])


class StepTreesChannel:
    def __init__(self) -> None:
        self._published: StepTrees | None = None

    def publish(self, step: StepTrees) -> None:
        self._published = step

    def clear(self) -> None:
        self._published = None

    def for_batch(self, query_lens: np.ndarray) -> StepTrees | None:
        """The published trees of a batch with these query lengths; ``None`` when the runner
        published nothing (no trees this step, warm-up and profiling runs).

        Raises ``RuntimeError`` when what was published does not fit this batch: attention
        would otherwise run with the wrong masks."""
        step = self._published
        if step is None:
            return None
        published = np.diff(step.query_start)
        if not np.array_equal(published, query_lens):
            raise RuntimeError(
                f"trees published for query lengths {published.tolist()}, the batch has {query_lens.tolist()}"
            )
        return step


STEP_TREES = StepTreesChannel()

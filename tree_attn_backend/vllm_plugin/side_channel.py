"""Tree structure of the step being run, from the model runner to the attention builder.

vLLM's ``CommonAttentionMetadata`` has no field for per-request masks, so the runner
publishes the batch's flattened parents here (one process, one step at a time) and the
builder reads them. Whatever the runner did not publish is a linear chunk.
"""

from __future__ import annotations

import numpy as np


class TreeStepChannel:
    """Holds request-local parents ``int32 [N]`` of the step's query tokens, or nothing."""

    def __init__(self) -> None:
        self._parents: "np.ndarray | None" = None

    def publish(self, parents: np.ndarray) -> None:
        self._parents = parents

    def clear(self) -> None:
        self._parents = None

    def parents_for(self, query_lens: np.ndarray) -> np.ndarray:
        """Parents for a batch with these query lengths: the published ones when they cover
        exactly this batch, else chains (prefill chunks, decodes, warm-up runs)."""
        total = int(query_lens.sum())
        if self._parents is not None and self._parents.shape[0] == total:
            return self._parents
        starts = np.repeat(np.cumsum(query_lens) - query_lens, query_lens)
        return (np.arange(total) - starts - 1).astype(np.int32)


TREE_STEP = TreeStepChannel()

"""The batch-wide verify budget: how many draft nodes of each request's tree to verify.

Every request's pruned tree lists its draft nodes best-first (non-increasing path value), so
any prefix of it is a tree. The budget merges all requests' nodes by path value and keeps the
``k`` best batch-wide, with ``k`` chosen to maximise the step's expected throughput

    (B + s * A(k)) / step_ms(B + k, k > 0)

where ``B`` is the number of decoding requests (each yields one token without drafts),
``A(k)`` the sum of the ``k`` best path values (the expected number of accepted draft tokens,
a path being accepted with its path probability), ``s`` a calibration factor of the drafter's
probabilities against what the target actually accepted, and ``step_ms`` the cost model
below. Adding a node pays while its marginal expected tokens exceed the marginal time times
the current rate; the argmax over every ``k`` also covers the fixed cost of drafting at all.

With few requests, ``B + k`` tokens cost little more than ``B`` (the step is bound by reading
the weights) and the budget keeps the per-request pruned trees whole. As the batch grows every
extra token costs compute, so the budget shrinks trees, then drops drafts altogether: its
expected throughput is never below the no-draft choice ``k = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class VerifyCostModel:
    """Time of one forward step, in milliseconds:
    ``step_ms + token_ms * query_tokens + draft_step_ms * [the step verifies drafts]``.

    Attributes:
        step_ms: fixed cost of a step (reading the weights, launching, sampling).
        token_ms: cost of each query token (linear layers, attention).
        draft_step_ms: fixed extra cost of a step that verifies drafts (tree masks and
            attention plan, verification, KV compaction, drafting).
    """

    step_ms: float
    token_ms: float
    draft_step_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("step_ms", "token_ms", "draft_step_ms"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0:
                raise ValueError(f"cost model {name} = {value!r}: must be a number >= 0")
        if self.step_ms + self.token_ms <= 0.0:
            raise ValueError(f"cost model step_ms = {self.step_ms} and token_ms = {self.token_ms}: one must be > 0")

    def step_time(self, num_tokens: np.ndarray, with_drafts: np.ndarray) -> np.ndarray:
        """Vectorised step time for query token counts ``num_tokens`` (same shape masks)."""
        return self.step_ms + self.token_ms * num_tokens + self.draft_step_ms * with_drafts

    @classmethod
    def fit(cls, num_tokens: Sequence[int], step_ms: Sequence[float], draft_step_ms: float = 0.0) -> "VerifyCostModel":
        """Least-squares line through measured ``(num_tokens, step_ms)`` points (at least two
        distinct token counts), clamped to non-negative coefficients."""
        x = np.asarray(num_tokens, dtype=np.float64)
        y = np.asarray(step_ms, dtype=np.float64)
        if x.shape != y.shape or np.unique(x).size < 2:
            raise ValueError(f"need step times at two or more distinct token counts, got {x.tolist()}")
        slope, intercept = np.polyfit(x, y, 1)
        return cls(step_ms=max(float(intercept), 0.0), token_ms=max(float(slope), 0.0), draft_step_ms=draft_step_ms)


def allocate_verify_budget(
    path_values: Sequence[np.ndarray], num_decoding: int, cost: VerifyCostModel, acceptance_scale: float = 1.0
) -> np.ndarray:
    """Draft nodes to verify per request, batch-wide.

    Args:
        path_values: per request, float ``[n_r]`` path values of its draft nodes (root
            excluded) in its best-first order, non-increasing.
        num_decoding: decoding requests of the step (``B`` above), with or without a tree.
        cost: the step cost model.
        acceptance_scale: ``s`` above, ``>= 0``.

    Returns:
        int64 ``[R]``: how many leading nodes of each request's list to keep.
    """
    if num_decoding < 0:
        raise ValueError(f"num_decoding = {num_decoding} must be >= 0")
    if not acceptance_scale >= 0.0:
        raise ValueError(f"acceptance_scale = {acceptance_scale!r} must be >= 0")
    counts = np.array([len(v) for v in path_values], dtype=np.int64)
    if counts.sum() == 0:
        return counts
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in path_values])
    owner = np.repeat(np.arange(len(counts)), counts)
    for r, v in enumerate(path_values):
        if np.any(np.diff(np.asarray(v, dtype=np.float64)) > 0):
            raise ValueError(f"request {r}: path values {np.asarray(v).tolist()} are not in non-increasing order")
    # Stable on equal values: a request's nodes keep their order, so each keeps a prefix.
    order = np.argsort(-values, kind="stable")
    k = np.arange(values.size + 1)
    accepted = np.concatenate([[0.0], np.cumsum(values[order])]) * acceptance_scale
    throughput = (num_decoding + accepted) / cost.step_time(num_decoding + k, k > 0)
    best = int(np.argmax(throughput))  # first maximum: ties go to fewer tokens
    return np.bincount(owner[order[:best]], minlength=len(counts)).astype(np.int64)

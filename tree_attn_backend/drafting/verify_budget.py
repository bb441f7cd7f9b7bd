"""The batch-wide verify budget: how many draft nodes of each request's tree to verify.

Every request's pruned tree lists its draft nodes best-first (non-increasing path value), so
any prefix of it is a tree. The budget merges all requests' nodes by path value and keeps the
``k`` best batch-wide, with ``k`` chosen to maximise the step's expected throughput

    (B + A(k)) / step_ms(B, k)

where ``B`` is the number of decoding requests (each yields one token without drafts),
``A(k)`` the sum of the ``k`` best node values (the expected number of accepted draft tokens:
a node's path probability times its drafter's calibration, accepted over expected tokens so
far), and ``step_ms`` the cost model below. Adding a node pays while its marginal expected
tokens exceed the marginal time times the current rate; the argmax over every ``k`` also
covers the fixed cost of drafting at all.

With few requests, ``B + k`` tokens cost little more than ``B`` (the step is bound by reading
the weights) and the budget keeps the per-request pruned trees whole. As the batch grows every
extra token costs compute, so the budget shrinks trees, then drops drafts altogether: its
expected throughput is never below the no-draft choice ``k = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tree_attn_backend.ragged import segment_ids


@dataclass(frozen=True)
class VerifyCostModel:
    """Time of one forward step, in milliseconds, for ``B`` plain query tokens (decodes,
    prefill chunks) and ``k`` draft tokens:
    ``step_ms + token_ms * B + draft_token_ms * k + draft_step_ms * [k > 0]``.

    Attributes:
        step_ms: fixed cost of a step (reading the weights, launching, sampling).
        token_ms: cost of each plain query token (linear layers, attention).
        draft_token_ms: cost of each draft token (the same layers, masked tree attention).
        draft_step_ms: fixed extra cost of a step that verifies drafts (tree masks and
            attention plan, verification, KV compaction, drafting).
    """

    step_ms: float
    token_ms: float
    draft_token_ms: float
    draft_step_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("step_ms", "token_ms", "draft_token_ms", "draft_step_ms"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < math.inf:
                raise ValueError(f"cost model {name} = {value!r}: must be a finite number >= 0")
        if self.step_ms + self.token_ms <= 0.0:
            raise ValueError(f"cost model step_ms = {self.step_ms} and token_ms = {self.token_ms}: one must be > 0")

    def step_time(self, num_plain: int | np.ndarray, num_draft: int | np.ndarray) -> np.ndarray:
        """Vectorised step time (ms)."""
        num_draft = np.asarray(num_draft)
        return (
            self.step_ms
            + self.token_ms * np.asarray(num_plain)
            + self.draft_token_ms * num_draft
            + self.draft_step_ms * (num_draft > 0)
        )

    @classmethod
    def fit(cls, num_tokens: Sequence[int], step_ms: Sequence[float]) -> VerifyCostModel:
        """Least-squares line through measured plain ``(num_tokens, step_ms)`` points (two or
        more distinct token counts), clamped to non-negative coefficients; draft tokens are
        assumed to cost what plain ones do until measured (:class:`OnlineCostFit`)."""
        x = np.asarray(num_tokens, dtype=np.float64)
        y = np.asarray(step_ms, dtype=np.float64)
        if x.shape != y.shape or np.unique(x).size < 2:
            raise ValueError(f"need step times at two or more distinct token counts, got {x.tolist()}")
        slope, intercept = np.polyfit(x, y, 1)
        token_ms = max(float(slope), 0.0)
        return cls(step_ms=max(float(intercept), 0.0), token_ms=token_ms, draft_token_ms=token_ms)


class OnlineCostFit:
    """The cost model refitted from served steps: ridge least squares of step time on
    ``[1, plain tokens, draft tokens, has drafts]``, pulled toward a prior model (measured at
    start-up) with weight ``prior_weight``, old steps decaying by ``decay`` per step. While no
    step verifies drafts the draft terms drift back to the prior, so the budget tries drafts
    again now and then (and notices when they start to pay)."""

    def __init__(self, prior: VerifyCostModel, decay: float = 0.995, prior_weight: float = 1.0) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay = {decay}: must be in (0, 1]")
        self.prior = prior
        self.decay = decay
        self.theta0 = np.array([prior.step_ms, prior.token_ms, prior.draft_token_ms, prior.draft_step_ms])
        self.ridge = prior_weight * np.eye(4)
        self.reset()

    def reset(self) -> None:
        """Forget every observed step: the fit is the prior again."""
        self.xtx = np.zeros((4, 4))
        self.xty = np.zeros(4)

    def observe(self, num_plain: int, num_draft: int, step_ms: float) -> None:
        x = np.array([1.0, num_plain, num_draft, float(num_draft > 0)])
        self.xtx = self.decay * self.xtx + np.outer(x, x)
        self.xty = self.decay * self.xty + x * step_ms

    def model(self) -> VerifyCostModel:
        theta = np.linalg.solve(self.xtx + self.ridge, self.xty + self.ridge @ self.theta0)
        step, token, draft_token, draft_step = np.maximum(theta, 0.0).tolist()
        if step + token <= 0.0:
            return self.prior
        return VerifyCostModel(step, token, draft_token, draft_step)


def _expected_throughput(
    num_decoding: int, accepted: np.ndarray, num_draft: np.ndarray, cost: VerifyCostModel
) -> np.ndarray:
    """Expected tokens per ms of a step with ``num_draft`` draft tokens expected to yield
    ``accepted`` accepted ones (vectorised over both)."""
    return (num_decoding + accepted) / cost.step_time(num_decoding, num_draft)


def drafts_can_pay(
    num_decoding: int, max_draft_tokens: int, cost: VerifyCostModel, acceptance_scale: float = 1.0
) -> bool:
    """Whether any draft of up to ``max_draft_tokens`` tokens could raise expected throughput
    over no draft, even if every node were certain (path value 1). The throughput is monotone
    in the token count beyond the first, so one token and the largest draft decide."""
    k = np.array([0, 1, max(max_draft_tokens, 1)])
    throughput = _expected_throughput(num_decoding, acceptance_scale * k, k, cost)
    return bool(throughput[1:].max() > throughput[0])


def min_kept_value(num_decoding: int, cost: VerifyCostModel) -> float:
    """A lower bound on the value of every node :func:`allocate_verify_budget` keeps in a step
    of ``num_decoding`` requests, whatever the trees: ``d * B / (T(B, 0) + d + s)`` with ``d``
    the draft token cost, ``s`` the draft step cost and ``T(B, 0)`` the step without drafts.
    Drafters need not grow nodes below it (the budget's choice is the same without them).

    Why: the budget keeps the ``k*`` best nodes, ``k*`` the first argmax over ``k >= 0`` of
    ``r(k) = (B + A(k)) / T(B, k)``. On ``k >= 1``, ``A`` is concave (values non-increasing) and
    ``T`` affine, so ``r`` is quasi-concave: for ``1 <= j <= k*``, ``r(j) >= min(r(1), r(k*)) >=
    min(r(1), r(0)) >= B / T(B, 1)``. The last kept node pays for itself: ``v >= d * r(k* - 1)``
    when ``k* >= 2``, ``v >= (d + s) * B / T(B, 0)`` when ``k* = 1``; both are at least the bound.
    """
    if num_decoding < 0:
        raise ValueError(f"num_decoding = {num_decoding} must be >= 0")
    no_draft_ms = float(cost.step_time(num_decoding, 0))
    return cost.draft_token_ms * num_decoding / (no_draft_ms + cost.draft_token_ms + cost.draft_step_ms)


def allocate_verify_budget(path_values: Sequence[np.ndarray], num_decoding: int, cost: VerifyCostModel) -> np.ndarray:
    """Draft nodes to verify per request, batch-wide.

    Args:
        path_values: per request, float ``[n_r]`` expected accepted tokens of its draft nodes
            (calibrated path values, root excluded) in its best-first order, non-increasing.
        num_decoding: decoding requests of the step (``B`` above), with or without a tree.
        cost: the step cost model.

    Returns:
        int64 ``[R]``: how many leading nodes of each request's list to keep.
    """
    if num_decoding < 0:
        raise ValueError(f"num_decoding = {num_decoding} must be >= 0")
    counts = np.array([len(v) for v in path_values], dtype=np.int64)
    if counts.sum() == 0:
        return counts
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in path_values])
    owner = segment_ids(counts)
    for r, v in enumerate(path_values):
        if np.any(np.diff(np.asarray(v, dtype=np.float64)) > 0):
            raise ValueError(f"request {r}: path values {np.asarray(v).tolist()} are not in non-increasing order")
    # Stable on equal values: a request's nodes keep their order, so each keeps a prefix.
    order = np.argsort(-values, kind="stable")
    k = np.arange(values.size + 1)
    accepted = np.concatenate([[0.0], np.cumsum(values[order])])
    best = int(
        np.argmax(_expected_throughput(num_decoding, accepted, k, cost))
    )  # first maximum: ties go to fewer tokens
    return np.bincount(owner[order[:best]], minlength=len(counts)).astype(np.int64)

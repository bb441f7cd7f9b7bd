"""How far a drafter's probabilities are from what the target accepts.

A node is *tested* when the target accepted its parent: it then accepts at most one of the
node's children, each with (ideally) the child's draft probability. Summed over tested
nodes, predicted and accepted counts give a drafter's calibration factor; summed over every
verified node's path value (the probability that the whole path is accepted), expected and
accepted tokens per step.
"""

from __future__ import annotations

import numpy as np


class DecayedRatio:
    """``(sum of numerators + prior) / (sum of denominators + prior)``, old observations
    decaying by ``decay`` per update: a calibration factor that starts at 1 and follows drift.
    With ``decay = 0.98`` the last ~50 updates carry most of the weight."""

    def __init__(self, decay: float = 0.98, prior: float = 16.0) -> None:
        if not 0.0 < decay <= 1.0 or not prior > 0.0:
            raise ValueError(f"decay = {decay}, prior = {prior}: need 0 < decay <= 1 and prior > 0")
        self.decay, self.num, self.den = decay, prior, prior
        self.observed_num, self.observed_den = 0.0, 0.0  # undecayed totals, for reports

    def update(self, numerator: float, denominator: float) -> None:
        self.num = self.decay * self.num + numerator
        self.den = self.decay * self.den + denominator
        self.observed_num += numerator
        self.observed_den += denominator

    @property
    def value(self) -> float:
        return self.num / self.den


class BinnedCalibration:
    """A source's draft probability mapped to what the target accepts: the probabilities are
    split into ``num_bins`` equal bins, each with its own :class:`DecayedRatio` of accepted over
    predicted on the tested nodes whose probability fell in it, and ``calibrate(p) = min(1, p *
    ratio of p's bin)``. One factor for all probabilities would let the many weak candidates
    set the discount of the few sure ones (a copied answer's next token), and a path's value
    multiplies that discount at every depth."""

    def __init__(self, num_bins: int = 10, decay: float = 0.98, prior: float = 4.0) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins = {num_bins!r}: must be an integer >= 1")
        self.bins = [DecayedRatio(decay, prior) for _ in range(num_bins)]

    def _bin(self, probs: np.ndarray) -> np.ndarray:
        return np.minimum((probs * len(self.bins)).astype(np.int64), len(self.bins) - 1)

    def calibrate(self, prob: float) -> float:
        """The calibrated probability of a draft probability ``prob`` in ``[0, 1]``."""
        return min(1.0, prob * self.bins[min(int(prob * len(self.bins)), len(self.bins) - 1)].value)

    def update(self, probs: np.ndarray, accepted: np.ndarray) -> None:
        """Tested nodes: float ``[n]`` their draft probabilities in ``[0, 1]``, bool ``[n]``
        whether the target accepted each; every bin that holds one of them is updated."""
        probs = np.asarray(probs, dtype=np.float64)
        bins = self._bin(probs)
        predicted = np.bincount(bins, weights=probs, minlength=len(self.bins))
        hits = np.bincount(bins, weights=np.asarray(accepted, dtype=np.float64), minlength=len(self.bins))
        for b in np.flatnonzero(np.bincount(bins, minlength=len(self.bins))).tolist():
            self.bins[b].update(float(hits[b]), float(predicted[b]))


class ReliabilityCounts:
    """Verified draft nodes bucketed by their predicted acceptance (a calibrated path value in
    ``[0, 1]``): per bucket the nodes, the sum of their predictions and how many the target
    accepted. ``expected`` vs ``accepted`` is the drafter's calibration over everything
    recorded; the buckets are a reliability diagram (predicted vs realised acceptance)."""

    def __init__(self, num_buckets: int = 10) -> None:
        if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
            raise ValueError(f"num_buckets = {num_buckets!r}: must be an integer >= 1")
        self.nodes = np.zeros(num_buckets, dtype=np.int64)
        self.predicted = np.zeros(num_buckets, dtype=np.float64)
        self.accepted = np.zeros(num_buckets, dtype=np.int64)

    def add(self, predicted: np.ndarray, accepted: np.ndarray) -> None:
        """``predicted``: float ``[n]`` in ``[0, 1]``; ``accepted``: bool ``[n]``, whether the
        target accepted each node."""
        predicted = np.asarray(predicted, dtype=np.float64)
        accepted = np.asarray(accepted, dtype=bool)
        if predicted.shape != accepted.shape or predicted.ndim != 1:
            raise ValueError(f"predicted {predicted.shape} and accepted {accepted.shape} must be equal 1-D shapes")
        if predicted.size and not (predicted.min() >= 0.0 and predicted.max() <= 1.0):
            raise ValueError(f"predicted values in [{predicted.min()}, {predicted.max()}]: must lie in [0, 1]")
        buckets = np.minimum((predicted * self.nodes.size).astype(np.int64), self.nodes.size - 1)
        self.nodes += np.bincount(buckets, minlength=self.nodes.size)
        self.predicted += np.bincount(buckets, weights=predicted, minlength=self.nodes.size)
        self.accepted += np.bincount(buckets, weights=accepted, minlength=self.nodes.size).astype(np.int64)

    @property
    def expected(self) -> float:
        return float(self.predicted.sum())

    @property
    def num_accepted(self) -> int:
        return int(self.accepted.sum())

    def to_dict(self) -> dict:
        """Plain lists (JSON): ``nodes``, ``predicted`` (sums), ``accepted`` per bucket, and the
        totals ``expected`` and ``num_accepted``."""
        return {
            "nodes": self.nodes.tolist(),
            "predicted": self.predicted.round(4).tolist(),
            "accepted": self.accepted.tolist(),
            "expected": round(self.expected, 3),
            "num_accepted": self.num_accepted,
        }

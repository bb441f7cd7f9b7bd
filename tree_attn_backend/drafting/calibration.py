"""How far a drafter's probabilities are from what the target accepts.

A node's path value is the drafter's probability that the target accepts the whole path to
it; a node is *tested* when the target accepted its parent, and then accepts it with (ideally)
its own draft probability. :class:`IsotonicCalibration` maps either kind of probability to
what the target accepted (path values of verified nodes for a drafter, a source's own
probabilities of tested nodes for the hybrid); :class:`ReliabilityCounts` keeps the calibrated
predictions of verified nodes against the outcome, expected and accepted tokens per step.
"""

from __future__ import annotations

import numpy as np


def probability_bins(probs: np.ndarray, num_bins: int) -> np.ndarray:
    """int64 bin of each probability in ``[0, 1]`` among ``num_bins`` equal bins (1 falls in
    the last)."""
    return np.minimum((probs * num_bins).astype(np.int64), num_bins - 1)


class IsotonicCalibration:
    """A drafter's probability mapped to how often the target accepts: a non-decreasing,
    piecewise-linear map fit online.

    Observed nodes (a probability and whether the target accepted the node) fall into
    ``num_bins`` equal probability bins, kept as decayed counts (``decay`` per update, so the
    map follows drift). Each bin's acceptance rate is shrunk toward the drafter's overall ratio
    of accepted to predicted (``prior`` pseudo-nodes at the bin's middle probability, accepted
    at that ratio; the ratio itself starts at 1 with ``prior`` pseudo-nodes), so a bin with
    few nodes says what the drafter says on the whole, and one with many says what it says
    there. The rates are made non-decreasing across bins by pooling adjacent violators
    (isotonic regression, weighted by the counts); the map interpolates linearly through
    ``(0, 0)``, every bin's ``(mean probability, pooled rate)`` and ``(1, last rate / last
    mean)``. Monotone, so path values that never increase along a tree stay so.
    """

    def __init__(self, num_bins: int = 10, decay: float = 0.99, prior: float = 4.0) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins = {num_bins!r}: must be an integer >= 1")
        if not 0.0 < decay <= 1.0 or not prior > 0.0:
            raise ValueError(f"decay = {decay}, prior = {prior}: need 0 < decay <= 1 and prior > 0")
        self.decay, self.prior = decay, prior
        self.middles = (np.arange(num_bins) + 0.5) / num_bins
        # Observed (decayed) per bin: nodes, sum of their probabilities, accepted nodes.
        self.nodes = np.zeros(num_bins)
        self.predicted = np.zeros(num_bins)
        self.accepted = np.zeros(num_bins)
        self._fit()

    def _fit(self) -> None:
        ratio = (self.accepted.sum() + self.prior) / (self.predicted.sum() + self.prior)
        weights = self.nodes + self.prior
        rates = (self.accepted + self.prior * self.middles * ratio) / weights
        # Pool adjacent violators: blocks of bins with one rate, merged while a rate decreases.
        block_rates: list[float] = []
        block_weights: list[float] = []
        block_sizes: list[int] = []
        for rate, weight in zip(rates.tolist(), weights.tolist()):
            block_rates.append(rate)
            block_weights.append(weight)
            block_sizes.append(1)
            while len(block_rates) > 1 and block_rates[-2] > block_rates[-1]:
                w = block_weights[-2] + block_weights[-1]
                r = (block_rates[-2] * block_weights[-2] + block_rates[-1] * block_weights[-1]) / w
                size = block_sizes[-2] + block_sizes[-1]
                del block_rates[-1], block_weights[-1], block_sizes[-1]
                block_rates[-1], block_weights[-1], block_sizes[-1] = r, w, size
        pooled = np.repeat(block_rates, block_sizes)
        means = (self.predicted + self.prior * self.middles) / weights  # in (0, 1)
        # Beyond the last bin's mean, the last bin's ratio carries on to probability 1.
        self.knots_x = np.concatenate([[0.0], means, [1.0]])
        self.knots_y = np.minimum(np.concatenate([[0.0], pooled, [pooled[-1] / means[-1]]]), 1.0)

    def calibrate(self, probs: np.ndarray | float) -> np.ndarray:
        """Calibrated values of draft probabilities in ``[0, 1]`` (same shape, float64)."""
        return np.interp(probs, self.knots_x, self.knots_y)

    def min_prob_for(self, value: float) -> float:
        """The smallest probability whose calibrated value is at least ``value`` (``inf``
        when none is)."""
        if value <= 0.0:
            return 0.0
        above = np.flatnonzero(self.knots_y >= value)
        if above.size == 0:
            return float("inf")
        i = int(above[0])  # >= 1: knots_y[0] = 0 < value
        x0, x1, y0, y1 = self.knots_x[i - 1], self.knots_x[i], self.knots_y[i - 1], self.knots_y[i]
        return float(x0 + (x1 - x0) * (value - y0) / (y1 - y0))

    def update(self, probs: np.ndarray, accepted: np.ndarray) -> None:
        """Observed nodes: float ``[n]`` their probabilities in ``[0, 1]``, bool ``[n]``
        whether the target accepted each."""
        probs = np.asarray(probs, dtype=np.float64)
        if probs.size == 0:
            return
        n = self.nodes.size
        bins = probability_bins(probs, n)
        self.nodes = self.decay * self.nodes + np.bincount(bins, minlength=n)
        self.predicted = self.decay * self.predicted + np.bincount(bins, weights=probs, minlength=n)
        hits = np.asarray(accepted, dtype=np.float64)
        self.accepted = self.decay * self.accepted + np.bincount(bins, weights=hits, minlength=n)
        self._fit()


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
        buckets = probability_bins(predicted, self.nodes.size)
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

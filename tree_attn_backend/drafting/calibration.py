"""How far a drafter's probabilities are from what the target accepts.

A node is *tested* when the target accepted its parent: it then accepts at most one of the
node's children, each with (ideally) the child's draft probability. Summed over tested
nodes, predicted and accepted counts give a drafter's calibration factor; summed over every
verified node's path value (the probability that the whole path is accepted), expected and
accepted tokens per step.
"""

from __future__ import annotations


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

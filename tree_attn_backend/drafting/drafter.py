"""Drafters: anything that, given a request's tokens so far, proposes likely next tokens.

The same expansion + pruning code (:mod:`tree_attn_backend.drafting.pruning`) serves every drafter.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Drafter(Protocol):
    """Proposes candidate children for one tree node.

    ``propose_children(context, num_children)`` gets the request's tokens up to and including
    the node's own token and returns at most ``num_children`` ``(token, probability)`` pairs,
    most likely first, with distinct tokens and probabilities in ``[0, 1]`` summing to at most 1.
    An empty list means "no idea": the node gets no children.
    """

    def propose_children(self, context: Sequence[int], num_children: int) -> list[tuple[int, float]]: ...


def as_sub_distribution(probs: np.ndarray) -> np.ndarray:
    """float64 copy of ``probs`` (``[..., k]``: rows of sibling probabilities rounded one by one,
    e.g. float32 values from a softmax) with every row summing above 1 scaled back to 1: rounding
    can push a peaked row's sum a few ulps over, and siblings are a sub-distribution."""
    rows = np.asarray(probs, dtype=np.float64)
    return rows / np.maximum(rows.sum(axis=-1, keepdims=True), 1.0)


class SyntheticDrafter:
    """A deterministic drafter for tests and benchmarks with controllable confidence.

    The candidates after a context depend only on its last ``window`` tokens (a stable hash),
    so the same context always gets the same children. The rank-``r`` child has probability
    ``c * (1 - c) ** r`` where ``c`` is ``confidence``, or, when ``confidence`` is a
    ``(low, high)`` range, a value in that range chosen per context by the hash (so trees of
    one batch differ in size under the same pruning policy).
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        confidence: float | tuple[float, float] = 0.6,
        seed: int = 0,
        window: int = 4,
    ) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size = {vocab_size} must be >= 2")
        low, high = (confidence, confidence) if isinstance(confidence, (int, float)) else confidence
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"confidence = {confidence!r} must lie in (0, 1] (a value or a (low, high) range)")
        if window < 1:
            raise ValueError(f"window = {window} must be >= 1")
        self.vocab_size = vocab_size
        self.low, self.high = float(low), float(high)
        self.seed = seed
        self.window = window

    def propose_children(self, context: Sequence[int], num_children: int) -> list[tuple[int, float]]:
        tail = np.asarray(list(context)[-self.window :], dtype=np.int64)
        digest = zlib.crc32(tail.tobytes(), self.seed & 0xFFFFFFFF)
        rng = np.random.default_rng(digest)
        c = self.low + (self.high - self.low) * rng.random()
        k = min(num_children, self.vocab_size)
        tokens = rng.choice(self.vocab_size, size=k, replace=False)
        return [(int(t), c * (1.0 - c) ** r) for r, t in enumerate(tokens)]

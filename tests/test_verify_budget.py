"""The batch-wide verify budget against brute force over every per-request prefix choice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tree_attn_backend.verify_budget import VerifyCostModel, allocate_verify_budget


def _throughput(values: list[np.ndarray], keep: tuple[int, ...], num_decoding: int, cost: VerifyCostModel, scale: float) -> float:
    accepted = sum(float(np.sum(v[:k])) for v, k in zip(values, keep))
    tokens = sum(keep)
    return (num_decoding + scale * accepted) / (cost.step_ms + cost.token_ms * (num_decoding + tokens) + cost.draft_step_ms * (tokens > 0))


path_values = st.lists(
    st.lists(st.floats(0.0, 1.0), max_size=4).map(lambda v: np.sort(np.array(v, dtype=np.float64))[::-1].copy()),
    min_size=1,
    max_size=4,
)
costs = st.builds(VerifyCostModel, st.floats(0.0, 100.0), st.floats(0.01, 10.0), st.floats(0.0, 20.0))


@settings(max_examples=150, deadline=None)
@given(path_values, st.integers(0, 8), costs, st.floats(0.0, 2.0))
def test_budget_is_optimal_over_all_prefix_choices(values, extra_decoding, cost, scale):
    num_decoding = len(values) + extra_decoding
    keep = allocate_verify_budget(values, num_decoding, cost, scale)
    assert keep.dtype == np.int64 and keep.shape == (len(values),)
    assert all(0 <= k <= len(v) for k, v in zip(keep.tolist(), values))
    best = max(_throughput(values, choice, num_decoding, cost, scale)
               for choice in itertools.product(*[range(len(v) + 1) for v in values]))
    assert _throughput(values, tuple(keep.tolist()), num_decoding, cost, scale) >= best * (1 - 1e-9)
    assert _throughput(values, tuple(keep.tolist()), num_decoding, cost, scale) >= _throughput(
        values, (0,) * len(values), num_decoding, cost, scale) * (1 - 1e-12)


def test_budget_shrinks_trees_then_drafts_as_the_batch_grows():
    cost = VerifyCostModel(step_ms=40.0, token_ms=0.5, draft_step_ms=1.0)
    tree = np.array([0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05])
    kept = [int(allocate_verify_budget([tree] * b, b, cost).sum()) / b for b in (1, 4, 16, 64, 256, 1024)]
    assert kept[0] == len(tree)  # one request: the step is weight-bound, the whole tree pays
    assert all(a >= b for a, b in zip(kept, kept[1:]))  # per-request trees shrink smoothly...
    assert kept[-1] == 0  # ...down to no drafts when every token costs compute


def test_cost_model_fit_and_errors():
    fitted = VerifyCostModel.fit([1, 8, 32, 64], [21.0, 28.0, 52.0, 84.0])
    assert fitted.step_ms == pytest.approx(20.0) and fitted.token_ms == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"two or more distinct token counts, got \[8.0, 8.0\]"):
        VerifyCostModel.fit([8, 8], [1.0, 2.0])
    with pytest.raises(ValueError, match="token_ms = -1"):
        VerifyCostModel(1.0, -1.0)
    with pytest.raises(ValueError, match="not in non-increasing order"):
        allocate_verify_budget([np.array([0.1, 0.5])], 1, VerifyCostModel(1.0, 1.0))
    with pytest.raises(ValueError, match="num_decoding = -1"):
        allocate_verify_budget([np.array([0.5])], -1, VerifyCostModel(1.0, 1.0))

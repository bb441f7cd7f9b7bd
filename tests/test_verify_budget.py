"""The batch-wide verify budget against brute force over every per-request prefix choice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tree_attn_backend.drafting.verify_budget import (
    OnlineCostFit,
    VerifyCostModel,
    allocate_verify_budget,
    min_kept_value,
)


def _throughput(
    values: list[np.ndarray], keep: tuple[int, ...], num_decoding: int, cost: VerifyCostModel, scale: float
) -> float:
    accepted = sum(float(np.sum(v[:k])) for v, k in zip(values, keep))
    tokens = sum(keep)
    time = (
        cost.step_ms + cost.token_ms * num_decoding + cost.draft_token_ms * tokens + cost.draft_step_ms * (tokens > 0)
    )
    return (num_decoding + scale * accepted) / time


path_values = st.lists(
    st.lists(st.floats(0.0, 1.0), max_size=4).map(lambda v: np.sort(np.array(v, dtype=np.float64))[::-1].copy()),
    min_size=1,
    max_size=4,
)
costs = st.builds(
    VerifyCostModel, st.floats(0.0, 100.0), st.floats(0.01, 10.0), st.floats(0.0, 20.0), st.floats(0.0, 20.0)
)


@settings(max_examples=150, deadline=None)
@given(path_values, st.integers(0, 8), costs, st.floats(0.0, 2.0))
def test_budget_is_optimal_over_all_prefix_choices(values, extra_decoding, cost, scale):
    num_decoding = len(values) + extra_decoding
    keep = allocate_verify_budget([v * scale for v in values], num_decoding, cost)  # calibrated values
    assert keep.dtype == np.int64 and keep.shape == (len(values),)
    assert all(0 <= k <= len(v) for k, v in zip(keep.tolist(), values))
    best = max(
        _throughput(values, choice, num_decoding, cost, scale)
        for choice in itertools.product(*[range(len(v) + 1) for v in values])
    )
    assert _throughput(values, tuple(keep.tolist()), num_decoding, cost, scale) >= best * (1 - 1e-9)
    assert _throughput(values, tuple(keep.tolist()), num_decoding, cost, scale) >= _throughput(
        values, (0,) * len(values), num_decoding, cost, scale
    ) * (1 - 1e-12)


@settings(max_examples=300, deadline=None)
@given(path_values, st.integers(0, 8), costs)
def test_budget_keeps_no_node_below_its_floor(values, extra_decoding, cost):
    num_decoding = len(values) + extra_decoding
    keep = allocate_verify_budget(values, num_decoding, cost)
    kept = np.concatenate([v[:k] for v, k in zip(values, keep.tolist())])
    floor = min_kept_value(num_decoding, cost)
    assert np.all(kept >= floor * (1 - 1e-12))
    # Growing only the nodes at or above the floor changes nothing.
    above = [v[v >= floor * (1 - 1e-12)] for v in values]
    np.testing.assert_array_equal(allocate_verify_budget(above, num_decoding, cost), keep)


def test_budget_shrinks_trees_then_drafts_as_the_batch_grows():
    cost = VerifyCostModel(step_ms=40.0, token_ms=0.5, draft_token_ms=0.5, draft_step_ms=1.0)
    tree = np.array([0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05])
    kept = [int(allocate_verify_budget([tree] * b, b, cost).sum()) / b for b in (1, 4, 16, 64, 256, 1024)]
    assert kept[0] == len(tree)  # one request: the step is weight-bound, the whole tree pays
    assert all(a >= b for a, b in zip(kept, kept[1:]))  # per-request trees shrink smoothly...
    assert kept[-1] == 0  # ...down to no drafts when every token costs compute


def test_cost_model_fit_and_errors():
    fitted = VerifyCostModel.fit([1, 8, 32, 64], [21.0, 28.0, 52.0, 84.0])
    assert fitted.step_ms == pytest.approx(20.0) and fitted.token_ms == pytest.approx(1.0) == fitted.draft_token_ms
    with pytest.raises(ValueError, match=r"two or more distinct token counts, got \[8.0, 8.0\]"):
        VerifyCostModel.fit([8, 8], [1.0, 2.0])
    with pytest.raises(ValueError, match="token_ms = -1"):
        VerifyCostModel(1.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="not in non-increasing order"):
        allocate_verify_budget([np.array([0.1, 0.5])], 1, VerifyCostModel(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="num_decoding = -1"):
        allocate_verify_budget([np.array([0.5])], -1, VerifyCostModel(1.0, 1.0, 1.0))


def test_online_fit_recovers_the_served_cost_and_starts_at_the_prior():
    prior = VerifyCostModel(step_ms=30.0, token_ms=2.0, draft_token_ms=2.0)
    fit = OnlineCostFit(prior)
    assert fit.model() == prior
    truth = VerifyCostModel(step_ms=50.0, token_ms=4.0, draft_token_ms=9.0, draft_step_ms=12.0)
    rng = np.random.default_rng(0)
    for _ in range(400):
        plain, draft = int(rng.integers(1, 17)), int(rng.integers(0, 3)) * int(rng.integers(0, 20))
        fit.observe(plain, draft, float(truth.step_time(plain, draft)) + rng.normal(0, 0.5))
    got = fit.model()
    for name in ("step_ms", "token_ms", "draft_token_ms", "draft_step_ms"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=0.05, abs=0.5), name
    with pytest.raises(ValueError, match="decay = 0"):
        OnlineCostFit(prior, decay=0)

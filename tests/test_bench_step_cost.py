"""``tree-pruned bench step-cost``: the quick run through real engines (stock, stock with
synthetic chains, TREE_PRUNED with synthetic chains and trees), its fit and its shapes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tree_attn_backend.bench.step_cost import StepCostConfig, check_targets, fit_step_ms, summarize
from tree_attn_backend.bench.step_cost_engine import synthetic_parents
from tree_attn_backend.drafting.tree import DraftTree

KEYS = {
    "plain_token_ms",
    "chain_draft_token_ms",
    "tree_draft_token_ms",
    "tree_chain_draft_token_ms",
    "tree_vs_chain",
    "no_draft_step_ratio",
    "no_draft_step_ratio_by_batch",
    "no_draft_median_ratio_by_batch",
    "fits",
    "config",
    "cells",
}


@pytest.mark.engine
def test_quick_step_cost_run():
    """Three engine processes run twice, their steps interleaved; every cell's drafts are checked by the engine side
    before each timed step (it raises when a request carries another number of drafts)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tree_attn_backend.cli", "bench", "step-cost", "--quick", "--repeat", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout)
    assert KEYS <= set(result)
    cells = {(c["engine"], c["batch_size"], c["draft_tokens"], c["shape"]): c for c in result["cells"]}
    expected = {("stock", b, 0, "chain") for b in (1, 4)}
    expected |= {("stock_chain", b, d, "chain") for b in (1, 4) for d in (0, 4)}
    expected |= {("tree", b, d, s) for b in (1, 4) for d, s in ((0, "chain"), (4, "chain"), (4, "tree"))}
    assert set(cells) == expected
    for cell in result["cells"]:
        assert cell["steps"] == 16  # 4 timed steps, forwards and backwards, in each of 2 repetitions
        assert 0 < cell["min_ms"] <= cell["median_ms"] <= cell["max_ms"]
    assert all(math.isfinite(v) for fit in result["fits"].values() for v in fit.values())
    assert result["tree_vs_chain"] == pytest.approx(result["tree_draft_token_ms"] / result["chain_draft_token_ms"])
    medians = result["no_draft_median_ratio_by_batch"]
    assert medians["1"] == pytest.approx(
        cells[("tree", 1, 0, "chain")]["median_ms"] / cells[("stock", 1, 0, "chain")]["median_ms"]
    )
    assert set(result["no_draft_step_ratio_by_batch"]) == {"1", "4"}
    assert [statement.split(" =")[0] for statement, _ in check_targets(result)] == [
        "tree_vs_chain",
        "no_draft_step_ratio",
    ]


def test_fit_recovers_the_cost_model():
    fixed, plain, draft = 5.0, 2.0, 0.7
    points = [(b, d, fixed + plain * b + draft * b * d) for b in (1, 4, 16) for d in (0, 2, 8)]
    fit = fit_step_ms(points)
    assert fit == pytest.approx({"fixed_ms": fixed, "plain_ms": plain, "draft_ms": draft})
    assert set(fit_step_ms([(b, 0, fixed + plain * b) for b in (1, 4)])) == {"fixed_ms", "plain_ms"}


def test_no_draft_ratio_pairs_the_rounds():
    """The engines step in turns, one round after another: a round where the host is slow for
    both counts once, as its ratio, instead of moving one engine's median."""
    rounds = {"stock": [10.0, 10.0, 30.0], "tree": [10.5, 31.5, 31.5]}  # the second round ran slow for tree only
    cells = [
        {"engine": e, "batch_size": b, "draft_tokens": 0, "shape": "chain", "step_ms": [t * b for t in ms]}
        for e, ms in rounds.items()
        for b in (1, 4)
    ]
    cells += [
        {"engine": e, "batch_size": b, "draft_tokens": d, "shape": s, "step_ms": [10.0 * b + d]}
        for e, shapes in (("stock_chain", ("chain",)), ("tree", ("chain", "tree")))
        for s in shapes
        for b in (1, 4)
        for d in ((0, 4) if e == "stock_chain" else (4,))
    ]
    result = summarize(cells, StepCostConfig(model="m", batch_sizes=(1, 4), draft_tokens=(4,)))
    assert result["no_draft_step_ratio"] == pytest.approx(1.05)
    assert result["no_draft_step_ratio_by_batch"] == pytest.approx({"1": 1.05, "4": 1.05})
    assert result["no_draft_median_ratio_by_batch"] == pytest.approx({"1": 3.15, "4": 3.15})


@pytest.mark.parametrize("draft_tokens", [0, 1, 2, 5, 16])
def test_synthetic_shapes_are_trees_of_the_requested_size(draft_tokens):
    chain = DraftTree(
        parents=synthetic_parents(draft_tokens, "chain"),
        tokens=np.arange(draft_tokens + 1),
        probs=np.ones(draft_tokens + 1),
    )
    tree = DraftTree(
        parents=synthetic_parents(draft_tokens, "tree"),
        tokens=np.arange(draft_tokens + 1),
        probs=np.ones(draft_tokens + 1),
    )
    assert chain.num_draft_tokens == tree.num_draft_tokens == draft_tokens
    assert int(chain.depths.max()) == draft_tokens
    assert int(tree.depths.max()) == int(np.floor(np.log2(draft_tokens + 1)))  # a full binary tree's depth
    with pytest.raises(ValueError, match="shape = 'star'"):
        synthetic_parents(2, "star")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_sizes": (4,)}, "two batch sizes"),
        ({"batch_sizes": (0, 4)}, "batch_sizes"),
        ({"draft_tokens": (0, 4)}, "draft_tokens"),
        ({"timed_steps": 0}, "timed_steps = 0"),
        ({"repeat": 0}, "repeat = 0"),
    ],
)
def test_config_errors_name_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        StepCostConfig(model="m", **options)

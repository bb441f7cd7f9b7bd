import numpy as np
import pytest

from tree_attn_backend.drafting.drafter import SyntheticDrafter
from tree_attn_backend.drafting.pruning import PruningPolicy, expand_and_prune
from tree_attn_backend.drafting.tree_shape import TreeShape

SHAPE = TreeShape.full([4, 3, 2, 2, 1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_node_prob": 1.5}, "min_node_prob = 1.5"),
        ({"min_path_prob": -0.1}, "min_path_prob = -0.1"),
        ({"max_nodes": -1}, "max_nodes = -1"),
        ({"max_depth": 2.5}, "max_depth = 2.5"),
        ({"min_node_prob": float("nan")}, "min_node_prob = nan"),
    ],
)
def test_policy_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningPolicy(**kwargs)


def test_synthetic_drafter_is_deterministic_and_validated():
    d = SyntheticDrafter(vocab_size=100, confidence=0.5, seed=3)
    assert d.propose_children([1, 2, 3, 4], 4) == d.propose_children([9, 1, 2, 3, 4], 4)  # same last 4 tokens
    children = d.propose_children([1, 2, 3], 4)
    assert len({t for t, _ in children}) == 4
    assert [p for _, p in children] == [0.5, 0.25, 0.125, 0.0625]
    with pytest.raises(ValueError, match="confidence"):
        SyntheticDrafter(confidence=0.0)


def test_confident_contexts_get_deep_narrow_trees_and_uncertain_ones_wide_shallow():
    policy = PruningPolicy(min_path_prob=0.05, max_nodes=32)
    confident, _ = expand_and_prune(SHAPE, SyntheticDrafter(confidence=0.95), [1], policy)
    unsure, _ = expand_and_prune(SHAPE, SyntheticDrafter(confidence=0.3), [1], policy)
    assert confident.depths.max() > unsure.depths.max()
    assert confident.num_nodes != unsure.num_nodes
    # Everything kept passes the threshold; nodes come best first.
    for t in (confident, unsure):
        assert (t.path_probs >= 0.05).all()
        assert np.all(np.diff(t.path_probs[1:]) <= 0)


def test_budget_and_depth_limits():
    drafter = SyntheticDrafter(confidence=0.6)
    t, idx = expand_and_prune(SHAPE, drafter, [5], PruningPolicy(max_nodes=5))
    assert t.num_draft_tokens == 5
    t, _ = expand_and_prune(SHAPE, drafter, [5], PruningPolicy(max_depth=2))
    assert t.depths.max() == 2 and t.num_nodes == 1 + 4 + 12
    t, _ = expand_and_prune(SHAPE, drafter, [5], PruningPolicy(max_nodes=0))
    assert t.num_nodes == 1 and t.tokens[0] == 5
    with pytest.raises(ValueError, match="context is empty"):
        expand_and_prune(SHAPE, drafter, [], PruningPolicy())

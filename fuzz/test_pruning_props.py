"""Expansion + pruning keeps a connected tree of exactly the nodes the policy admits."""

import numpy as np
from hypothesis import given

from tree_attn_backend.drafting.pruning import expand_and_prune

from .strategies import pruning_cases


def _full_expansion(shape, drafter, context):
    """Every node of the shape the drafter can fill, with its probability and path value
    (no pruning), by walking the shape breadth-first."""
    nodes = {0: ([], 1.0, 1.0)}  # shape index -> (draft tokens, prob, path value)
    for i in range(1, shape.num_nodes):
        parent = int(shape.parents[i])
        if parent not in nodes:
            continue
        tokens, _, value = nodes[parent]
        kids = np.flatnonzero(shape.parents == parent)  # scanned here, not the shape's child lists
        candidates = drafter.propose_children(list(context) + tokens, int(shape.ranks[kids].max()) + 1)
        rank = int(shape.ranks[i])
        if rank < len(candidates):
            token, prob = candidates[rank]
            nodes[i] = (tokens + [token], prob, value * prob)
    return nodes


@given(case=pruning_cases())
def test_pruned_tree_is_exactly_what_the_policy_admits(case):
    shape, drafter, context, policy = case
    tree, shape_index = expand_and_prune(shape, drafter, context, policy)
    # Valid, connected, topological (the DraftTree constructor checks), root = last context token.
    assert tree.tokens[0] == context[-1]
    assert shape_index[0] == 0 and len(set(shape_index.tolist())) == tree.num_nodes
    # Parent in the tree = parent in the shape.
    assert all(shape.parents[shape_index[i]] == shape_index[tree.parents[i]] for i in range(1, tree.num_nodes))
    values = tree.path_probs
    # Every prefix is the best tree of its size: path values never increase.
    assert np.all(np.diff(values[1:]) <= 0)

    full = _full_expansion(shape, drafter, context)
    kept = set(shape_index.tolist())

    def admitted(i):
        # A node is admitted when it and all its ancestors pass the thresholds.
        while i != 0:
            _, prob, value = full[i]
            if not policy.admits(prob, value, int(shape.depths[i])):
                return False
            i = int(shape.parents[i])
        return True

    candidates = [i for i in full if i != 0 and admitted(i)]
    for i in kept - {0}:
        assert i in candidates
        assert full[i][2] == values[list(shape_index).index(i)]
    budget = len(candidates) if policy.max_nodes is None else min(policy.max_nodes, len(candidates))
    assert tree.num_draft_tokens == budget
    # Dropped admitted nodes fall outside the budget: ranked after every kept node.
    worst_kept = max(((-full[i][2], i) for i in kept - {0}), default=(-np.inf, -1))
    for i in set(candidates) - kept:
        assert (-full[i][2], i) > worst_kept

import numpy as np
import pytest

from tree_attn_backend.drafting.tree import DraftTree, FlatTrees, depths_from_parents
from tree_attn_backend.drafting.tree_shape import TreeShape


def tree(parents, tokens=None, probs=None):
    n = len(parents)
    return DraftTree(
        parents=np.array(parents),
        tokens=np.arange(n) if tokens is None else np.array(tokens),
        probs=np.ones(n) if probs is None else np.array(probs, dtype=float),
    )


def test_depths_and_path_probs():
    t = tree([-1, 0, 0, 1, 3, 2], probs=[1.0, 0.5, 0.25, 0.5, 0.1, 1.0])
    assert t.depths.tolist() == [0, 1, 1, 2, 3, 2]
    assert np.allclose(t.path_probs, [1.0, 0.5, 0.25, 0.25, 0.025, 0.25])
    assert t.path_to(4) == [0, 1, 3, 4]
    assert t.num_draft_tokens == 5


def test_every_prefix_is_a_tree():
    t = tree([-1, 0, 0, 1, 3, 2])
    for n in range(1, t.num_nodes + 1):
        prefix = t.truncate(n)
        checked = DraftTree(parents=t.parents[:n], tokens=t.tokens[:n], probs=t.probs[:n])  # validated
        for name in ("parents", "tokens", "probs", "depths"):
            assert np.array_equal(getattr(prefix, name), getattr(checked, name))
            assert getattr(prefix, name).dtype == getattr(checked, name).dtype
            assert not getattr(prefix, name).flags.writeable
        assert np.array_equal(prefix.path_probs, t.path_probs[:n])
    with pytest.raises(ValueError, match="num_nodes = 0"):
        t.truncate(0)


@pytest.mark.parametrize(
    "parents, message",
    [
        ([], "empty"),
        ([0], r"parents\[0\] = 0"),
        ([-1, 0, 5], r"parents\[2\] = 5: out of range"),
        ([-1, 0, 2], r"parents\[2\] = 2: a self reference"),
        ([-1, 2, 0], r"parents\[1\] = 2: a forward reference"),
        ([-1, 0, -1], r"parents\[2\] = -1: more than one root"),
    ],
)
def test_bad_parents_name_the_index(parents, message):
    with pytest.raises(ValueError, match=message):
        tree(parents)


def test_other_validation_errors():
    with pytest.raises(ValueError, match=r"tokens has shape \(2,\), expected \(3,\)"):
        DraftTree(parents=np.array([-1, 0, 0]), tokens=np.array([1, 2]), probs=np.ones(3))
    with pytest.raises(ValueError, match=r"probs\[1\] = nan"):
        tree([-1, 0], probs=[1.0, float("nan")])
    with pytest.raises(ValueError, match="nodes 1 and 2 are siblings .* same token 7"):
        tree([-1, 0, 0], tokens=[3, 7, 7])
    with pytest.raises(ValueError, match=r"tokens\[1\] = -4 is negative"):
        tree([-1, 0], tokens=[3, -4])
    tree([-1, 0, 1], tokens=[3, 7, 7])  # same token at different depths is fine


def test_forest_depths_and_flat_trees():
    assert depths_from_parents(np.array([-1, 0, 1, -1, 3, 3])).tolist() == [0, 1, 2, 0, 1, 1]
    flat = FlatTrees.from_trees([tree([-1, 0]), tree([-1, 0, 0])])
    assert flat.global_parents().tolist() == [-1, 0, -1, 2, 2]
    assert flat.num_reqs == 2 and flat.num_nodes == 5


@pytest.mark.parametrize("branching", [[1], [3, 2, 2, 1, 1], [2, 3], [4, 1, 2]])
def test_shape_children_in_rank_order(branching):
    shape = TreeShape.full(branching)
    for node in range(shape.num_nodes):
        kids = [k for k in range(shape.num_nodes) if shape.parents[k] == node]
        expected = sorted(kids, key=lambda k: shape.ranks[k])
        assert list(shape.child_lists[node]) == expected
        assert [int(shape.ranks[k]) for k in expected] == list(range(len(expected)))  # rank r at r


def test_parse_is_shared_and_read_only():
    text = "[(0,), (1,), (0, 0)]"
    shape = TreeShape.parse(text)
    assert TreeShape.parse(text) is shape
    for array in (shape.parents, shape.ranks, shape.depths):
        assert not array.flags.writeable


def test_parse_vllm_token_tree_syntax():
    shape = TreeShape.parse("[(0,), (1,), (0,0), (0,1), (1,0), (1,1)]")
    assert shape.num_nodes == 7
    assert shape.parents.tolist() == [-1, 0, 0, 1, 1, 2, 2]
    assert shape.ranks.tolist() == [0, 0, 1, 0, 1, 0, 1]
    assert shape.max_depth == 2
    assert TreeShape.parse(shape.to_text()).paths == shape.paths
    # Order in the string does not matter: output is topological.
    assert TreeShape.parse("[(0, 0), (0,)]").paths == ((), (0,), (0, 0))
    assert TreeShape.full([2, 2]).num_nodes == 7
    assert TreeShape.chain(3).paths == ((), (0,), (0, 0), (0, 0, 0))


@pytest.mark.parametrize(
    "text, message",
    [
        ("__import__('os').system('true')", "is not a list of tuples"),
        ("[(0,), (0, 1, 2)]", r"\(0, 1, 2\) has no parent"),
        ("[(0,), (0,)]", "appears twice"),
        ("[(0,), (-1,)]", "child rank -1"),
        ("[(0,), []]", "must be a non-empty tuple"),
        ("[(0.5,)]", "child rank 0.5"),
        ("{1: 2}", "must be a list of paths"),
        ("[(0,", "is not a list of tuples"),
    ],
)
def test_bad_token_tree_strings(text, message):
    with pytest.raises(ValueError, match=message):
        TreeShape.parse(text)

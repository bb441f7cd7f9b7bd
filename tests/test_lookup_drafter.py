import pytest

from tree_attn_backend.drafting.lookup_drafter import LookupIndex
from tree_attn_backend.drafting.pruning import PruningPolicy, expand_and_prune
from tree_attn_backend.drafting.tree_shape import TreeShape


def test_counts_and_longest_suffix_wins():
    index = LookupIndex(min_n=1, max_n=3, smoothing=2.0)
    index.extend([1, 2, 3, 1, 2, 4, 1, 2, 3])
    # "1 2" was followed by 3 twice and 4 once; a two-token match: smoothing 2 / 2 -> 2/4, 1/4.
    assert index.propose_children([7, 1, 2], 2) == [(3, 0.5), (4, 0.25)]
    # "3 1 2" (length 3) was followed only by 4: smoothing 2 / 4 -> 1/1.5.
    assert index.propose_children([3, 1, 2], 2) == [(4, pytest.approx(2 / 3))]
    # "2" alone was followed by 3 twice and 4 once: smoothing 2 -> 2/5, 1/5.
    assert index.propose_children([9, 2], 2) == [(3, pytest.approx(0.4)), (4, pytest.approx(0.2))]
    assert index.propose_children([99], 3) == []
    assert len(index) == 9


def test_repetitive_text_gives_deep_trees_and_novel_text_none():
    shape = TreeShape.full([3, 2, 2, 1, 1, 1])
    policy = PruningPolicy(min_path_prob=0.1, max_nodes=16)
    repetitive = LookupIndex()
    repetitive.extend([5, 6, 7, 8, 9] * 6 + [5])
    tree, _ = expand_and_prune(shape, repetitive, repetitive.tokens, policy)
    assert tree.depths.max() == 6 and tree.tokens[1:7].tolist() == [6, 7, 8, 9, 5, 6]
    novel = LookupIndex()
    novel.extend(list(range(40)))
    tree, _ = expand_and_prune(shape, novel, novel.tokens + [1000], policy)
    assert tree.num_nodes == 1


def test_bad_settings():
    with pytest.raises(ValueError, match="min_n = 3, max_n = 2"):
        LookupIndex(min_n=3, max_n=2)
    with pytest.raises(ValueError, match="smoothing = -1"):
        LookupIndex(smoothing=-1)

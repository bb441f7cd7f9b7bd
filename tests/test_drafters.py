"""The recycle table and the hybrid drafter: bounded state, merged tries, calibration."""

import numpy as np
import pytest
import torch

from tree_attn_backend.drafting.calibration import IsotonicCalibration, ReliabilityCounts
from tree_attn_backend.drafting.hybrid_drafter import HybridDrafter
from tree_attn_backend.drafting.lookup_drafter import LookupIndex
from tree_attn_backend.drafting.pruning import PruningPolicy, expand_and_prune
from tree_attn_backend.drafting.recycle_drafter import RecycleTable
from tree_attn_backend.drafting.suffix_drafter import SuffixCache, SuffixTreeDrafter
from tree_attn_backend.drafting.tree_shape import TreeShape


def _logits(vocab: int, favourites: dict[int, float]) -> torch.Tensor:
    row = torch.full((vocab,), -30.0)
    for token, logit in favourites.items():
        row[token] = logit
    return row


def test_recycle_table_keeps_the_latest_top_k_per_token():
    table = RecycleTable(vocab_size=50, k=3)
    assert table.propose_children([7], 3) == []  # never seen
    logits = torch.stack([_logits(50, {1: 2.0, 2: 1.0}), _logits(50, {3: 5.0})])
    table.record(torch.tensor([7, 8]), logits)
    children = table.propose_children([0, 7], 3)
    assert len(children) == 3 and [t for t, _ in children[:2]] == [1, 2]  # then a near-zero third
    probs = torch.softmax(logits[0], -1)
    assert children[0][1] == pytest.approx(float(probs[1]), rel=1e-5)
    assert children[1][1] == pytest.approx(float(probs[2]), rel=1e-5)
    assert table.propose_children([8], 1) == [(3, pytest.approx(1.0, abs=1e-6))]
    table.record(torch.tensor([7]), _logits(50, {4: 3.0}).unsqueeze(0))  # a newer belief replaces it
    assert table.propose_children([7], 1)[0][0] == 4
    table.reset()
    assert table.propose_children([7], 3) == []
    assert table.next_tokens.nbytes + table.next_probs.nbytes == 50 * 3 * 8  # bounded, allocated once


def test_recycle_table_children_never_sum_above_one():
    """The table keeps float32 probabilities; a peaked row rounded one value at a time can sum a
    few ulps above 1, and its children are scaled back to a sub-distribution in float64."""
    table = RecycleTable(vocab_size=10, k=2)
    table.next_tokens[5] = [1, 2]
    table.next_probs[5] = np.array([0.7, 0.30000007], dtype=np.float32)
    assert float(table.next_probs[5].astype(np.float64).sum()) > 1.0
    (first, p1), (second, p2) = table.propose_children([5], 2)
    assert (first, second) == (1, 2) and p1 + p2 <= 1.0
    assert p1 / p2 == pytest.approx(0.7 / 0.30000007, rel=1e-6)


def test_recycle_table_rejects_bad_input_and_ignores_padding_columns():
    with pytest.raises(ValueError, match="vocab_size = 0"):
        RecycleTable(0)
    with pytest.raises(ValueError, match="k = 65"):
        RecycleTable(100, k=65)
    with pytest.raises(ValueError, match=r"k = 11: .*vocab_size = 10"):
        RecycleTable(10, k=11)
    table = RecycleTable(vocab_size=4, k=2)
    with pytest.raises(ValueError, match="do not match"):
        table.record(torch.tensor([1, 2]), torch.zeros(3, 4))
    padded = torch.tensor([[0.0, 1.0, 2.0, 3.0, 50.0]])  # column 4 is vocabulary padding
    table.record(torch.tensor([1]), padded)
    assert [t for t, _ in table.propose_children([1], 2)] == [3, 2]
    assert table.propose_children([99], 2) == []  # a token outside the vocabulary


class _Fixed:
    """A source that always proposes the same children."""

    def __init__(self, children: list[tuple[int, float]]) -> None:
        self.children = children

    def propose_children(self, context, num_children):
        return self.children[:num_children]


def test_hybrid_merges_by_token_with_noisy_or_and_keeps_children_a_distribution():
    calibration = {"a": IsotonicCalibration(), "b": IsotonicCalibration()}
    hybrid = HybridDrafter({"a": _Fixed([(5, 0.5), (6, 0.1)]), "b": _Fixed([(5, 0.4), (9, 0.1)])}, calibration)
    hybrid.start_tree([1])
    children = hybrid.propose_children([1], 3)
    assert children[0] == (5, pytest.approx(1 - 0.5 * 0.6))  # proposed by both: more likely than either
    assert dict(children[1:]) == {6: pytest.approx(0.1), 9: pytest.approx(0.1)}
    confident = HybridDrafter({"a": _Fixed([(5, 0.95)]), "b": _Fixed([(6, 0.9), (7, 0.5)])}, calibration)
    confident.start_tree([1])
    # The most likely child keeps its value; the next gets what is left, the last nothing.
    assert confident.propose_children([1], 3) == [(5, pytest.approx(0.95)), (6, pytest.approx(0.05))]


def recycle_prob(token: int) -> float:
    return float(torch.softmax(_logits(10, {4: 1.0, 2: 0.0}), -1)[token])


def test_hybrid_observe_fits_each_source_on_the_nodes_the_target_tested():
    calibration = {"lookup": IsotonicCalibration(prior=1.0), "recycle": IsotonicCalibration(prior=1.0)}
    # Two-token matches, smoothing 1 / 2: 2 after (3, 1) seen once, p = 1 / 1.5; 3 after (1, 2) twice, 2 / 2.5.
    index = LookupIndex(1, 2, smoothing=1.0)
    index.extend([1, 2, 3, 1, 2, 3, 1])
    recycle = RecycleTable(vocab_size=10, k=2)
    recycle.record(torch.tensor([1]), _logits(10, {4: 1.0, 2: 0.0}).unsqueeze(0))
    hybrid = HybridDrafter({"lookup": index, "recycle": recycle}, calibration)
    hybrid.start_tree(index.tokens)
    tree, _ = expand_and_prune(
        TreeShape.parse("[(0,), (1,), (0, 0)]"), hybrid, index.tokens, PruningPolicy(0.0, 0.0, None)
    )
    root_children = {int(tree.tokens[n]): n for n in range(1, tree.num_nodes) if tree.parents[n] == 0}
    assert sorted(root_children) == [2, 4]  # both sources' children of the root
    # The target accepts 2 (both sources proposed it), then rejects 2's child 3 (the lookup's):
    # the lookup is right once on two tested nodes, the recycle table once on two (2 and 4).
    two = root_children[2]
    hybrid.observe(tree, tree.num_nodes - 1, np.array([0, two, -1]))
    lookup = calibration["lookup"]  # 2 accepted (bin 6), 3 not (bin 8)
    assert lookup.nodes[[6, 8]].tolist() == [1, 1] and lookup.accepted[[6, 8]].tolist() == [1, 0]
    assert lookup.nodes.sum() == 2
    recycle = calibration["recycle"]  # 2 accepted, 4 not, each in its own bin
    bin_of = {token: int(recycle_prob(token) * 10) for token in (2, 4)}
    assert bin_of[2] != bin_of[4]
    # The native record computes its own float32 softmax: a few ulp from torch's.
    np.testing.assert_allclose(recycle.predicted[[bin_of[2], bin_of[4]]], [recycle_prob(2), recycle_prob(4)], rtol=1e-6)
    assert recycle.accepted[bin_of[2]] == 1 and recycle.accepted[bin_of[4]] == 0 and recycle.nodes.sum() == 2


def test_isotonic_calibration_is_monotone_and_fits_each_bin():
    calibration = IsotonicCalibration(num_bins=4, decay=1.0, prior=1.0)
    probs = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(calibration.calibrate(probs), probs, atol=1e-12)  # nothing observed: identity
    # Weak candidates (p = 0.1) never accepted, sure ones (p = 1) always: only the weak end drops.
    calibration.update(np.array([0.1] * 20 + [1.0] * 5), np.array([False] * 20 + [True] * 5))
    assert calibration.calibrate(0.1) < 0.01 and calibration.calibrate(1.0) > 0.9
    # Candidates at 0.6 accepted less often than those at 0.3: pooled, the map stays monotone.
    calibration.update(np.array([0.3] * 10 + [0.6] * 10), np.array([True] * 5 + [False] * 5 + [False] * 10))
    assert np.all(np.diff(calibration.calibrate(probs)) >= 0.0)
    assert calibration.calibrate(0.3) == pytest.approx(calibration.calibrate(0.6), abs=0.05)
    value = float(calibration.calibrate(0.8))
    assert calibration.calibrate(calibration.min_prob_for(value)) == pytest.approx(value)
    assert calibration.min_prob_for(0.0) == 0.0 and calibration.min_prob_for(1.5) == float("inf")
    with pytest.raises(ValueError, match="num_bins = 0"):
        IsotonicCalibration(num_bins=0)


def test_hybrid_needs_a_calibration_per_source():
    with pytest.raises(ValueError, match=r"no calibration for source\(s\) \['b'\]"):
        HybridDrafter({"b": _Fixed([])}, {"a": IsotonicCalibration()})


def test_reliability_counts_bucket_predictions_with_their_outcomes():
    counts = ReliabilityCounts(num_buckets=4)
    counts.add(np.array([0.1, 0.2, 0.9, 1.0, 0.5]), np.array([False, True, True, True, False]))
    assert counts.nodes.tolist() == [2, 0, 1, 2]  # 1.0 falls in the last bucket
    assert counts.accepted.tolist() == [1, 0, 0, 2]
    assert counts.predicted.tolist() == pytest.approx([0.3, 0.0, 0.5, 1.9])
    assert counts.expected == pytest.approx(2.7) and counts.num_accepted == 3
    assert counts.to_dict()["nodes"] == [2, 0, 1, 2]
    with pytest.raises(ValueError, match=r"predicted values in \[0.5, 1.5\]: must lie in \[0, 1\]"):
        counts.add(np.array([0.5, 1.5]), np.array([True, False]))
    with pytest.raises(ValueError, match="must be equal 1-D shapes"):
        counts.add(np.array([0.5]), np.array([True, False]))


HISTORY = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 6, 1, 2, 3, 4, 9, 9, 1, 2]


def _weight(matched: int) -> float:
    """The evidence weight of a continuation counted after ``matched`` tokens (smoothing 2)."""
    return 1.0 / (1.0 + 2.0 * 2.0 ** (1 - matched))


def test_suffix_tree_drafter_gives_each_child_its_frequency_given_the_parent_weighed_by_the_match():
    cache = SuffixCache(max_cached_requests=4, max_spec_factor=4.0)
    cache.follow("a", np.array(HISTORY), prompt_length=len(HISTORY))
    drafter = cache.tree_drafter("a", np.array(HISTORY), max_nodes=8)
    # "1 2" (matched: 2 tokens) is followed by 3 three times, 5 once, and by the end once;
    # "1 2 3" (3 tokens) by 4 twice, 6 once.
    assert drafter.propose_children(HISTORY, 4) == [(3, pytest.approx(0.6 * _weight(2)))]
    expected = [(4, pytest.approx(2 / 3 * _weight(3))), (6, pytest.approx(1 / 3 * _weight(3)))]
    assert drafter.propose_children([*HISTORY, 3], 4) == expected
    assert drafter.propose_children([*HISTORY, 3], 1) == expected[:1]
    assert drafter.propose_children([*HISTORY, 5], 4) == []  # not in the tree


def test_suffix_tree_drafter_trusts_a_long_match_more_than_a_short_one():
    short = SuffixTreeDrafter(0, [7, 8], [-1, 0], [1.0, 1.0], match_length=1)
    long = SuffixTreeDrafter(0, [7, 8], [-1, 0], [1.0, 1.0], match_length=12)
    assert short.propose_children([], 2) == [(7, pytest.approx(1 / 3))]
    assert short.propose_children([7], 2) == [(8, pytest.approx(0.5))]  # the draft extends the match
    assert long.propose_children([], 2) == [(7, pytest.approx(_weight(12)))] and _weight(12) > 0.999


def test_suffix_cache_drafts_from_earlier_requests_outputs_only_when_it_caches_them():
    # "1" is followed by 2 in a's output and ends b's own (half each), after a one-token match.
    for cached, expected in ((4, [(2, pytest.approx(0.5 * _weight(1)))]), (0, [])):
        cache = SuffixCache(max_cached_requests=cached)
        cache.follow("a", np.array([5, 6, 7]), prompt_length=1)  # output "6 7"
        cache.follow("a", np.array([5, 6, 7, 1, 2]), prompt_length=1)  # output "6 7 1 2"
        cache.stop("a")
        assert cache.seen == {}
        later = np.array([8, 9, 1])
        cache.follow("b", later, prompt_length=2)  # output "1"
        assert cache.tree_drafter("b", later, max_nodes=4).propose_children(later, 4) == expected


def test_suffix_cache_drafts_an_earlier_answer_to_the_same_prompt_from_its_first_token():
    prompt, answer = list(range(100, 140)), [1, 2, 3, 4, 5, 6, 7, 8]
    cache = SuffixCache(max_cached_requests=4)
    cache.follow("first", np.array(prompt + answer), prompt_length=len(prompt))
    cache.stop("first")
    cache.follow("again", np.array(prompt), prompt_length=len(prompt))
    drafter = cache.tree_drafter("again", np.array(prompt), max_nodes=8)
    context, drafted = list(prompt), []
    while children := drafter.propose_children(context, 2):
        (token, prob), *others = children
        assert others == [] and prob > 0.49  # the request's own prompt, ending here, is the other half
        drafted.append(token)
        context.append(token)
    assert drafted == answer
    # Without the earlier request in the global cache, the prompt's end continues nowhere.
    cold = SuffixCache(max_cached_requests=4)
    cold.follow("again", np.array(prompt), prompt_length=len(prompt))
    assert cold.tree_drafter("again", np.array(prompt), max_nodes=8).propose_children(prompt, 2) == []


@pytest.mark.parametrize("max_depth, longest_draft", [(24, 12), (64, 32)])
def test_suffix_tree_depth_bounds_the_match_and_the_draft_together(max_depth, longest_draft):
    # A regenerated 40-token answer: the match behind a draft and the draft share the suffix
    # tree's depth, so vLLM's default 24 drafts 12 tokens at a time (12 matched) and 64 drafts 32.
    prompt, answer = list(range(100, 180)), list(range(1, 41))
    cache = SuffixCache(max_cached_requests=4, max_depth=max_depth)
    cache.follow("first", np.array(prompt + answer), prompt_length=len(prompt))
    cache.stop("first")
    cache.follow("again", np.array(prompt), prompt_length=len(prompt))
    drafter = cache.tree_drafter("again", np.array(prompt), max_nodes=64)
    context = list(prompt)
    while children := drafter.propose_children(context, 1):
        context.append(children[0][0])
    assert context[len(prompt) :] == answer[:longest_draft]


def test_suffix_cache_restarts_a_request_whose_tokens_were_rolled_back():
    cache = SuffixCache(max_cached_requests=4)
    cache.follow("a", np.array(HISTORY), prompt_length=4)
    cache.follow("a", np.array(HISTORY[:6]), prompt_length=4)
    assert cache.seen == {"a": 6}
    cache.reset()
    assert cache.seen == {} and list(cache.cache.active_requests) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_cached_requests": -1}, "max_cached_requests = -1: must be >= 0"),
        ({"max_cached_requests": 1.5}, "max_cached_requests = 1.5: must be an integer >= 0"),
        ({"max_cached_requests": 1, "max_depth": 0}, r"max_depth = 0: must be an integer in \[1, 64\]"),
        ({"max_cached_requests": 1, "max_spec_factor": 0.0}, "max_spec_factor = 0.0: must be > 0"),
    ],
)
def test_suffix_cache_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SuffixCache(**kwargs)


def test_suffix_tree_drafter_rejects_a_parent_after_its_child():
    with pytest.raises(ValueError, match="node 0: parent 1 must come before it"):
        SuffixTreeDrafter(0, [5, 6], [1, -1], [0.5, 0.5], match_length=1)
    with pytest.raises(ValueError, match="match_length = -1"):
        SuffixTreeDrafter(0, [5], [-1], [0.5], match_length=-1)

"""Every drafter's trees are valid tries with probabilities in (0, 1] whose path values never
increase along a path, and each node's children form a sub-distribution; the recycle table's
native top-k probabilities are ``torch.topk``'s values under a float64 softmax."""

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from tree_attn_backend.drafting.calibration import IsotonicCalibration
from tree_attn_backend.drafting.draft_head import PROBE_TOKENS, DraftHead, HeadRootDrafter
from tree_attn_backend.drafting.hybrid_drafter import HybridDrafter
from tree_attn_backend.drafting.lookup_drafter import LookupIndex
from tree_attn_backend.drafting.pruning import PruningPolicy, expand_and_prune
from tree_attn_backend.drafting.recycle_drafter import RecycleTable
from tree_attn_backend.drafting.suffix_drafter import SuffixCache
from tree_attn_backend.drafting.tree_shape import TreeShape
from tree_attn_backend.ops.native import native_op

SHAPE = TreeShape.parse("[(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0)]")
VOCAB = 12


@st.composite
def drafters(draw: st.DrawFn) -> tuple[str, object, list[int]]:
    """A lookup index over a random token history, a recycle table filled from random logits,
    a SuffixDecoding tree over the history (with an earlier request's output cached), a random
    draft head's children of the root, or their hybrid with random calibration factors; and the
    context to draft from."""
    history = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=60))
    index = LookupIndex(1, draw(st.integers(1, 4)), smoothing=draw(st.sampled_from([0.0, 0.5, 1.0])))
    index.extend(history)
    table = RecycleTable(VOCAB, k=draw(st.integers(1, 4)))
    seed = draw(st.integers(0, 2**31 - 1))
    rows = draw(st.integers(0, VOCAB))
    logits = torch.randn(rows, VOCAB + 3, generator=torch.Generator().manual_seed(seed)) * draw(st.floats(0.1, 8.0))
    table.record(torch.randint(0, VOCAB, (rows,), generator=torch.Generator().manual_seed(seed + 1)), logits)
    suffix = SuffixCache(max_cached_requests=2, max_depth=8, max_spec_factor=draw(st.floats(0.5, 4.0)))
    earlier = draw(st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=30))
    suffix.follow("earlier", np.array(earlier), prompt_length=1)
    suffix.stop("earlier")
    suffix.follow("now", np.array(history), prompt_length=draw(st.integers(0, len(history))))
    sources = {
        "lookup": index,
        "recycle": table,
        "suffix": suffix.tree_drafter("now", np.array(history), max_nodes=draw(st.integers(1, 12))),
        "head": _random_head_children(seed, len(index.tokens), draw(st.floats(0.1, 30.0))),
    }
    kind = draw(st.sampled_from([*sources, "hybrid"]))
    if kind in sources:
        return kind, sources[kind], index.tokens
    calibration = {name: IsotonicCalibration() for name in sources}
    for fit in calibration.values():
        probs = draw(st.lists(st.floats(0.0, 1.0), max_size=20))
        fit.update(np.array(probs), np.array(draw(st.lists(st.booleans(), min_size=len(probs), max_size=len(probs)))))
    hybrid = HybridDrafter(sources, calibration)
    hybrid.start_tree(index.tokens)
    return kind, hybrid, index.tokens


def _random_head_children(seed: int, root_length: int, scale: float) -> HeadRootDrafter:
    """The root children of a random draft head (hidden size 4, a random part of the vocabulary;
    ``scale`` spreads its logits: large is confident)."""
    g = torch.Generator().manual_seed(seed)
    vocab = torch.randperm(VOCAB, generator=g)[: 1 + seed % VOCAB]
    head = DraftHead(
        torch.randn(4, 8, generator=g),
        torch.randn(4, generator=g),
        torch.randn(vocab.numel(), 4, generator=g) * scale,
        vocab,
        torch.randn(PROBE_TOKENS, 4, generator=g),
    )
    tokens, probs = head.top_children(torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g), 3)
    return HeadRootDrafter(root_length, tokens[0].tolist(), probs[0].tolist())


@given(case=drafters(), max_nodes=st.one_of(st.none(), st.integers(0, 9)))
def test_drafter_trees_are_tries_of_sub_distributions(case, max_nodes):
    _, drafter, context = case
    tree, _ = expand_and_prune(SHAPE, drafter, context, PruningPolicy(0.0, 0.0, max_nodes))
    # DraftTree checks topological order and distinct sibling tokens (a trie) on construction.
    assert np.all((tree.probs[1:] > 0.0) & (tree.probs[1:] <= 1.0))
    values = tree.path_probs
    assert np.all(values[1:] <= values[tree.parents[1:]] + 1e-12)
    for node in range(tree.num_nodes):
        children = tree.parents == node
        assert tree.probs[children].sum() <= 1.0 + 1e-9


@given(
    rows=st.integers(0, 4),
    columns=st.integers(1, 300),
    padding=st.integers(0, 3),
    levels=st.integers(1, 40),
    scale=st.floats(0.01, 30.0),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_native_top_k_probs_match_topk_and_softmax(rows, columns, padding, levels, scale, seed, data):
    op = native_op("top_k_probs")
    assert op is not None, "csrc/ is not built: run `make setup`"
    k = data.draw(st.integers(1, min(columns, 64)))
    # Few distinct levels make ties, inside a 16-logit step and across; padding strides the rows.
    generator = torch.Generator().manual_seed(seed)
    levels_drawn = torch.randint(0, levels, (rows, columns + padding), generator=generator)
    logits = (levels_drawn.double() * scale - 10.0).float()[:, :columns]
    probs, ids = op(logits, k)
    expected_values, _ = torch.topk(logits, k, dim=-1)
    assert torch.equal(logits.gather(1, ids), expected_values)  # the k largest, largest first
    assert all(len(set(row)) == k for row in ids.tolist())
    # Among equal logits the lower column comes first, and a tie at the k-th keeps the lowest.
    for r in range(rows):
        for value in expected_values[r].unique().tolist():
            chosen = ids[r][logits[r, ids[r]] == value].tolist()
            assert chosen == torch.nonzero(logits[r] == value).flatten()[: len(chosen)].tolist()
    softmax = torch.softmax(logits.double(), dim=-1).gather(1, ids)
    torch.testing.assert_close(probs.double(), softmax, rtol=2e-5, atol=1e-30)

"""Every drafter's trees are valid tries with probabilities in (0, 1] whose path values never
increase along a path, and each node's children form a sub-distribution."""

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from tree_attn_backend.drafting.calibration import DecayedRatio
from tree_attn_backend.drafting.hybrid_drafter import HybridDrafter
from tree_attn_backend.drafting.lookup_drafter import LookupIndex
from tree_attn_backend.drafting.pruning import PruningPolicy, expand_and_prune
from tree_attn_backend.drafting.recycle_drafter import RecycleTable
from tree_attn_backend.drafting.tree_shape import TreeShape

SHAPE = TreeShape.parse("[(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0)]")
VOCAB = 12


@st.composite
def drafters(draw: st.DrawFn) -> tuple[str, object, list[int]]:
    """A lookup index over a random token history, a recycle table filled from random logits,
    or their hybrid with random calibration factors; and the context to draft from."""
    history = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=60))
    index = LookupIndex(1, draw(st.integers(1, 4)), smoothing=draw(st.sampled_from([0.0, 0.5, 1.0])))
    index.extend(history)
    table = RecycleTable(VOCAB, k=draw(st.integers(1, 4)))
    seed = draw(st.integers(0, 2**31 - 1))
    rows = draw(st.integers(0, VOCAB))
    logits = torch.randn(rows, VOCAB + 3, generator=torch.Generator().manual_seed(seed)) * draw(st.floats(0.1, 8.0))
    table.record(torch.randint(0, VOCAB, (rows,), generator=torch.Generator().manual_seed(seed + 1)), logits)
    kind = draw(st.sampled_from(["lookup", "recycle", "hybrid"]))
    if kind == "lookup":
        return kind, index, index.tokens
    if kind == "recycle":
        return kind, table, index.tokens
    calibration = {"lookup": DecayedRatio(), "recycle": DecayedRatio()}
    for ratio in calibration.values():
        ratio.update(draw(st.floats(0.0, 40.0)), draw(st.floats(0.1, 40.0)))
    hybrid = HybridDrafter({"lookup": index, "recycle": table}, calibration)
    hybrid.start_tree(index.tokens)
    return kind, hybrid, index.tokens


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

"""Invalid trees and batches raise ValueError naming the bad value."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metadata import StepBatch
from tree_attn_backend.drafting.tree import DraftTree

from .strategies import tree_parents


@given(parents=tree_parents(min_nodes=2, max_nodes=40), data=st.data())
def test_corrupted_parent_arrays_are_rejected_everywhere(parents, data):
    parents = list(parents)
    i = data.draw(st.integers(1, len(parents) - 1))
    bad = data.draw(st.sampled_from([i, i + 1 if i + 1 < len(parents) else i, -1, -2, len(parents) + 3]))
    parents[i] = bad
    tokens = np.arange(len(parents))
    with pytest.raises(ValueError, match=rf"parents\[{i}\] = {bad}"):
        DraftTree(parents=np.array(parents), tokens=tokens, probs=np.ones(len(parents)))
    with pytest.raises(ValueError, match=rf"parents\[{i}\] = {bad}"):
        StepBatch(np.array([3]), np.array([len(parents)]), np.array(parents), np.zeros((1, 8), dtype=np.int64), 16)


@given(n=st.integers(1, 20), data=st.data())
def test_bad_probabilities_are_rejected(n, data):
    probs = np.full(n, 0.5)
    i = data.draw(st.integers(0, n - 1))
    probs[i] = data.draw(st.sampled_from([np.nan, -0.1, 1.5, np.inf]))
    with pytest.raises(ValueError, match=rf"probs\[{i}\]"):
        DraftTree.chain(np.arange(n), probs)

"""Batched tree verification equals sequential per-request walks."""

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from tree_attn_backend.drafting.tree import DraftTree, FlatTrees
from tree_attn_backend.verification.verify import verify_greedy, verify_sampling

from . import oracles
from .strategies import draft_trees

VOCAB = 50


def _inputs(trees: list[DraftTree], seed: int, peaked: bool):
    """Target/draft distributions at every node; `peaked` makes acceptance likely."""
    rng = np.random.default_rng(seed)
    n = sum(t.num_nodes for t in trees)
    logits = rng.normal(size=(n, VOCAB)) * (6.0 if peaked else 1.0)
    flat = FlatTrees.from_trees(trees)
    if peaked:  # steer the target towards the first child so paths get long
        parents = flat.global_parents().numpy()
        for child in range(n):
            if parents[child] >= 0:
                logits[parents[child], flat.tokens[child]] += 8.0 * rng.random()
    target = np.exp(logits - logits.max(1, keepdims=True))
    target /= target.sum(1, keepdims=True)
    draft = np.exp(logits * rng.random() + rng.normal(size=logits.shape))
    draft /= draft.sum(1, keepdims=True)
    u = rng.random((n, 2))
    return flat, logits, target, draft, u


def _check(result, trees, expect_fn):
    offsets = np.concatenate([[0], np.cumsum([t.num_nodes for t in trees])])
    for b, tree in enumerate(trees):
        path, bonus = expect_fn(b, tree, slice(offsets[b], offsets[b + 1]))
        got = result.accepted_nodes[b]
        assert got[got >= 0].tolist() == path
        assert int(result.num_accepted[b]) == len(path) - 1
        assert int(result.bonus_tokens[b]) == bonus
        emitted = result.output_tokens[b]
        assert emitted[emitted >= 0].tolist() == [int(tree.tokens[i]) for i in path[1:]] + [bonus]


@given(
    trees=st.lists(draft_trees(vocab_size=VOCAB), min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    peaked=st.booleans(),
)
def test_all_modes_equal_sequential_oracles(trees, seed, peaked):
    flat, logits, target, draft, u = _inputs(trees, seed, peaked)
    _check(
        verify_greedy(flat, torch.from_numpy(logits)),
        trees,
        lambda b, t, s: oracles.greedy_walk(t.parents, t.tokens, logits[s]),
    )
    _check(
        verify_sampling(flat, torch.from_numpy(target), uniforms=torch.from_numpy(u)),
        trees,
        lambda b, t, s: oracles.target_only_walk(t.parents, t.tokens, target[s], u[s]),
    )
    _check(
        verify_sampling(flat, torch.from_numpy(target), torch.from_numpy(draft), uniforms=torch.from_numpy(u)),
        trees,
        lambda b, t, s: oracles.rejection_walk(t.parents, t.tokens, target[s], draft[s], u[s]),
    )


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6), seed=st.integers(0, 2**32 - 1))
def test_chain_rejection_sampling_is_standard_speculative_sampling(lengths, seed):
    rng = np.random.default_rng(seed)
    trees = [DraftTree.chain(rng.integers(VOCAB, size=n)) for n in lengths]
    flat, _, target, draft, u = _inputs(trees, seed, peaked=True)
    result = verify_sampling(flat, torch.from_numpy(target), torch.from_numpy(draft), uniforms=torch.from_numpy(u))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for b, tree in enumerate(trees):
        s = slice(offsets[b], offsets[b + 1])
        want = oracles.chain_speculative_sampling(tree.tokens, target[s], draft[s], u[s])
        got = result.output_tokens[b]
        assert got[got >= 0].tolist() == want

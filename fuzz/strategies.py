"""Hypothesis strategies for draft trees, pruned trees and mixed batches."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from tree_attn_backend.drafting.drafter import SyntheticDrafter
from tree_attn_backend.drafting.pruning import PruningPolicy, expand_and_prune
from tree_attn_backend.drafting.tree import DraftTree
from tree_attn_backend.drafting.tree_shape import TreeShape

from .harness import BatchSpec

FUZZ_BLOCK_SIZES = (16, 32, 64, 128)


@st.composite
def tree_parents(draw: st.DrawFn, min_nodes: int = 1, max_nodes: int = 128, max_depth: int = 16) -> tuple[int, ...]:
    """A random tree in topological order: any branching, depth <= ``max_depth``."""
    n = draw(st.integers(min_nodes, max_nodes))
    # Mix bushy and deep trees: parents drawn near the end make chains, near 0 make stars.
    locality = draw(st.sampled_from([1, 2, 4, 1 << 30]))
    parents, depths = [-1], [0]
    for i in range(1, n):
        low = max(0, i - locality)
        candidates = [p for p in range(low, i) if depths[p] < max_depth] or [0]
        p = candidates[draw(st.integers(0, len(candidates) - 1))]
        parents.append(p)
        depths.append(depths[p] + 1)
    return tuple(parents)


@st.composite
def draft_trees(draw: st.DrawFn, max_nodes: int = 64, vocab_size: int = 50) -> DraftTree:
    """A draft tree with distinct sibling tokens < ``vocab_size`` and random probabilities
    (at most ``vocab_size`` nodes, so that no node has more children than there are tokens)."""
    parents = draw(tree_parents(max_nodes=min(max_nodes, vocab_size), max_depth=16))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    tokens = np.zeros(len(parents), dtype=np.int64)
    tokens[0] = rng.integers(vocab_size)
    for parent in set(parents[1:]):
        kids = [i for i, p in enumerate(parents) if p == parent]
        tokens[kids] = rng.choice(vocab_size, size=len(kids), replace=False)
    probs = rng.random(len(parents))
    probs[0] = 1.0
    return DraftTree(parents=np.array(parents), tokens=tokens, probs=probs)


@st.composite
def pruning_cases(draw: st.DrawFn) -> tuple[TreeShape, SyntheticDrafter, list[int], PruningPolicy]:
    """A random static shape, drafter, context and policy for :func:`expand_and_prune`."""
    parents = draw(tree_parents(min_nodes=2, max_nodes=64, max_depth=8))
    # Rank of each node among its siblings, as the shape syntax needs.
    ranks = [0] * len(parents)
    seen: dict[int, int] = {}
    paths: list[tuple[int, ...]] = [()]
    for i, p in enumerate(parents[1:], start=1):
        ranks[i] = seen.get(p, 0)
        seen[p] = ranks[i] + 1
        paths.append(paths[p] + (ranks[i],))
    shape = TreeShape.from_paths(paths[1:])
    low = draw(st.floats(0.05, 1.0))
    high = draw(st.floats(low, 1.0))
    drafter = SyntheticDrafter(
        vocab_size=draw(st.integers(8, 200)), confidence=(low, high), seed=draw(st.integers(0, 999))
    )
    context = draw(st.lists(st.integers(0, 7), min_size=1, max_size=6))
    policy = PruningPolicy(
        min_node_prob=draw(st.sampled_from([0.0, 0.05, 0.2, 0.5])),
        min_path_prob=draw(st.sampled_from([0.0, 0.01, 0.1, 0.3])),
        max_nodes=draw(st.one_of(st.none(), st.integers(0, 40))),
        max_depth=draw(st.one_of(st.none(), st.integers(0, 8))),
    )
    return shape, drafter, context, policy


@st.composite
def pruned_tree_parents(draw: st.DrawFn) -> tuple[int, ...]:
    """Parents of a tree produced by real expansion + pruning."""
    shape, drafter, context, policy = draw(pruning_cases())
    tree, _ = expand_and_prune(shape, drafter, context, policy)
    return tuple(int(p) for p in tree.parents)


@st.composite
def request_parents(draw: st.DrawFn, max_chunk: int = 300) -> tuple[int, ...]:
    """New tokens of one request: a prefill chunk, a decode, a random tree or a pruned tree."""
    kind = draw(st.sampled_from(["prefill", "decode", "tree", "pruned"]))
    if kind == "prefill":
        return tuple(range(-1, draw(st.integers(2, max_chunk)) - 1))
    if kind == "decode":
        return (-1,)
    if kind == "tree":
        return draw(tree_parents(max_nodes=128, max_depth=16))
    return draw(pruned_tree_parents())


@st.composite
def batch_specs(
    draw: st.DrawFn,
    max_reqs: int = 6,
    max_context: int = 4096,
    max_chunk: int = 300,
    head_sizes: tuple[int, ...] = (64, 128, 256),
    block_sizes: tuple[int, ...] = FUZZ_BLOCK_SIZES,
) -> BatchSpec:
    """A mixed batch: prefill chunks, decodes and trees; contexts across page boundaries; GQA."""
    n = draw(st.integers(1, max_reqs))
    block_size = draw(st.sampled_from(block_sizes))
    contexts = tuple(
        draw(st.one_of(st.integers(0, max_context), st.sampled_from([0, block_size - 1, block_size, block_size + 1])))
        for _ in range(n)
    )
    parents = tuple(draw(request_parents(max_chunk=max_chunk)) for _ in range(n))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    return BatchSpec(
        context_lens=contexts,
        parents=parents,
        block_size=block_size,
        num_kv_heads=kv_heads,
        num_q_heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        head_size=draw(st.sampled_from(head_sizes)),
    )


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Max abs error vs the float64 reference (inputs ~N(0, 1), outputs are convex mixes of V).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}

__all__ = [
    "DTYPES",
    "FUZZ_BLOCK_SIZES",
    "TOLERANCE",
    "batch_specs",
    "draft_trees",
    "pruned_tree_parents",
    "pruning_cases",
    "request_parents",
    "tree_parents",
]

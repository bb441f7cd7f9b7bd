"""``tree-pruned bench metadata``: the vectorized builder against a per-node Python builder.

``build_us`` is the median time to validate a :class:`StepBatch`, build its
:class:`TreeAttentionMetadata` and compute the layouts a verify step reads (the packed custom
mask with its byte offsets, and the cascade ``[q, q]`` tree masks), with a
:class:`MaskWorkspace` reused across repetitions as an engine reuses it across steps. The unpacked bool custom
mask (``q * (context + q)`` bytes per request) stays lazy and is not timed.
``naive_us`` builds the same outputs node by node in Python.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from metadata import MaskWorkspace, StepBatch, build_tree_attention_metadata
from tree_attn_backend.drafting.drafter import SyntheticDrafter
from tree_attn_backend.drafting.pruning import PruningPolicy, expand_and_prune
from tree_attn_backend.drafting.tree_shape import TreeShape

BATCHES = (1, 8, 64, 256)
TREE_NODES = (8, 32, 64)
CONTEXTS = (512, 4096)
BLOCK_SIZE = 16


def make_trees(batch: int, tree_nodes: int, seed: int = 0) -> list[np.ndarray]:
    """``batch`` pruned trees of exactly ``tree_nodes`` nodes (root included), each grown
    by the synthetic drafter inside a wide shape with a node budget."""
    shape = TreeShape.full([8, 6, 4, 3, 2, 2])
    policy = PruningPolicy(max_nodes=tree_nodes - 1)
    out = []
    for b in range(batch):
        drafter = SyntheticDrafter(vocab_size=32000, confidence=(0.3, 0.9), seed=seed + b)
        tree, _ = expand_and_prune(shape, drafter, [b + 1], policy)
        assert tree.num_nodes == tree_nodes
        out.append(tree.parents)
    return out


def make_batch(trees: list[np.ndarray], context: int) -> StepBatch:
    batch = len(trees)
    q = np.array([len(t) for t in trees])
    blocks = -(-(context + q.max()) // BLOCK_SIZE)
    table = np.random.default_rng(0).permutation(batch * blocks).reshape(batch, blocks)
    return StepBatch(np.full(batch, context), q, np.concatenate(trees), table, BLOCK_SIZE)


def build_fast(batch: StepBatch, workspace: MaskWorkspace | None = None) -> tuple:
    rebuilt = StepBatch(batch.context_lens, batch.query_lens, batch.parents, batch.block_table, batch.block_size)
    meta = build_tree_attention_metadata(rebuilt, workspace)
    return meta.positions, meta.slot_mapping, meta.packed_custom_mask, meta.mask_indptr, meta.tree_mask


def build_naive(batch: StepBatch) -> tuple:
    """The straightforward builder: one Python iteration per node, per request."""
    positions, slots, packed, mask_indptr, tree_masks = [], [], [], [0], []
    qo = 0
    for b in range(batch.num_reqs):
        ctx, q = int(batch.context_lens[b]), int(batch.query_lens[b])
        parents = batch.parents[qo : qo + q]
        rows = []
        for i in range(q):
            ancestors, node, depth = [], i, 0
            while node != -1:
                ancestors.append(node)
                node = int(parents[node])
                depth += 1
            positions.append(ctx + depth - 1)
            linear = ctx + i
            slots.append(
                int(batch.block_table[b, linear // batch.block_size]) * batch.block_size + linear % batch.block_size
            )
            row = np.zeros(ctx + q, dtype=bool)
            row[:ctx] = True
            row[[ctx + a for a in ancestors]] = True
            rows.append(row)
        dense = np.stack(rows)
        tree_masks.append(dense[:, ctx:].ravel())
        packed.append(np.packbits(dense.ravel(), bitorder="little"))
        mask_indptr.append(mask_indptr[-1] + packed[-1].shape[0])
        qo += q
    return positions, slots, np.concatenate(packed), mask_indptr, np.concatenate(tree_masks)


def median_us(fn: Callable[[], object], repeats: int, min_seconds: float = 0.0) -> float:
    times: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def run(
    batches: Sequence[int] = BATCHES,
    tree_nodes: Sequence[int] = TREE_NODES,
    contexts: Sequence[int] = CONTEXTS,
    progress: bool = True,
) -> list[dict]:
    from tqdm import tqdm

    grid = list(itertools.product(batches, tree_nodes, contexts))
    rows = []
    for batch_size, nodes, context in tqdm(grid, desc="bench metadata", disable=not progress):
        batch = make_batch(make_trees(batch_size, nodes), context)
        fast = build_fast(batch)  # warm-up, and the outputs to compare
        slow = build_naive(batch)
        for a, b in zip(fast, slow):
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                raise AssertionError(f"fast and naive builders disagree at batch {batch_size} x {nodes} x {context}")
        workspace = MaskWorkspace()  # reused step after step, as an engine would
        # The lambdas are timed here, before the loop moves on.
        build_us = median_us(lambda: build_fast(batch, workspace), repeats=20, min_seconds=0.2)  # noqa: B023
        naive_us = median_us(lambda: build_naive(batch), repeats=3 if batch_size * nodes > 2000 else 10)  # noqa: B023
        rows.append(
            {
                "batch": batch_size,
                "tree_nodes": nodes,
                "context": context,
                "build_us": round(build_us, 1),
                "naive_us": round(naive_us, 1),
                "speedup": round(naive_us / build_us, 1),
                "build_us_per_node": round(build_us / (batch_size * nodes), 3),
            }
        )
    return rows

"""Dynamic pruning: grow a draft tree inside a static maximum shape, keep what pays.

A node's *path value* is the product of draft probabilities from the root to it: the
drafter's estimate of the chance that the target accepts the whole path. A child's value
never exceeds its parent's, so keeping the top-N nodes by value (ties broken by shape
order, which puts parents first) always gives a connected tree. Expansion is best-first
(EAGLE-2 style): the drafter is asked only about nodes that end up in the tree.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from tree_attn_backend.drafting.drafter import Drafter
from tree_attn_backend.drafting.tree import DraftTree
from tree_attn_backend.drafting.tree_shape import TreeShape


@dataclass(frozen=True)
class PruningPolicy:
    """Which draft nodes to keep.

    Attributes:
        min_node_prob: drop a node (and its subtree) when its own draft probability is below.
        min_path_prob: drop a node (and its subtree) when its path value is below.
        max_nodes: keep at most this many draft nodes (the root is not counted), the ones
            with the highest path value; ``None`` = no limit beyond the shape.
        max_depth: drop nodes deeper than this; ``None`` = the shape's depth.
    """

    min_node_prob: float = 0.0
    min_path_prob: float = 0.0
    max_nodes: int | None = None
    max_depth: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_node_prob", "min_path_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} = {value!r} must be a number in [0, 1]")
        for name in ("max_nodes", "max_depth"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} = {value!r} must be an integer >= 0 or None")

    def within_tokens_left(self, tokens_left: int | None, shape_depth: int) -> PruningPolicy:
        """This policy for a request that stops after ``tokens_left`` more tokens (``None``: no
        known limit): a step emits at most that many, so deeper nodes would never be emitted and
        are dropped. ``self`` when the limit is no tighter than the depth (``shape_depth`` when
        ``max_depth`` is ``None``)."""
        depth = self.max_depth if self.max_depth is not None else shape_depth
        if tokens_left is None or tokens_left >= depth:
            return self
        return replace(self, max_depth=max(tokens_left, 0))

    def admits(self, prob: float, path_value: float, depth: int) -> bool:
        """Whether a node passes the thresholds (the budget is applied separately)."""
        return (
            prob >= self.min_node_prob
            and path_value >= self.min_path_prob
            and (self.max_depth is None or depth <= self.max_depth)
        )


def expand_and_prune(
    shape: TreeShape,
    drafter: Drafter,
    context: Sequence[int],
    policy: PruningPolicy,
) -> tuple[DraftTree, np.ndarray]:
    """Grow one request's pruned draft tree.

    Args:
        shape: the static maximum tree.
        drafter: proposes ``(token, prob)`` children of a node, most likely first.
        context: the request's tokens; the last one is the root (last verified token).
        policy: thresholds and budget.

    Returns:
        ``(tree, shape_index)``: the tree with its nodes in the order they were chosen
        (non-increasing path value, parents before children, so every prefix is the best
        tree of that size), and int32 ``[T]`` giving each node's index in ``shape``.
    """
    if len(context) == 0:
        raise ValueError("context is empty: the root token (last verified token) is required")
    budget = math.inf if policy.max_nodes is None else policy.max_nodes
    root_token = int(context[-1])
    tokens: list[int] = [root_token]
    probs: list[float] = [1.0]
    parents: list[int] = [-1]
    shape_index: list[int] = [0]
    paths: list[list[int]] = [[]]  # draft tokens from the root to each kept node
    values: list[float] = [1.0]
    # Heap of admitted but not yet chosen nodes: (-path value, shape index, parent, token, prob).
    heap: list[tuple[float, int, int, int, float]] = []
    context = list(context)
    child_lists, depths = shape.child_lists, shape.depths.tolist()

    def push_children(node: int) -> None:
        kids = child_lists[shape_index[node]]  # the child of rank r is kids[r]
        if not kids:
            return
        candidates = drafter.propose_children(context + paths[node], len(kids))
        for kid, (token, prob) in zip(kids, candidates):
            value = values[node] * prob
            if policy.admits(prob, value, depths[kid]):
                heapq.heappush(heap, (-value, kid, node, int(token), float(prob)))

    push_children(0)
    while heap and len(tokens) - 1 < budget:
        neg_value, kid, parent, token, prob = heapq.heappop(heap)
        tokens.append(token)
        probs.append(prob)
        parents.append(parent)
        shape_index.append(kid)
        paths.append(paths[parent] + [token])
        values.append(-neg_value)
        push_children(len(tokens) - 1)

    tree = DraftTree(
        parents=np.array(parents, dtype=np.int32),
        tokens=np.array(tokens, dtype=np.int64),
        probs=np.array(probs, dtype=np.float64),
    )
    return tree, np.array(shape_index, dtype=np.int32)

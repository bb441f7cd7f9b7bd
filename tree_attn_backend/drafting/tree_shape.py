"""The static maximum tree, written in vLLM's ``speculative_token_tree`` syntax.

``"[(0,), (1,), (0,0), (0,1), (1,0), (1,1)]"`` lists paths from the root; each entry of a
path is a child *rank* (0 = the drafter's most likely child, 1 = the second, ...). The root
(the empty path) is implicit. Dynamic pruning never grows a tree beyond this shape.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from tree_attn_backend.ragged import depths_from_parents


@dataclass(frozen=True, eq=False)
class TreeShape:
    """A static tree of child ranks in topological order (sorted by depth, then path).

    Attributes:
        paths: tuple of ``T`` paths; ``paths[0] == ()`` is the root.
        parents: int32 ``[T]``, ``parents[0] == -1``, ``parents[i] < i``.
        ranks: int32 ``[T]``, child rank of each node under its parent (``ranks[0] == 0``).
        depths: int32 ``[T]``.
    """

    paths: tuple[tuple[int, ...], ...]
    parents: np.ndarray
    ranks: np.ndarray
    depths: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @cached_property
    def child_lists(self) -> tuple[tuple[int, ...], ...]:
        """Per node, its children's indices in rank order: the child of rank ``r`` is at
        ``r`` (ranks have no gaps). Plain tuples: tree growth reads them once per node."""
        lists: list[list[int]] = [[] for _ in self.paths]
        for kid, parent in enumerate(self.parents.tolist()[1:], start=1):
            lists[parent].append(kid)
        ranks = self.ranks.tolist()
        return tuple(tuple(sorted(kids, key=ranks.__getitem__)) for kids in lists)

    @classmethod
    def from_paths(cls, paths: list[tuple[int, ...]] | tuple[tuple[int, ...], ...]) -> TreeShape:
        """Build from a list of rank paths (any order, root omitted).

        Raises ``ValueError`` naming the offending path when the list is empty, a path is not
        a non-empty tuple of integers >= 0, a path appears twice, its parent path is missing,
        or a rank has a gap (rank ``r > 0`` without its sibling of rank ``r - 1``: ranks index
        the drafter's most likely children in order).
        """
        if len(paths) == 0:
            raise ValueError("tree has no paths: list at least one, such as [(0,)]")
        seen: set[tuple[int, ...]] = set()
        for path in paths:
            if not isinstance(path, tuple) or len(path) == 0:
                raise ValueError(f"tree path {path!r} must be a non-empty tuple of child ranks")
            for rank in path:
                if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                    raise ValueError(f"tree path {path!r} has child rank {rank!r}; ranks are integers >= 0")
            if path in seen:
                raise ValueError(f"tree path {path!r} appears twice")
            seen.add(path)
        ordered: list[tuple[int, ...]] = [(), *sorted(seen, key=lambda p: (len(p), p))]
        for path in ordered[1:]:  # sorted, so the first bad path is reported
            if len(path) > 1 and path[:-1] not in seen:
                raise ValueError(f"tree path {path!r} has no parent: {path[:-1]!r} is missing")
            if path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in seen:
                raise ValueError(f"tree path {path!r} skips a rank: {path[:-1] + (path[-1] - 1,)!r} is missing")
        index = {p: i for i, p in enumerate(ordered)}
        parents = np.array([-1] + [index[p[:-1]] for p in ordered[1:]], dtype=np.int32)
        ranks = np.array([0] + [p[-1] for p in ordered[1:]], dtype=np.int32)
        depths = depths_from_parents(parents)
        for array in (parents, ranks, depths):  # shapes are shared (parse caches them): immutable
            array.setflags(write=False)
        return cls(paths=tuple(ordered), parents=parents, ranks=ranks, depths=depths)

    @classmethod
    def parse(cls, text: str) -> TreeShape:
        """Parse vLLM's ``speculative_token_tree`` string. Only literals are read (no eval)."""
        if not isinstance(text, str):
            raise ValueError(f"speculative_token_tree must be a string, got {type(text).__name__}")
        return _parse_cached(text)

    @classmethod
    def _parse(cls, text: str) -> TreeShape:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"speculative_token_tree {text!r} is not a list of tuples: {exc}") from None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"speculative_token_tree {text!r} must be a list of paths such as [(0,), (0, 0)]")
        return cls.from_paths(list(value))

    @classmethod
    def full(cls, branching: list[int] | tuple[int, ...]) -> TreeShape:
        """Every path whose rank at depth ``d`` is below ``branching[d-1]``."""
        if not branching or any(b < 1 for b in branching):
            raise ValueError(f"branching {branching!r} must be a non-empty list of integers >= 1")
        paths: list[tuple[int, ...]] = []
        frontier: list[tuple[int, ...]] = [()]
        for width in branching:
            frontier = [p + (r,) for p in frontier for r in range(width)]
            paths.extend(frontier)
        return cls.from_paths(paths)

    @classmethod
    def chain(cls, length: int) -> TreeShape:
        """A chain of ``length`` draft nodes (rank 0 at every depth)."""
        if length < 1:
            raise ValueError(f"chain length {length} must be >= 1")
        return cls.from_paths([(0,) * d for d in range(1, length + 1)])

    def to_text(self) -> str:
        """The ``speculative_token_tree`` string for this shape."""
        return "[" + ", ".join(repr(p) for p in self.paths[1:]) + "]"


@lru_cache(maxsize=64)
def _parse_cached(text: str) -> TreeShape:
    """Every request's config parses its shape text; the same text gives the same shape."""
    return TreeShape._parse(text)

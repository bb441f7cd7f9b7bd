"""Draft trees: the plain data object that travels from the proposer to the verifier.

A draft tree for one request has ``T >= 1`` nodes in topological order:

* node 0 is the root, the last verified token (it is already decided, but its K/V is
  not in the cache yet, so it is verified together with the drafts);
* ``parents[i] < i`` for every ``i >= 1`` and ``parents[0] == -1``: every prefix of the
  node list is itself a valid tree, so a scheduler that truncates the draft list keeps a tree;
* ``probs[i]`` is the draft probability of node ``i`` given its parent (``probs[0] == 1``);
* the tokens of siblings are distinct (a draft tree is a trie), so at most one child of a
  node can match any given token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tree_attn_backend.ragged import depths_from_parents, global_parents, indptr, validate_parents


@dataclass(frozen=True, eq=False)
class DraftTree:
    """One request's draft tree (see the module docstring for the invariants).

    Attributes:
        parents: int32 ``[T]``, ``parents[0] == -1``, ``parents[i] < i``.
        tokens: int64 ``[T]``; ``tokens[0]`` is the root (last verified) token.
        probs: float64 ``[T]`` in ``[0, 1]``, draft probability of a node given its parent.
        depths: int32 ``[T]``, derived; ``depths[0] == 0``.
    """

    parents: np.ndarray
    tokens: np.ndarray
    probs: np.ndarray
    depths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        parents = np.asarray(self.parents)
        if parents.size == 0:
            raise ValueError("parents is empty: a tree has at least its root (node 0)")
        if parents.dtype.kind not in "iu":
            raise ValueError(f"parents must be integers, got dtype {parents.dtype}")
        parents = parents.astype(np.int32)
        tokens = np.asarray(self.tokens)
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
        tokens = tokens.astype(np.int64)
        probs = np.asarray(self.probs, dtype=np.float64)
        validate_parents(parents)
        n = parents.shape[0]
        if tokens.shape != (n,):
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}, expected ({n},) to match parents")
        if probs.shape != (n,):
            raise ValueError(f"probs has shape {tuple(probs.shape)}, expected ({n},) to match parents")
        bad = np.flatnonzero(~((probs >= 0.0) & (probs <= 1.0)))  # NaN fails both
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"probs[{i}] = {float(probs[i])!r} is not a probability in [0, 1]")
        if (tokens < 0).any():
            i = int(np.flatnonzero(tokens < 0)[0])
            raise ValueError(f"tokens[{i}] = {int(tokens[i])} is negative")
        if n > 1:
            # Distinct sibling tokens: sort (parent, token) pairs and look for equal neighbours.
            key = np.stack([parents[1:].astype(np.int64), tokens[1:]], axis=1)
            order = np.lexsort((key[:, 1], key[:, 0]))
            same = np.flatnonzero((np.diff(key[order], axis=0) == 0).all(axis=1))
            if same.size:
                a, b = sorted((int(order[same[0]]) + 1, int(order[same[0] + 1]) + 1))
                raise ValueError(
                    f"nodes {a} and {b} are siblings (parent {int(parents[a])}) with the same "
                    f"token {int(tokens[a])}: sibling tokens must be distinct"
                )
        for name, value in (("parents", parents), ("tokens", tokens), ("probs", probs)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        depths = depths_from_parents(parents)
        depths.setflags(write=False)
        object.__setattr__(self, "depths", depths)

    @classmethod
    def chain(cls, tokens: list[int] | np.ndarray, probs: list[float] | np.ndarray | None = None) -> DraftTree:
        """A chain ``tokens[0] -> tokens[1] -> ...`` (what vLLM's chain proposers emit)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n = tokens.shape[0]
        parents = np.arange(-1, n - 1, dtype=np.int32)
        if probs is None:
            probs = np.ones(n)
        return cls(parents=parents, tokens=tokens, probs=np.asarray(probs, dtype=np.float64))

    @property
    def num_nodes(self) -> int:
        """Number of nodes including the root."""
        return int(self.parents.shape[0])

    @property
    def num_draft_tokens(self) -> int:
        """Number of draft nodes (all nodes but the root)."""
        return self.num_nodes - 1

    @property
    def path_probs(self) -> np.ndarray:
        """float64 ``[T]``: product of ``probs`` along the path from the root to each node."""
        out = self.probs.copy()
        # Parents come before children, so one pass per depth level finishes every path.
        for depth in range(2, int(self.depths.max(initial=0)) + 1):
            at = np.flatnonzero(self.depths == depth)
            out[at] *= out[self.parents[at]]
        return out

    def truncate(self, num_nodes: int) -> DraftTree:
        """The first ``num_nodes`` nodes: always a valid tree (topological order), so it shares
        this tree's (read-only) arrays without checking them again."""
        if not 1 <= num_nodes <= self.num_nodes:
            raise ValueError(f"num_nodes = {num_nodes} must be in [1, {self.num_nodes}]")
        prefix = object.__new__(DraftTree)
        for name in ("parents", "tokens", "probs", "depths"):
            object.__setattr__(prefix, name, getattr(self, name)[:num_nodes])
        return prefix

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to ``node`` inclusive."""
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node = {node} out of range for {self.num_nodes} nodes")
        path = [node]
        while path[-1] != 0:
            path.append(int(self.parents[path[-1]]))
        return path[::-1]


@dataclass(frozen=True, eq=False)
class FlatTrees:
    """A batch of draft trees flattened node-major, the verifier's input.

    Attributes:
        qo_indptr: int64 ``[B+1]``; request ``b`` owns nodes ``qo_indptr[b]:qo_indptr[b+1]``.
        parents: int64 ``[N]`` request-local parent (``-1`` at each root).
        tokens: int64 ``[N]``.
    """

    qo_indptr: torch.Tensor
    parents: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def from_trees(cls, trees: list[DraftTree]) -> FlatTrees:
        if not trees:
            raise ValueError("trees is empty: a batch has at least one request")
        sizes = np.array([t.num_nodes for t in trees], dtype=np.int64)
        return cls(
            qo_indptr=torch.from_numpy(indptr(sizes)),
            parents=torch.from_numpy(np.concatenate([t.parents for t in trees]).astype(np.int64)),
            tokens=torch.from_numpy(np.concatenate([t.tokens for t in trees])),
        )

    @property
    def num_reqs(self) -> int:
        return int(self.qo_indptr.shape[0]) - 1

    @property
    def num_nodes(self) -> int:
        return int(self.parents.shape[0])

    def global_parents(self) -> torch.Tensor:
        """int64 ``[N]``: parent as a batch-wide node index (``-1`` at roots)."""
        return torch.from_numpy(global_parents(self.parents.numpy(), np.diff(self.qo_indptr.numpy())))

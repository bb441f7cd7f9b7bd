"""Exact losslessness of tree sampling verification, by enumerating ``verify_sampling``.

What is enumerated, and why it is exact
---------------------------------------
``verify_sampling`` is treated as a black box of its uniforms ``u [N, 2]``. Its output (the
emitted tokens: accepted path tokens, then the bonus) is a step function of each uniform, so its
distribution is a finite sum of products of interval lengths, which this module measures:

* at a node ``v`` that the walk is forced to reach, each child's acceptance as a function of that
  child's column-0 uniform (earlier siblings forced rejected) is ``u < t``; ``t`` is found by
  bisection over the bit patterns of the float64s in ``[0, 1)`` (62 halvings), which yields the
  breakpoint exactly: the smallest float that rejects. Then ``P(accept child i | reached v) =
  prod_{j<i} (1 - t_j) * t_i``;
* the token emitted at ``v`` (the bonus with every child forced rejected; in target-only mode the
  sampled token, which decides the child too) as a function of ``v``'s column-1 uniform: the
  smallest float giving a token ``>= k`` is bisected the same way for every ``k``, the lengths
  between these breakpoints are the token probabilities, and every piece is probed at both ends
  to check it is one constant outcome (one token, one child or none);
* forcing: an accepted ancestor gets ``u = 0.0`` in column 0, a rejected sibling the largest
  float below 1.0 (target-only mode: the ancestor's column-1 uniform is the start of the piece
  that leads to the path's next node). Rejection mode probes one sibling rank at a time, so a
  child (or the bonus) is only probed where the walk reaches it with positive probability (after
  a child accepted with ``t = 1`` the later ones have probability 0 and are skipped), and every
  probe then checks, at every bisection step, that the walk really reached ``v`` and that the
  forced rejections held.

Every bisection step of a stage is ONE ``verify_sampling`` call: each probe is its own copy of
the whole tree, with its own tokens and uniforms, in one ``FlatTrees`` batch, and all trees of a
test share the calls.

Recursive rejection mode is lossless only on average over the draft's draws of the children
(ordered, without replacement from ``q``), so every ordered tuple of distinct child tokens is
enumerated at every node, with probability ``q(x1) * q(x2) / (1 - q(x1)) * ...``. What happens
below a child depends only on that child's context, so the distribution is built per
``(node, context)`` and combined recursively, not per whole-tree token assignment (exponential).
Target-only mode has fixed candidates (a seeded choice per context), so each node has one context.

The structural assumptions of the black-box view, which a correct verifier satisfies: a node's
decisions depend on the uniforms named above (not on the exact values of forced uniforms or on
nodes off the path), acceptance is a single threshold, the sampled token is nondecreasing in its
uniform, and tokens of nodes off the probed path do not matter (they take a fixed filler).

Criterion: the "full process" is the verifier's emitted tokens followed by plain sequential
sampling from the target ``p``. For every token sequence ``s`` of length ``1 .. depth + 1``,
``P_full(first |s| tokens = s)`` must equal ``prod_j p(s_j | context + s_<j)`` to 1e-9. This is the
right criterion for variable-length output. The real verifier's error is below 1e-15.

Coverage
--------
Ordered trees with <= 3 children per node number 4 of depth <= 1, 85 of depth <= 2 and 621,436 of
depth <= 3. Rejection mode costs ``V^depth`` contexts per node times ``V! / (V - k)!`` child
tuples, so the depth-3 trees cannot all be enumerated here (the 27 below take ~13 s). Covered,
with a 4-token vocabulary and full-support hashed ``p`` and ``q`` unless stated, both modes:

* every shape of depth <= 2 (85), in breadth-first node order (siblings contiguous) and in
  depth-first preorder (siblings not contiguous): 157 distinct trees;
* every level-uniform depth-3 shape (branching ``(b1, b2, b3)`` in ``{1, 2, 3}^3``, 27 shapes),
  breadth-first order: the shapes tree drafters build;
* Hypothesis-drawn depth-3 shapes (mostly irregular), a few batches of up to 6 trees, random node
  order and model seed;
* children that exhaust a 3-token vocabulary (the all-rejected branch has probability 0);
* a hand-checkable case (root with one child, 2 tokens) with its probabilities written out;
* sensitivity: a 5%-perturbed target row at one internal node makes the comparison fail by far
  more than 1e-6, so the enumeration cannot pass vacuously.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tree_attn_backend.drafting.tree import FlatTrees
from tree_attn_backend.verification.verify import VerifyResult, verify_sampling

Context = tuple[int, ...]
Dist = Callable[[Context], np.ndarray]
Candidates = Callable[[Context, int], tuple[int, ...]]
Verifier = Callable[..., VerifyResult]
Nested = tuple  # a tree node: the tuple of its children, each itself a Nested

TOLERANCE = 1e-9
BELOW_ONE = float(np.nextafter(1.0, 0.0))  # a forced rejection: rejects unless acceptance is certain
ONE_BITS = int(np.float64(1.0).view(np.int64))  # non-negative float64 bit patterns sort like the floats
DEFAULT_U = 0.5  # uniforms the probed walk never looks at


# --- shapes -------------------------------------------------------------------------------


def shapes_up_to_depth(depth: int) -> list[Nested]:
    """Every ordered tree with <= 3 children per node and depth <= ``depth``."""
    if depth == 0:
        return [()]
    sub = shapes_up_to_depth(depth - 1)
    return [kids for k in range(4) for kids in itertools.product(sub, repeat=k)]


def level_uniform(branching: Sequence[int]) -> Nested:
    node: Nested = ()
    for b in reversed(branching):
        node = (node,) * b
    return node


def tree_depth(tree: Nested) -> int:
    return 1 + max(map(tree_depth, tree)) if tree else 0


def max_depth(parents: Sequence[int]) -> int:
    depths = [0] * len(parents)
    for i in range(1, len(parents)):  # parents come first
        depths[i] = depths[parents[i]] + 1
    return max(depths)


def parents_of(tree: Nested, breadth_first: bool) -> tuple[int, ...]:
    """Parent array of ``tree`` in breadth-first order, or depth-first preorder."""
    parents: list[int] = []
    if breadth_first:
        queue = [(tree, -1)]
        for node, parent in queue:  # the queue grows while it is walked
            parents.append(parent)
            queue.extend((child, len(parents) - 1) for child in node)
    else:

        def visit(node: Nested, parent: int) -> None:
            parents.append(parent)
            index = len(parents) - 1
            for child in node:
                visit(child, index)

        visit(tree, -1)
    return tuple(parents)


# --- models -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HashedModel:
    """Target ``p(. | context)`` and draft ``q(. | context)`` for every context, seeded by it.

    Both have full support (weights in [0.1, 1]), so a residual ``norm(max(p - q, 0))`` after a
    rejection is generally not one-hot and the draft's without-replacement update matters.
    """

    vocab: int = 4
    seed: int = 0

    def _dist(self, context: Context, which: int) -> np.ndarray:
        w = np.random.default_rng([self.seed, which, len(context), *context]).uniform(0.1, 1.0, self.vocab)
        return w / w.sum()

    def target(self, context: Context) -> np.ndarray:
        return self._dist(context, 0)

    def draft(self, context: Context) -> np.ndarray:
        return self._dist(context, 1)

    def candidates(self, context: Context, k: int) -> tuple[int, ...]:
        """Target-only mode's fixed children: a seeded choice of ``k`` distinct tokens."""
        rng = np.random.default_rng([self.seed, 2, len(context), *context])
        return tuple(int(x) for x in rng.permutation(self.vocab)[:k])


def draft_tuples(q: np.ndarray, k: int) -> Iterator[tuple[tuple[int, ...], float]]:
    """Every ordered ``k``-tuple of distinct tokens with its probability when drawn from ``q``
    without replacement."""
    for tokens in itertools.permutations(range(len(q)), k):
        weight, left = 1.0, 1.0
        for x in tokens:
            weight *= q[x] / left
            left -= q[x]
        yield tokens, weight


# --- the enumeration ----------------------------------------------------------------------


@dataclass
class _Probe:
    """One tree copy: its tokens, context rows and base uniforms; the walk is forced to
    ``node`` and one uniform, ``at = (node, column)``, is varied.

    ``child >= 0``: is that child accepted (an acceptance threshold); ``child < 0``: which token
    is emitted at ``node``.
    """

    shape: int
    tokens: np.ndarray
    rows: np.ndarray
    uniforms: np.ndarray
    node: int
    depth: int
    at: tuple[int, int]
    child: int = -1
    bonus_only: bool = False  # rejection mode: every child is forced rejected


@dataclass
class _Case:
    """Rejection mode: ``node`` of tree ``shape`` reached at ``context``, its children drawn as
    ``families[node]`` with probability ``weight``; ``reach`` = P(its children probed so far were
    all rejected | node reached)."""

    shape: int
    node: int
    depth: int
    context: Context
    families: dict[int, tuple[int, ...]]  # children's tokens of the path's nodes and of ``node``
    weight: float
    tokens: np.ndarray
    rows: np.ndarray
    base: np.ndarray  # uniforms forcing the walk to ``node``
    reach: float = 1.0

    @property
    def family(self) -> tuple[int, ...]:
        return self.families[self.node]


class _Batch:
    """All probes of a round as one ``FlatTrees``; ``outcome(values)`` is one verifier call."""

    def __init__(self, run: _Enumeration, probes: list[_Probe]):
        self.run, self.probes = run, probes
        parents = [run.parents[p.shape] for p in probes]
        sizes = np.array([len(x) for x in parents])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.trees = FlatTrees(
            qo_indptr=torch.from_numpy(offsets),
            parents=torch.from_numpy(np.concatenate(parents)),
            tokens=torch.from_numpy(np.concatenate([p.tokens for p in probes])),
        )
        rows = np.concatenate([p.rows for p in probes])
        self.target = torch.from_numpy(run.target_table()[rows])
        self.draft = None if run.draft is None else torch.from_numpy(run.draft_table()[rows])
        self.base = np.concatenate([p.uniforms for p in probes])
        self.varied = (offsets[:-1] + np.array([p.at[0] for p in probes]), np.array([p.at[1] for p in probes]))
        self.node = np.array([p.node for p in probes])
        self.depth = np.array([p.depth for p in probes])
        self.child = np.array([p.child for p in probes])
        self.bonus_only = np.array([p.bonus_only for p in probes])
        self.width = int(self.depth.max()) + 2

    def outcome(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(reached ``node``, the child the walk moved to from it or -1, token emitted there)."""
        u = self.base.copy()
        u[self.varied] = values
        result = self.run.verify(self.trees, self.target, self.draft, uniforms=torch.from_numpy(u))
        b = np.arange(len(self.probes))
        nodes = _pad(result.accepted_nodes.numpy(), self.width)
        tokens = _pad(result.output_tokens.numpy(), self.width)
        return nodes[b, self.depth] == self.node, nodes[b, self.depth + 1], tokens[b, self.depth]

    def predicate(self, values: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(False below the probe's breakpoint and True from it on, whether the forcing held)."""
        reached, moved_to, token = self.outcome(values)
        threshold = self.child >= 0
        # An acceptance probe fails its forcing if an earlier sibling (smaller index) was accepted.
        earlier = (moved_to >= 0) & (moved_to < self.child)
        ok = reached & np.where(threshold, ~earlier, ~self.bonus_only | (moved_to < 0))
        return np.where(threshold, moved_to != self.child, token >= k), ok

    def breakpoints(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact breakpoints in [0, 1] (1.0: never True below 1) and whether forcing always held."""
        lo = np.full(len(self.probes), -1, dtype=np.int64)  # bit patterns known False (-1: none)
        hi = np.full(len(self.probes), ONE_BITS, dtype=np.int64)  # known True (1.0 by convention)
        forced = np.ones(len(self.probes), dtype=bool)
        while (active := hi - lo > 1).any():
            # A finished probe re-checks its last False point (or 0.0), to keep its forcing checked.
            mid = np.where(active, (lo + hi) // 2, np.maximum(lo, 0))
            true, ok = self.predicate(mid.view(np.float64), k)
            forced &= ok
            hi, lo = np.where(active & true, mid, hi), np.where(active & ~true, mid, lo)
        return hi.view(np.float64), forced


def _pad(x: np.ndarray, width: int) -> np.ndarray:
    """At least ``width`` columns: the walk's width is the deepest path any request took."""
    return np.pad(x, ((0, 0), (0, max(0, width - x.shape[1]))), constant_values=-1)


class _Enumeration:
    """Exact distribution of the emitted tokens of ``verify`` on every tree of ``shapes``.

    ``target`` / ``draft`` give the rows the verifier sees at each context; ``draft=None`` is
    target-only mode with children ``candidates(context, k)``.
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        target: Dist,
        draft: Dist | None,
        vocab: int,
        root_context: Context,
        candidates: Candidates | None,
        verify: Verifier,
    ):
        self.parents = [np.asarray(p, dtype=np.int64) for p in shapes]
        self.children = [[[i for i, q in enumerate(p) if q == v] for v in range(len(p))] for p in shapes]
        self.target, self.draft, self.vocab = target, draft, vocab
        self.root_context, self.candidates, self.verify = root_context, candidates, verify
        self.contexts: dict[Context, int] = {}
        # (shape, node, context) -> [(probability, child or -1, token)]; tuples already weighted.
        self.outcomes: dict[tuple[int, int, Context], list[tuple[float, int, int]]] = defaultdict(list)

    def row(self, context: Context) -> int:
        return self.contexts.setdefault(context, len(self.contexts))

    def target_table(self) -> np.ndarray:
        return np.stack([self.target(c) for c in self.contexts]).astype(np.float64)

    def draft_table(self) -> np.ndarray:
        return np.stack([self.draft(c) for c in self.contexts]).astype(np.float64)

    def path(self, shape: int, node: int) -> list[int]:
        path = [node]
        while path[-1] != 0:
            path.append(int(self.parents[shape][path[-1]]))
        return path[::-1]

    def assign(self, shape: int, families: dict[int, tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (``families[v]`` for ``v``'s children, a fixed filler elsewhere) and the context
        row of every node."""
        kids = self.children[shape]
        tokens = np.zeros(len(kids), dtype=np.int64)
        tokens[0] = self.root_context[-1]
        for v, family in enumerate(kids):
            tokens[family] = families.get(v, range(len(family)))
        contexts = [self.root_context]
        for i in range(1, len(kids)):  # parents come first
            contexts.append(contexts[self.parents[shape][i]] + (int(tokens[i]),))
        return tokens, np.array([self.row(c) for c in contexts])

    def run(self) -> list[dict[tuple[int, ...], float]]:
        items = [(s, 0, self.root_context, {}) for s in range(len(self.parents))]
        step = self._target_only_round if self.draft is None else self._rejection_round
        while items:  # one round per depth: a node is probed once its parent's forcing is known
            items = step(items)
        return [self._emitted(s, 0, self.root_context, {}) for s in range(len(self.parents))]

    def _emitted(self, shape: int, node: int, context: Context, memo: dict) -> dict[tuple[int, ...], float]:
        key = (node, context)
        if key not in memo:
            out: dict[tuple[int, ...], float] = defaultdict(float)
            for prob, child, token in self.outcomes[(shape, node, context)]:
                if child < 0:
                    out[(token,)] += prob
                else:
                    for seq, p in self._emitted(shape, child, context + (token,), memo).items():
                        out[(token,) + seq] += prob * p
            memo[key] = out
        return memo[key]

    def _token_pieces(self, probes: list[_Probe]) -> list[list[tuple[float, float, int, int]]]:
        """Per token probe: [(start, length, child or -1, token)] for every piece of the token
        emitted at its node with positive length, each checked at both ends to be one outcome."""
        if not probes:
            return []
        batch = _Batch(self, [p for p in probes for _ in range(1, self.vocab)])
        cuts, forced = batch.breakpoints(np.tile(np.arange(1, self.vocab), len(probes)))
        assert forced.all(), "the walk did not reach the probed node, or a forced rejection failed"
        ends, checks = [], []
        for g, probe in enumerate(probes):
            b = np.concatenate([[0.0], cuts[g * (self.vocab - 1) : (g + 1) * (self.vocab - 1)], [1.0]])
            assert (np.diff(b) >= 0).all(), f"the sampled token is not monotone in its uniform: {b}"
            for x in np.flatnonzero(b[1:] > b[:-1]):
                ends.append((g, int(x), b[x], b[x + 1] - b[x]))
                checks += [(probe, b[x]), (probe, float(np.nextafter(b[x + 1], 0.0)))]
        reached, moved_to, token = _Batch(self, [p for p, _ in checks]).outcome(np.array([v for _, v in checks]))
        pieces: list[list[tuple[float, float, int, int]]] = [[] for _ in probes]
        for i, (g, x, start, length) in enumerate(ends):
            lo, hi = 2 * i, 2 * i + 1
            assert reached[lo] and reached[hi] and token[lo] == token[hi] == x and moved_to[lo] == moved_to[hi], (
                f"the piece of token {x} is not one outcome"
            )
            pieces[g].append((start, length, int(moved_to[lo]), x))
        return pieces

    def _target_only_round(self, items: list) -> list:
        """Items ``(shape, node, context, witness)``, ``witness``: column-1 uniforms of the path's
        nodes that lead the walk to ``node``. Records ``node``'s outcomes; returns its children's
        items."""
        probes = []
        for s, v, _, witness in items:
            tokens, rows = self.assign(s, self._candidate_families(s))
            u = np.full((len(tokens), 2), DEFAULT_U)
            for node, value in witness.items():
                u[node, 1] = value
            probes.append(_Probe(s, tokens, rows, u, v, len(self.path(s, v)) - 1, (v, 1)))
        nxt = []
        for (s, v, context, witness), found in zip(items, self._token_pieces(probes)):
            for start, length, child, token in found:
                self.outcomes[(s, v, context)].append((length, child, token))
                if child >= 0:  # the piece's start is a value of v's uniform that leads to this child
                    nxt.append((s, child, context + (token,), {**witness, v: start}))
        return nxt

    def _candidate_families(self, shape: int) -> dict[int, tuple[int, ...]]:
        """Target-only mode: every node's children are the candidates at its context."""
        families, contexts = {}, {0: self.root_context}
        for v, kids in enumerate(self.children[shape]):
            families[v] = self.candidates(contexts[v], len(kids))
            contexts.update((c, contexts[v] + (x,)) for c, x in zip(kids, families[v]))
        return families

    def _rejection_round(self, items: list) -> list:
        """Items ``(shape, node, context, families)``, ``families``: the children's tokens of the
        path's nodes, a draft draw in which the walk reaches ``node``. Records ``node``'s outcomes
        for every draw of its children; returns the items of the children reached."""
        cases = []
        for s, v, context, families in items:
            path = self.path(s, v)
            base = np.full((len(self.parents[s]), 2), DEFAULT_U)
            for a in path[1:]:  # accept every path node, reject its earlier siblings
                base[a, 0] = 0.0
                base[[c for c in self.children[s][self.parents[s][a]] if c < a], 0] = BELOW_ONE
            for family, weight in draft_tuples(self.draft(context), len(self.children[s][v])):
                tokens, rows = self.assign(s, {**families, v: family})
                cases.append(_Case(s, v, len(path) - 1, context, {**families, v: family}, weight, tokens, rows, base))
        nxt, seen = [], set()
        # One stage per sibling rank, so that only children the walk can reach are probed.
        for rank in range(max((len(c.family) for c in cases), default=0)):
            live = [c for c in cases if rank < len(c.family) and c.reach > 0]
            if not live:
                continue
            probes = []
            for c in live:
                kids = self.children[c.shape][c.node]
                u = c.base.copy()
                u[kids[:rank], 0] = BELOW_ONE
                probes.append(_Probe(c.shape, c.tokens, c.rows, u, c.node, c.depth, (kids[rank], 0), child=kids[rank]))
            thresholds, forced = _Batch(self, probes).breakpoints(np.zeros(len(probes), dtype=np.int64))
            assert forced.all(), "the walk did not reach the probed child's decision"
            for c, t in zip(live, thresholds):
                kid, token = self.children[c.shape][c.node][rank], c.family[rank]
                if t > 0:
                    self.outcomes[(c.shape, c.node, c.context)].append((c.weight * c.reach * t, kid, token))
                    key = (c.shape, kid, c.context + (token,))
                    if key not in seen:  # any tuple that reaches the child forces the walk to it
                        seen.add(key)
                        nxt.append((*key, c.families))
                c.reach *= 1.0 - t
        live = [c for c in cases if c.reach > 0]
        probes = []
        for c in live:
            u = c.base.copy()
            u[self.children[c.shape][c.node], 0] = BELOW_ONE
            probes.append(_Probe(c.shape, c.tokens, c.rows, u, c.node, c.depth, (c.node, 1), bonus_only=True))
        for c, found in zip(live, self._token_pieces(probes)):
            for _, length, child, token in found:
                assert child < 0, "a bonus probe moved to a child that was forced rejected"
                self.outcomes[(c.shape, c.node, c.context)].append((c.weight * c.reach * length, -1, token))
        return nxt


def emitted_distributions(
    shapes: Sequence[tuple[int, ...]],
    target: Dist,
    draft: Dist | None,
    vocab: int,
    root_context: Context,
    candidates: Candidates | None = None,
    verify: Verifier = verify_sampling,
) -> list[dict[tuple[int, ...], float]]:
    """Per tree (a parent array), the exact distribution of ``verify``'s emitted tokens.

    ``target`` / ``draft`` are the rows the verifier gets at each context (root context plus path
    tokens); ``draft=None`` is target-only mode with fixed children ``candidates(context, k)``,
    otherwise children are drawn from ``draft`` without replacement and every draw is enumerated.
    """
    return _Enumeration(shapes, target, draft, vocab, root_context, candidates, verify).run()


def max_prefix_error(
    emitted: dict[tuple[int, ...], float], target: Dist, vocab: int, root_context: Context, max_len: int
) -> float:
    """max over ``s``, ``1 <= |s| <= max_len``, of ``|P_full(prefix s) - P_target(s)|``.

    ``P_full``: the emitted tokens followed by sequential sampling from ``target``; a sequence
    ``e`` shorter than ``s`` and a prefix of it continues with ``P_target(s) / P_target(e)``.
    """
    p_target: dict[tuple[int, ...], float] = {(): 1.0}
    worst = 0.0
    for length in range(1, max_len + 1):
        for s in itertools.product(range(vocab), repeat=length):
            p_target[s] = p_target[s[:-1]] * float(target(root_context + s[:-1])[s[-1]])
            full = sum(p for e, p in emitted.items() if len(e) >= length and e[:length] == s)
            full += sum(emitted.get(s[:j], 0.0) * p_target[s] / p_target[s[:j]] for j in range(1, length))
            worst = max(worst, abs(full - p_target[s]))
    return worst


def lossless_error(
    trees: Sequence[tuple[int, ...]],
    model: HashedModel,
    mode: str,
    verifier_target: Dist | None = None,
    verify: Verifier = verify_sampling,
) -> float:
    """Largest ``max_prefix_error`` over ``trees`` (parent arrays) for ``model`` in ``mode``, all
    enumerated in one batch; the verifier sees ``verifier_target`` (default: the model's target),
    the comparison always uses the model's."""
    root_context = (model.vocab - 1,)
    emitted = emitted_distributions(
        trees,
        verifier_target or model.target,
        model.draft if mode == "rejection" else None,
        model.vocab,
        root_context,
        model.candidates,
        verify,
    )
    return max(
        max_prefix_error(e, model.target, model.vocab, root_context, max_depth(t) + 1) for t, e in zip(trees, emitted)
    )


MODES = ["target_only", "rejection"]


# --- tests --------------------------------------------------------------------------------


def test_hand_checkable_root_with_one_child():
    """Root context (0,), vocab 2: p = (0.3, 0.7) at the root, (0.9, 0.1) after 0, (0.25, 0.75)
    after 1; draft q = (0.6, 0.4) at the root.

    Target-only, candidate 1: emit 0 (0.3), or accept 1 (0.7) then draw from p after 1.
    Rejection: the draft picks 0 (0.6), accepted with 0.3/0.6 = 0.5, else the residual
    max(p - q, 0) = (0, 0.3) emits 1; or it picks 1 (0.4), accepted surely (0.7 >= 0.4).
    """
    table = {(0,): [0.3, 0.7], (0, 0): [0.9, 0.1], (0, 1): [0.25, 0.75]}
    target = lambda c: np.array(table[c])  # noqa: E731
    draft = lambda c: np.array([0.6, 0.4])  # noqa: E731
    shape = [(-1, 0)]
    (only,) = emitted_distributions(shape, target, None, 2, (0,), candidates=lambda c, k: (1,) * k)
    assert only == pytest.approx({(0,): 0.3, (1, 0): 0.7 * 0.25, (1, 1): 0.7 * 0.75}, abs=1e-12)
    (rejection,) = emitted_distributions(shape, target, draft, 2, (0,))
    want = {(0, 0): 0.3 * 0.9, (0, 1): 0.3 * 0.1, (1,): 0.3, (1, 0): 0.4 * 0.25, (1, 1): 0.4 * 0.75}
    assert rejection == pytest.approx(want, abs=1e-12)
    for emitted in (only, rejection):
        assert max_prefix_error(emitted, target, 2, (0,), 2) < TOLERANCE


@pytest.mark.parametrize("mode", MODES)
def test_every_shape_up_to_depth_2(mode):
    shapes = shapes_up_to_depth(2)
    assert len(shapes) == 85
    # Both node orders; they coincide for the 13 shapes whose depth-1 nodes but the last are leaves.
    trees = sorted({parents_of(t, breadth_first) for t in shapes for breadth_first in (False, True)})
    assert len(trees) == 85 + 72
    assert lossless_error(trees, HashedModel(), mode) < TOLERANCE


@pytest.mark.parametrize("mode", MODES)
def test_every_level_uniform_depth_3_shape(mode):
    trees = [parents_of(level_uniform(b), breadth_first=True) for b in itertools.product((1, 2, 3), repeat=3)]
    assert lossless_error(trees, HashedModel(), mode) < TOLERANCE


@st.composite
def depth_3_trees(draw: st.DrawFn) -> tuple[int, ...]:
    """A tree of depth exactly 3, <= 3 children per node, in either node order."""

    def node(depth: int) -> Nested:
        return () if depth == 3 else tuple(node(depth + 1) for _ in range(draw(st.integers(0, 3))))

    tree = node(0)
    assume(tree_depth(tree) == 3)
    return parents_of(tree, draw(st.booleans()))


@settings(max_examples=4, deadline=None)
@given(
    trees=st.lists(depth_3_trees(), min_size=1, max_size=6).filter(lambda ts: sum(map(len, ts)) <= 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_depth_3_shapes(trees, seed):
    for mode in MODES:
        assert lossless_error(trees, HashedModel(seed=seed), mode) < TOLERANCE


@pytest.mark.parametrize("mode", MODES)
def test_children_exhausting_the_vocabulary(mode):
    shapes = [level_uniform(b) for b in ((3,), (3, 3), (2, 3), (3, 1), (3, 3, 1))]
    trees = sorted({parents_of(t, breadth_first) for t in shapes for breadth_first in (False, True)})
    assert lossless_error(trees, HashedModel(vocab=3), mode) < TOLERANCE


@pytest.mark.parametrize("mode", MODES)
def test_enumeration_detects_a_perturbed_target_row(mode):
    """The verifier gets a 5%-perturbed target row at the root's first child (an internal node
    of the (2, 2) tree); the comparison must fail by far more than the tolerance."""
    model = HashedModel()
    root_context = (model.vocab - 1,)
    perturbed = root_context + model.candidates(root_context, 2)[:1]

    def target(context: Context) -> np.ndarray:
        p = model.target(context)
        if context == perturbed:
            p = p * np.array([1.05, 1.0, 1.0, 1.0])
        return p / p.sum()

    assert lossless_error([parents_of(level_uniform((2, 2)), True)], model, mode, verifier_target=target) > 1e-6

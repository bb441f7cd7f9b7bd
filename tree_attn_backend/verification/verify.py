"""Tree verification: which draft path the target accepts, and the bonus token after it.

Every mode first decides, for every node ``u`` of every tree at once, which child the
target would move to from ``u`` (``next_child[u]``, or -1 to stop) and which token it would
emit if it stopped at ``u`` (``bonus[u]``). A single walk from each root then follows
``next_child``; its length is bounded by the tree depth, not the node count.

Modes (all lossless; sibling tokens are distinct, so at most one child matches):

* greedy: the target token at ``u`` is ``argmax`` of its logits; follow the child with that
  token. Exactly the tokens plain greedy decoding produces.
* target-only sampling (deterministic candidates, e.g. a lookup drafter): draw ``y ~ p_u``
  at every node; follow the child whose token is ``y``, else emit ``y``. Each emitted token is
  a sample of the target distribution given the accepted prefix. :func:`verify_target_tokens`
  takes those tokens directly, so a caller can draw them with its own sampler: the vLLM plugin
  uses vLLM's, with one draw per depth, so a seeded request emits exactly the tokens plain
  decoding with that seed emits.
* recursive rejection sampling (children drawn from the draft distribution ``q_u`` without
  replacement; SpecInfer's multi-step speculative sampling adapted to distinct children):
  try children in order; accept child ``x`` with probability ``min(1, p(x) / q(x))``; on
  rejection ``p <- norm(max(p - q, 0))`` and ``q <- norm(q with x removed)``; if all are
  rejected, sample the bonus from the final ``p``. On a chain this is standard speculative
  sampling, i.e. what vLLM's chain ``RejectionSampler`` does.

Randomness comes from ``uniforms`` ``[N, 2]`` in ``[0, 1)``: column 0 decides a node's
acceptance as a child, column 1 samples at the node (by inverse CDF), so tests can replay
exactly the same draws through a sequential oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tree_attn_backend.drafting.tree import FlatTrees


@dataclass
class VerifyResult:
    """Per request: the accepted path and what to emit.

    Attributes:
        accepted_nodes: int64 ``[B, D+1]``: local node indices from the root (index 0) along
            the accepted path, ``-1`` padded (``D`` = deepest tree of the batch).
        num_accepted: int64 ``[B]``: accepted draft nodes (the root is not counted).
        bonus_tokens: int64 ``[B]``: the target's token after the accepted path.
        output_tokens: int64 ``[B, D+1]``: accepted draft tokens then the bonus token,
            ``-1`` padded (vLLM's sampled-token layout).
    """

    accepted_nodes: torch.Tensor
    num_accepted: torch.Tensor
    bonus_tokens: torch.Tensor
    output_tokens: torch.Tensor


def _walk(trees: FlatTrees, next_child: torch.Tensor, bonus: torch.Tensor) -> VerifyResult:
    roots = trees.qo_indptr[:-1]
    depth_bound = int((trees.qo_indptr[1:] - roots).max())  # a path never has more nodes
    cur = roots.clone()
    path = [cur]
    for _ in range(depth_bound - 1):
        nxt = next_child[cur]
        moved = nxt >= 0
        if not bool(moved.any()):
            break
        cur = torch.where(moved, nxt, cur)
        path.append(torch.where(moved, cur, torch.full_like(cur, -1)))
    nodes = torch.stack(path, dim=1)  # global indices, -1 after the path ends
    # A request that stopped keeps -1 from then on: mask everything after its first -1.
    alive = torch.cumprod((nodes >= 0).to(torch.int64), dim=1).bool()
    nodes = torch.where(alive, nodes, torch.full_like(nodes, -1))
    num_accepted = alive.sum(dim=1) - 1
    last = nodes.gather(1, num_accepted[:, None])[:, 0]
    bonus_tokens = bonus[last]
    local = torch.where(alive, nodes - roots[:, None], nodes)
    out = torch.full_like(nodes, -1)
    draft = alive[:, 1:]
    out[:, :-1][draft] = trees.tokens[nodes[:, 1:][draft]]
    out.scatter_(1, num_accepted[:, None], bonus_tokens[:, None])
    return VerifyResult(accepted_nodes=local, num_accepted=num_accepted, bonus_tokens=bonus_tokens, output_tokens=out)


def _follow_matching_child(trees: FlatTrees, target_tokens: torch.Tensor) -> torch.Tensor:
    """``next_child[u]`` = the child of ``u`` whose token is ``target_tokens[u]``, else -1."""
    parents = trees.global_parents()
    is_child = parents >= 0
    match = is_child & (trees.tokens == target_tokens[parents.clamp(min=0)])
    next_child = torch.full_like(parents, -1)
    children = torch.nonzero(match).flatten()
    next_child[parents[children]] = children
    return next_child


def _check_vocab(trees: FlatTrees, name: str, values: torch.Tensor) -> None:
    if values.dim() != 2 or values.shape[0] != trees.num_nodes:
        raise ValueError(f"{name} has shape {tuple(values.shape)}, expected [{trees.num_nodes}, vocab]")
    if trees.num_nodes and int(trees.tokens.max()) >= values.shape[1]:
        raise ValueError(f"token id {int(trees.tokens.max())} is outside the vocabulary of {name} ({values.shape[1]})")


def _uniforms(trees: FlatTrees, uniforms: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    if uniforms is None:
        return torch.rand(trees.num_nodes, 2, generator=generator, dtype=torch.float64)
    if uniforms.shape != (trees.num_nodes, 2):
        raise ValueError(f"uniforms has shape {tuple(uniforms.shape)}, expected [{trees.num_nodes}, 2]")
    return uniforms.to(torch.float64)


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of (unnormalized, non-negative) ``probs [M, V]`` from ``u [M]``."""
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    target = u.to(torch.float64) * cdf[:, -1]
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp(max=probs.shape[1] - 1)


def verify_target_tokens(trees: FlatTrees, target_tokens: torch.Tensor) -> VerifyResult:
    """Verification against the token the target emits at every node.

    ``target_tokens``: int64 ``[N]``, the target's token at each node (its argmax, or its
    sample). The walk follows the child whose token matches and emits the target's token where
    none does. Lossless for sampling when the draws at different depths are independent: the
    path to a depth-``d`` node is decided by draws at depths ``< d`` only, so the token emitted
    at depth ``d`` is a fresh sample of the target at its context; nodes of one depth may share
    a draw (at most one of them is on the path).
    """
    if target_tokens.shape != (trees.num_nodes,):
        raise ValueError(f"target_tokens has shape {tuple(target_tokens.shape)}, expected [{trees.num_nodes}]")
    target_tokens = target_tokens.to(torch.int64)
    return _walk(trees, _follow_matching_child(trees, target_tokens), target_tokens)


def verify_greedy(trees: FlatTrees, target_logits: torch.Tensor) -> VerifyResult:
    """Greedy verification; ``target_logits [N, V]`` are the target's logits at every node."""
    _check_vocab(trees, "target_logits", target_logits)
    return verify_target_tokens(trees, target_logits.argmax(dim=-1))


def verify_sampling(
    trees: FlatTrees,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Lossless sampling verification.

    Args:
        target_probs: ``[N, V]`` target distribution at every node (temperature, top-k/p
            already applied).
        draft_probs: ``[N, V]`` draft distribution at every node, from which its children were
            drawn without replacement; ``None`` for deterministic candidates (target-only).
        uniforms: float ``[N, 2]`` in ``[0, 1)`` (see the module docstring), or drawn from
            ``generator``.
    """
    _check_vocab(trees, "target_probs", target_probs)
    u = _uniforms(trees, uniforms, generator)
    if draft_probs is None:
        return verify_target_tokens(trees, sample_inverse_cdf(target_probs, u[:, 1]))
    _check_vocab(trees, "draft_probs", draft_probs)
    return _recursive_rejection(trees, target_probs.to(torch.float64), draft_probs.to(torch.float64), u)


def _normalize(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    total = x.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, x / total.clamp(min=1e-300), fallback)


def _recursive_rejection(trees: FlatTrees, p: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> VerifyResult:
    parents = trees.global_parents()
    n = trees.num_nodes
    children = torch.nonzero(parents >= 0).flatten()  # ascending node index = sibling order
    order = torch.argsort(parents[children] * n + children)
    children = children[order]
    child_parent = parents[children]
    # Rank of each child among its siblings: position minus the position of its group's first.
    first = torch.ones_like(child_parent, dtype=torch.bool)
    first[1:] = child_parent[1:] != child_parent[:-1]
    group_start = torch.cummax(torch.where(first, torch.arange(len(children)), 0), dim=0).values
    rank = torch.arange(len(children)) - group_start

    next_child = torch.full((n,), -1, dtype=torch.int64)
    decided = torch.zeros(n, dtype=torch.bool)
    p, q = p.clone(), q.clone()
    for r in range(int(rank.max()) + 1 if len(children) else 0):
        at = rank == r
        kid, node = children[at], child_parent[at]
        open_ = ~decided[node]
        kid, node = kid[open_], node[open_]
        x = trees.tokens[kid]
        px, qx = p[node, x], q[node, x]
        ratio = torch.where(qx > 0, (px / qx.clamp(min=1e-300)).clamp(max=1.0), (px > 0).to(p.dtype))
        accept = u[kid, 0] < ratio
        next_child[node[accept]] = kid[accept]
        decided[node[accept]] = True
        rej, x_rej = node[~accept], x[~accept]
        p[rej] = _normalize((p[rej] - q[rej]).clamp(min=0), p[rej])
        q[rej, x_rej] = 0
        q[rej] = _normalize(q[rej], q[rej])
    bonus = sample_inverse_cdf(p, u[:, 1])
    return _walk(trees, next_child, bonus)

"""Sequential, obviously-correct oracles for verification: one request, one node at a time.

They share no code with :mod:`tree_attn_backend.verification.verify` (not even the inverse-CDF sampler).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def children_of(parents: Sequence[int], node: int) -> list[int]:
    return [i for i, p in enumerate(parents) if p == node]


def draw(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from unnormalized probabilities, scanning left to right."""
    target = u * float(np.sum(probs, dtype=np.float64))
    running = 0.0
    for token, p in enumerate(probs.tolist()):
        running += p
        if running > target:
            return token
    return len(probs) - 1


def greedy_walk(parents, tokens, logits: np.ndarray) -> tuple[list[int], int]:
    """(accepted path from the root, bonus token) for one tree."""
    node, path = 0, [0]
    while True:
        want = int(np.argmax(logits[node]))
        nxt = [c for c in children_of(parents, node) if tokens[c] == want]
        if not nxt:
            return path, want
        node = nxt[0]
        path.append(node)


def target_only_walk(parents, tokens, probs: np.ndarray, u: np.ndarray) -> tuple[list[int], int]:
    node, path = 0, [0]
    while True:
        y = draw(probs[node], u[node, 1])
        nxt = [c for c in children_of(parents, node) if tokens[c] == y]
        if not nxt:
            return path, y
        node = nxt[0]
        path.append(node)


def rejection_walk(parents, tokens, target: np.ndarray, draft: np.ndarray, u: np.ndarray) -> tuple[list[int], int]:
    """Recursive rejection sampling over distinct children, one child at a time."""
    node, path = 0, [0]
    while True:
        p, q = target[node].astype(np.float64).copy(), draft[node].astype(np.float64).copy()
        moved = False
        for child in children_of(parents, node):
            x = tokens[child]
            ratio = min(1.0, p[x] / q[x]) if q[x] > 0 else (1.0 if p[x] > 0 else 0.0)
            if u[child, 0] < ratio:
                node, moved = child, True
                path.append(child)
                break
            residual = np.maximum(p - q, 0.0)
            if residual.sum() > 0:
                p = residual / residual.sum()
            q[x] = 0.0
            if q.sum() > 0:
                q = q / q.sum()
        if not moved:
            return path, draw(p, u[node, 1])


def chain_speculative_sampling(tokens, target: np.ndarray, draft: np.ndarray, u: np.ndarray) -> list[int]:
    """Standard (Leviathan et al.) speculative sampling of one chain: the emitted tokens.

    ``tokens[0]`` is the root; draft ``i`` was sampled from ``draft[i-1]``.
    """
    out = []
    for i in range(1, len(tokens)):
        p, q, x = target[i - 1], draft[i - 1], tokens[i]
        if u[i, 0] < min(1.0, p[x] / q[x]):
            out.append(int(x))
            continue
        residual = np.maximum(p - q, 0.0)
        out.append(draw(residual, u[i - 1, 1]))
        return out
    out.append(draw(target[len(tokens) - 1], u[len(tokens) - 1, 1]))
    return out

"""``tree-pruned bench replay``: pruning thresholds scored offline on greedy outputs.

Greedy tree verification accepts exactly the longest tree path that matches the target's own
greedy continuation, so given a request's greedy output the whole speculative run can be
replayed without the target: at every step the drafter sees prompt + output so far, the tree is
grown and pruned, the accepted length is the matched path, and the output advances by it plus
the bonus token. Draft and accepted tokens per step come out exactly as the engine would count
them, for any number of pruning settings, in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tree_attn_backend.drafting.lookup_drafter import LookupIndex
from tree_attn_backend.drafting.pruning import PruningPolicy, expand_and_prune
from tree_attn_backend.drafting.tree_shape import TreeShape


@dataclass(frozen=True)
class ReplaySetting:
    """One drafter + pruning setting to score."""

    name: str
    policy: PruningPolicy
    smoothing: float
    min_ngram: int = 1
    max_ngram: int = 4


def replay(
    shape: TreeShape,
    setting: ReplaySetting,
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    max_tokens: int | None = None,
) -> tuple[float, float]:
    """``(draft tokens per step, accepted tokens per step)`` over every request's decode steps
    (steps after its first output token, which the prefill produces). ``max_tokens``: the
    requests' limit, which stops their trees as in the engine (``None``: none)."""
    drafted = accepted = steps = 0
    for prompt, output in zip(prompts, outputs):
        output = list(output)
        index = LookupIndex(setting.min_ngram, setting.max_ngram, setting.smoothing)
        index.extend(list(prompt) + output[:1])
        pos = 1
        while pos < len(output):
            policy = setting.policy.within_tokens_left(
                None if max_tokens is None else max_tokens - pos, shape.max_depth
            )
            tree, _ = expand_and_prune(shape, index, index.tokens, policy)
            node, matched = 0, 0
            while pos + matched < len(output):
                children = np.flatnonzero(tree.parents == node)
                hit = children[tree.tokens[children] == output[pos + matched]]
                if hit.size == 0:
                    break
                node, matched = int(hit[0]), matched + 1
            kept = min(matched, len(output) - pos - 1)  # what fits before the output ends
            drafted += tree.num_nodes - 1
            accepted += kept
            steps += 1
            index.extend(output[pos : pos + kept + 1])
            pos += kept + 1
    return drafted / max(steps, 1), accepted / max(steps, 1)


def replay_settings(path_probs: Sequence[float]) -> list[ReplaySetting]:
    """The static tree, the engine's defaults, and the defaults with each path threshold."""
    from tree_attn_backend.vllm_plugin import DEFAULT_NUM_SPECULATIVE_TOKENS
    from tree_attn_backend.vllm_plugin.config import TreePrunedConfig

    defaults = TreePrunedConfig()
    max_nodes = min(defaults.max_draft_tokens, DEFAULT_NUM_SPECULATIVE_TOKENS)
    settings = [
        ReplaySetting("static_tree", PruningPolicy(0.0, 0.0, max_nodes), defaults.drafter_smoothing),
        ReplaySetting("defaults", defaults.policy(DEFAULT_NUM_SPECULATIVE_TOKENS), defaults.drafter_smoothing),
    ]
    settings += [
        ReplaySetting(
            f"path_prob={p}", PruningPolicy(defaults.prune_min_prob, p, max_nodes), defaults.drafter_smoothing
        )
        for p in path_probs
    ]
    return settings


def replay_rows(
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    settings: Sequence[ReplaySetting],
    max_tokens: int | None = None,
) -> list[dict]:
    """One row per setting (``max_tokens``: see :func:`replay`); the first setting is the
    reference of the ``fewer_*`` columns."""
    from tree_attn_backend.vllm_plugin.config import TreePrunedConfig

    shape = TreePrunedConfig().shape
    rows: list[dict[str, Any]] = []
    for setting in settings:
        drafted, accepted = replay(shape, setting, prompts, outputs, max_tokens)
        rows.append(
            {
                "setting": setting.name,
                "min_prob": setting.policy.min_node_prob,
                "path_prob": setting.policy.min_path_prob,
                "smoothing": setting.smoothing,
                "draft_tokens_per_step": round(drafted, 3),
                "accepted_tokens_per_step": round(accepted, 3),
            }
        )
    base = rows[0]
    for row in rows:
        row["fewer_drafts"] = (
            round(1 - row["draft_tokens_per_step"] / base["draft_tokens_per_step"], 3)
            if base["draft_tokens_per_step"]
            else None
        )
        row["fewer_accepted"] = (
            round(1 - row["accepted_tokens_per_step"] / base["accepted_tokens_per_step"], 3)
            if base["accepted_tokens_per_step"]
            else None
        )
    return rows

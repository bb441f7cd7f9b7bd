"""``tree-pruned bench replay``: drafters and pruning settings scored offline on greedy outputs.

Greedy tree verification accepts exactly the longest tree path that matches the target's own
greedy continuation, so given a request's greedy output the whole speculative run can be
replayed without the target: at every step the engine's own proposer
(:class:`~tree_attn_backend.vllm_plugin.proposer.TreeProposer`) sees prompt + output so far and
grows and prunes its tree, the accepted length is the matched path, the output advances by it
plus the bonus token, and the proposer hears the verdict as it does in the engine. Draft and
accepted tokens per step come out exactly as the engine counts them, for any number of
settings, in seconds: for ``lookup`` (each request's own tokens) at any concurrency, for
``suffix`` (its cache learns from earlier requests) at one request at a time, the requests in
the engine's order.

``recycle`` and ``hybrid`` cannot be replayed: the recycle table holds the target's candidates
after every verified draft, rejected ones included (contexts the greedy output never had, which
only the target can score), and recording only the accepted ones drafts measurably worse (on
the tuning prompts, 13% fewer accepted tokens per step for the hybrid).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tree_attn_backend.drafting.tree import DraftTree
    from tree_attn_backend.vllm_plugin.proposer import TreeProposer

# Drafters whose trees depend only on the requests' tokens.
REPLAYABLE_DRAFTERS = ("lookup", "suffix")


@dataclass(frozen=True)
class ReplaySetting:
    """One setting to score: a name and its ``tree_pruned`` options (as the server's
    ``--additional-config``, with a ``drafter`` from :data:`REPLAYABLE_DRAFTERS`; the batch
    budget is off: it decides by time, which a replay has not)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


def _proposer(setting: ReplaySetting) -> TreeProposer:
    """The engine's proposer with the setting's options, as vLLM would build it."""
    from tree_attn_backend.vllm_plugin import DEFAULT_NUM_SPECULATIVE_TOKENS
    from tree_attn_backend.vllm_plugin.proposer import TreeProposer

    vllm_config = SimpleNamespace(
        additional_config={"tree_pruned": {**setting.options, "batch_budget": False}},
        speculative_config=SimpleNamespace(num_speculative_tokens=DEFAULT_NUM_SPECULATIVE_TOKENS),
        model_config=SimpleNamespace(get_vocab_size=lambda: 1),  # the vocabulary sizes the recycle table only
    )
    proposer = TreeProposer(vllm_config)  # checks the options, naming a bad value
    if proposer.config.drafter not in REPLAYABLE_DRAFTERS:
        raise ValueError(
            f"setting {setting.name!r}: drafter {proposer.config.drafter!r} cannot be replayed (the recycle "
            f"table needs the target's candidates after rejected drafts); these can: {list(REPLAYABLE_DRAFTERS)}"
        )
    return proposer


def _matched_path(tree: DraftTree, continuation: Sequence[int]) -> list[int]:
    """The nodes of ``tree``'s longest path from the root that spells ``continuation``'s start,
    root first (greedy verification's accepted path)."""
    path = [0]
    for token in continuation:
        children = np.flatnonzero((tree.parents == path[-1]) & (tree.tokens == token))
        if children.size == 0:
            break
        path.append(int(children[0]))
    return path


def replay(
    setting: ReplaySetting,
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    max_tokens: int | None = None,
) -> tuple[float, float]:
    """``(draft tokens per step, accepted tokens per step)`` over every request's decode steps
    (steps after its first output token, which the prefill produces), the requests one after
    another in the given order.

    Args:
        setting: the drafter and pruning to replay.
        prompts, outputs: per request, its prompt's and its greedy output's token ids.
        max_tokens: the requests' limit, which stops their trees as in the engine (``None``: none).
    """
    from tree_attn_backend.vllm_plugin.verification_kind import Verification

    proposer = _proposer(setting)
    drafting = proposer.drafting_for(proposer.config, Verification.TREE)
    drafted = accepted = steps = 0
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        req_id, prompt, output = f"replay-{i}", list(prompt), list(output)
        max_length = None if max_tokens is None else len(prompt) + max_tokens
        pos = 1
        while True:  # the engine proposes after every step, its last one included
            tokens = np.array([prompt + output[:pos]])
            proposer.bind_batch([req_id], [drafting], [len(prompt)], [max_length])
            proposer.propose([[output[pos - 1]]], np.array([tokens.shape[1]]), tokens)
            if pos >= len(output):
                break
            tree = proposer.trees[req_id]
            path = _matched_path(tree, output[pos:])
            kept = min(len(path) - 1, len(output) - pos - 1)  # what fits before the output ends
            if tree.num_nodes > 1:  # a step without drafts verifies nothing
                proposer.record_acceptance([req_id], np.array([tree.num_nodes - 1]), np.array([path[: kept + 1]]))
            drafted += tree.num_nodes - 1
            accepted += kept
            steps += 1
            pos += kept + 1
        proposer.forget(req_id)
    return drafted / max(steps, 1), accepted / max(steps, 1)


def replay_settings(path_probs: Sequence[float], drafters: Sequence[str] = ("lookup",)) -> list[ReplaySetting]:
    """Per drafter (each one of :data:`REPLAYABLE_DRAFTERS`): the static tree, the engine's
    defaults, and the defaults with each path threshold. Raises ``ValueError`` naming a bad
    option value or drafter."""
    settings = []
    for drafter in drafters:
        settings += [
            ReplaySetting("static_tree", {"drafter": drafter, "prune_min_prob": 0.0, "prune_path_prob": 0.0}),
            ReplaySetting("defaults", {"drafter": drafter}),
        ]
        settings += [ReplaySetting(f"path_prob={p}", {"drafter": drafter, "prune_path_prob": p}) for p in path_probs]
    for setting in settings:  # a bad value fails here, naming the option
        _proposer(setting)
    return settings


def replay_rows(
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    settings: Sequence[ReplaySetting],
    max_tokens: int | None = None,
) -> list[dict]:
    """One row per setting (arguments: see :func:`replay`); each drafter's first setting is
    the reference of its rows' ``fewer_*`` columns."""
    rows: list[dict[str, Any]] = []
    for setting in settings:
        config = _proposer(setting).config
        drafted, accepted = replay(setting, prompts, outputs, max_tokens)
        rows.append(
            {
                "setting": setting.name,
                "drafter": config.drafter,
                "min_prob": config.prune_min_prob,
                "path_prob": config.prune_path_prob,
                "draft_tokens_per_step": round(drafted, 3),
                "accepted_tokens_per_step": round(accepted, 3),
            }
        )
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        base = first.setdefault(row["drafter"], row)
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

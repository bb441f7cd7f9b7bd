"""The ``tree_pruned`` options, read from ``--additional-config '{"tree_pruned": {...}}'``.

This module does not import vLLM: it validates a plain dict, so start-up stops with a
message naming the option and its allowed range before any engine work happens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ..pruning import PruningPolicy
from ..tree_shape import TreeShape
from ..verify_budget import VerifyCostModel

# Up to 3 candidates at the root, 2 below, then chains: 81 nodes, depth 8. Pruning keeps a
# small part of it; the shape only bounds what the drafter may propose.
DEFAULT_TOKEN_TREE = TreeShape.full([3, 2, 2, 1, 1, 1, 1, 1]).to_text()

# What a request may set for itself through ``SamplingParams.extra_args["tree_pruned"]``
# (``vllm_xargs`` in the OpenAI API); the rest is engine-wide.
PER_REQUEST_OPTIONS = ("prune_min_prob", "prune_path_prob", "max_draft_tokens", "batch_budget")


@dataclass(frozen=True)
class TreePrunedConfig:
    """Options of the TREE_PRUNED path.

    Attributes:
        speculative_token_tree: static maximum tree, vLLM's old syntax.
        prune_min_prob: drop a node (and its subtree) whose own draft probability is below.
        prune_path_prob: drop a node whose path probability is below.
        max_draft_tokens: draft nodes per request and step (root excluded); at most the
            speculative config's ``num_speculative_tokens``.
        drafter_min_ngram, drafter_max_ngram: n-gram lengths of the lookup drafter.
        drafter_smoothing: added to a context's continuation count total.
        log_every_steps: a tree-size log line every this many verify steps (0 = never).
        batch_budget: allocate verified draft tokens batch-wide by marginal value against the
            step cost model (:mod:`tree_attn_backend.verify_budget`); off = every request
            keeps its pruned tree.
        cost_model: the budget's step cost model as ``{"step_ms", "token_ms",
            "draft_token_ms", "draft_step_ms"}`` (see ``VerifyCostModel``), fixed; ``None`` =
            measured: forward passes timed at start-up, then refitted from served steps.
    """

    speculative_token_tree: str = DEFAULT_TOKEN_TREE
    prune_min_prob: float = 0.05
    prune_path_prob: float = 0.08
    max_draft_tokens: int = 16
    drafter_min_ngram: int = 1
    drafter_max_ngram: int = 4
    drafter_smoothing: float = 0.5
    log_every_steps: int = 50
    batch_budget: bool = True
    cost_model: "dict | None" = None

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"tree_pruned option {name} = {getattr(self, name)!r}: must be {allowed}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("prune_min_prob", "prune_path_prob"):
            value = getattr(self, name)
            require(is_num(value) and 0.0 <= value <= 1.0, name, "a number in [0, 1]")
        require(is_int(self.max_draft_tokens) and 1 <= self.max_draft_tokens <= 127, "max_draft_tokens", "an integer in [1, 127]")
        require(is_int(self.drafter_min_ngram) and 1 <= self.drafter_min_ngram <= 16, "drafter_min_ngram", "an integer in [1, 16]")
        require(
            is_int(self.drafter_max_ngram) and self.drafter_min_ngram <= self.drafter_max_ngram <= 16,
            "drafter_max_ngram",
            "an integer in [drafter_min_ngram, 16]",
        )
        require(is_num(self.drafter_smoothing) and self.drafter_smoothing >= 0, "drafter_smoothing", "a number >= 0")
        require(is_int(self.log_every_steps) and self.log_every_steps >= 0, "log_every_steps", "an integer >= 0")
        require(isinstance(self.batch_budget, bool), "batch_budget", "true or false")
        if self.cost_model is not None:
            require(isinstance(self.cost_model, dict), "cost_model", "null (measured) or a JSON object")
            try:
                self.configured_cost_model()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"tree_pruned option cost_model = {self.cost_model!r}: {exc}") from None
        try:
            TreeShape.parse(self.speculative_token_tree)
        except ValueError as exc:
            raise ValueError(f"tree_pruned option speculative_token_tree: {exc}") from None

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "TreePrunedConfig":
        """Read ``additional_config["tree_pruned"]`` (absent = defaults); unknown keys are errors."""
        options = (additional_config or {}).get("tree_pruned", {}) if isinstance(additional_config, dict) else {}
        if not isinstance(options, dict):
            raise ValueError(f"additional_config tree_pruned = {options!r}: must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown tree_pruned option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def for_request(self, extra_args: Any) -> "TreePrunedConfig":
        """This config with a request's own ``extra_args["tree_pruned"]`` overrides (only
        :data:`PER_REQUEST_OPTIONS`); errors name the bad key or value."""
        options = (extra_args or {}).get("tree_pruned") if isinstance(extra_args, dict) else None
        if options is None:
            return self
        if not isinstance(options, dict):
            raise ValueError(f"extra_args tree_pruned = {options!r}: must be a JSON object")
        not_per_request = sorted(set(options) - set(PER_REQUEST_OPTIONS))
        if not_per_request:
            raise ValueError(f"tree_pruned option(s) {not_per_request} cannot be set per request; these can: {list(PER_REQUEST_OPTIONS)}")
        return replace(self, **options)

    def configured_cost_model(self) -> "VerifyCostModel | None":
        """The configured cost model, or ``None`` when it is to be measured."""
        return None if self.cost_model is None else VerifyCostModel(**self.cost_model)

    @property
    def shape(self) -> TreeShape:
        return TreeShape.parse(self.speculative_token_tree)

    def policy(self, num_speculative_tokens: int) -> PruningPolicy:
        return PruningPolicy(
            min_node_prob=float(self.prune_min_prob),
            min_path_prob=float(self.prune_path_prob),
            max_nodes=min(self.max_draft_tokens, num_speculative_tokens),
        )

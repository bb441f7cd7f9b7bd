"""The ``tree_pruned`` options: server-wide and per request.

Server-wide options come from ``--additional-config '{"tree_pruned": {...}}'``; a request sets
its own share through flat keys of ``SamplingParams.extra_args`` (``vllm_xargs`` in the OpenAI
API), or the nested ``{"tree_pruned": {...}}`` form in Python. Every value is checked here,
once, before any engine work: an error is one line naming the option, the value and the
allowed range. This module does not import vLLM: it validates plain values.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tree_attn_backend.drafting.pruning import PruningPolicy
from tree_attn_backend.drafting.tree_shape import TreeShape
from tree_attn_backend.drafting.verify_budget import VerifyCostModel
from tree_attn_backend.ops.packed_linear import DEFAULT_MAX_ROWS

# Up to 3 candidates at the root, 2 below, then chains as deep as the default 32 draft
# tokens: 369 nodes, depth 32. Pruning keeps a small part of it; the shape only bounds what
# the drafter may propose (deep chains pay when a whole answer repeats).
DEFAULT_TOKEN_TREE = TreeShape.full([3, 2, 2] + [1] * 29).to_text()
# Bounds of speculative_token_tree (draft nodes, root excluded; depth of the deepest node):
# the proposer walks the shape for every request and step, so it must stay small.
MAX_TREE_NODES = 1024
MAX_TREE_DEPTH = 64
# SuffixDecoding's trees (and their memory, linear in this depth) are bounded as the shape is.
MAX_SUFFIX_TREE_DEPTH = MAX_TREE_DEPTH
# vLLM's rejection sampler verifies at most 128 tokens per request (drafts + bonus).
MAX_DRAFT_TOKENS = 127
# Past a few dozen rows the packed product is slower than vLLM's; the bound only stops typos.
MAX_SMALL_BATCH_ROWS = 4096

# What a request may set for itself; the rest is engine-wide.
PER_REQUEST_OPTIONS = ("prune_min_prob", "prune_path_prob", "max_draft_tokens", "batch_budget", "drafter")
# Where draft trees come from (tree_attn_backend.drafting): the request's own n-grams, the
# target's recycled candidates, SuffixDecoding's trees, or all of them merged.
DRAFTERS = ("lookup", "recycle", "suffix", "hybrid")
# Names the options were first specified with, accepted server-wide and per request.
ALIASES = {
    "speculative_tree_prune_min_prob": "prune_min_prob",
    "speculative_tree_prune_path_prob": "prune_path_prob",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def suffix_decoding_available() -> bool:
    """Whether SuffixDecoding (the ``arctic-inference`` package) is installed."""
    return importlib.util.find_spec("arctic_inference") is not None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, what: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{what} = {value!r}: must be {allowed}")


def _resolve_aliases(options: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``options`` with alias names replaced; an option given under two names is an error."""
    resolved: dict[str, Any] = {}
    for key, value in options.items():
        name = ALIASES.get(key, key)
        if name in resolved:
            raise ValueError(f"{what} {name} is given twice (as {name} and as its alias)")
        resolved[name] = value
    return resolved


@dataclass(frozen=True)
class TreePrunedConfig:
    """Options of the TREE_PRUNED path.

    Attributes:
        speculative_token_tree: static maximum tree, vLLM's old syntax; at most
            :data:`MAX_TREE_NODES` draft nodes and depth :data:`MAX_TREE_DEPTH`.
        prune_min_prob: drop a node (and its subtree) whose own draft probability is below.
        prune_path_prob: drop a node whose path probability is below.
        max_draft_tokens: draft nodes per request and step (root excluded); at most the
            speculative config's ``num_speculative_tokens``.
        drafter: where trees come from, one of :data:`DRAFTERS`: ``lookup`` (n-gram
            continuations of the request's own tokens), ``recycle`` (the target's own top-k
            next tokens from earlier verify passes, shared by all requests), ``suffix``
            (SuffixDecoding's trees over the request's and earlier requests' tokens) or
            ``hybrid`` (all three merged by token, with calibrated probabilities, and the
            draft head's children of the root when ``draft_head`` is set).
        draft_head: a draft head (:mod:`tree_attn_backend.drafting.draft_head`) trained on
            this model's hidden states, a source of the ``hybrid`` drafter: ``"auto"``, the
            shipped head for the served model if there is one; the path of a head file
            (``tree-pruned train-head``); ``None``: no head.
        suffix_max_cached_requests: the ``suffix`` drafter's global cache holds the outputs of
            at most this many earlier requests (0: only each request's own tokens).
        suffix_max_tree_depth: depth of SuffixDecoding's suffix trees: a matched context and
            the draft after it are at most this many tokens together (vLLM's
            ``suffix_decoding_max_tree_depth``, whose default 24 caps a regenerated answer's
            drafts at 12 tokens per step).
        drafter_min_ngram, drafter_max_ngram: n-gram lengths of the lookup drafter.
        drafter_smoothing: added to a one-token context's continuation count total, halved
            for every further token of the matched context.
        log_every_steps: a tree-size log line every this many verify steps (0 = never).
        batch_budget: allocate verified draft tokens batch-wide by marginal value against the
            step cost model (:mod:`tree_attn_backend.drafting.verify_budget`); off = every request
            keeps its pruned tree.
        cost_model: the budget's step cost model as ``{"step_ms", "token_ms",
            "draft_token_ms", "draft_step_ms"}`` (see ``VerifyCostModel``), fixed; ``None`` =
            measured: forward passes timed at start-up, then refitted from served steps.
        allow_larger_request_share: let a request raise its own share above the server's
            (``max_draft_tokens`` above this config's, or ``batch_budget`` off); refused
            otherwise, so one request cannot take the verify budget of the others.
        small_batch_linear_rows: float32 linear layers run the packed small-batch product
            (:mod:`tree_attn_backend.ops.packed_linear`) for calls of at most this many rows
            and vLLM's own above; it keeps a second copy of those weights. 0 = vLLM's product
            for every call. Only with ``enforce_eager`` (the product is not traced by
            torch.compile); without it, or without the native ops, vLLM's product is used.
    """

    speculative_token_tree: str = DEFAULT_TOKEN_TREE
    prune_min_prob: float = 0.05
    prune_path_prob: float = 0.08
    max_draft_tokens: int = 32
    drafter: str = "hybrid"
    draft_head: str | None = "auto"
    suffix_max_cached_requests: int = 1000
    suffix_max_tree_depth: int = MAX_SUFFIX_TREE_DEPTH
    drafter_min_ngram: int = 1
    drafter_max_ngram: int = 4
    drafter_smoothing: float = 2.0
    log_every_steps: int = 50
    batch_budget: bool = True
    cost_model: dict | None = None
    allow_larger_request_share: bool = False
    small_batch_linear_rows: int = DEFAULT_MAX_ROWS

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, allowed: str) -> None:
            _require(ok, f"tree_pruned option {name}", getattr(self, name), allowed)

        for name in ("prune_min_prob", "prune_path_prob"):
            value = getattr(self, name)
            require(_is_number(value) and 0.0 <= value <= 1.0, name, "a number in [0, 1]")
        require(
            _is_int(self.max_draft_tokens) and 1 <= self.max_draft_tokens <= MAX_DRAFT_TOKENS,
            "max_draft_tokens",
            f"an integer in [1, {MAX_DRAFT_TOKENS}]",
        )
        require(isinstance(self.drafter, str) and self.drafter in DRAFTERS, "drafter", f"one of {list(DRAFTERS)}")
        require(
            self.drafter != "suffix" or suffix_decoding_available(),
            "drafter",
            f"one of {[d for d in DRAFTERS if d != 'suffix']} ('suffix' needs the arctic-inference package)",
        )
        require(
            self.draft_head is None
            or (isinstance(self.draft_head, str) and (self.draft_head == "auto" or Path(self.draft_head).is_file())),
            "draft_head",
            '"auto", the path of a draft head file, or null',
        )
        require(
            _is_int(self.suffix_max_cached_requests) and 0 <= self.suffix_max_cached_requests < 2**31,
            "suffix_max_cached_requests",
            "an integer in [0, 2**31)",
        )
        require(
            _is_int(self.suffix_max_tree_depth) and 1 <= self.suffix_max_tree_depth <= MAX_SUFFIX_TREE_DEPTH,
            "suffix_max_tree_depth",
            f"an integer in [1, {MAX_SUFFIX_TREE_DEPTH}]",
        )
        require(
            _is_int(self.small_batch_linear_rows) and 0 <= self.small_batch_linear_rows <= MAX_SMALL_BATCH_ROWS,
            "small_batch_linear_rows",
            f"an integer in [0, {MAX_SMALL_BATCH_ROWS}]",
        )
        require(
            _is_int(self.drafter_min_ngram) and 1 <= self.drafter_min_ngram <= 16,
            "drafter_min_ngram",
            "an integer in [1, 16]",
        )
        require(
            _is_int(self.drafter_max_ngram) and self.drafter_min_ngram <= self.drafter_max_ngram <= 16,
            "drafter_max_ngram",
            "an integer in [drafter_min_ngram, 16]",
        )
        require(
            _is_number(self.drafter_smoothing) and 0.0 <= self.drafter_smoothing < math.inf,
            "drafter_smoothing",
            "a finite number >= 0",
        )
        require(_is_int(self.log_every_steps) and self.log_every_steps >= 0, "log_every_steps", "an integer >= 0")
        require(isinstance(self.batch_budget, bool), "batch_budget", "true or false")
        require(isinstance(self.allow_larger_request_share, bool), "allow_larger_request_share", "true or false")
        if self.cost_model is not None:
            require(isinstance(self.cost_model, dict), "cost_model", "null (measured) or a JSON object")
            try:
                self.configured_cost_model()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"tree_pruned option cost_model = {self.cost_model!r}: {exc}") from None
        try:
            shape = TreeShape.parse(self.speculative_token_tree)
        except ValueError as exc:
            raise ValueError(f"tree_pruned option speculative_token_tree: {exc}") from None
        require(
            shape.num_nodes - 1 <= MAX_TREE_NODES and shape.max_depth <= MAX_TREE_DEPTH,
            "speculative_token_tree",
            f"a tree of at most {MAX_TREE_NODES} nodes and depth {MAX_TREE_DEPTH} "
            f"(this one: {shape.num_nodes - 1} nodes, depth {shape.max_depth})",
        )

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> TreePrunedConfig:
        """Read ``additional_config["tree_pruned"]`` (absent = defaults); unknown keys are errors."""
        if additional_config is None or "tree_pruned" not in additional_config:
            return cls()
        options = additional_config["tree_pruned"]
        if not isinstance(options, dict):
            raise ValueError(f"additional_config tree_pruned = {options!r}: must be a JSON object of options")
        options = _resolve_aliases(options, "tree_pruned option")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown tree_pruned option(s) {unknown}; known: {sorted(known)} (aliases: {sorted(ALIASES)})"
            )
        return cls(**options)

    def for_request(self, extra_args: Mapping[str, Any] | None) -> TreePrunedConfig:
        """This config with a request's own options applied.

        A request sets :data:`PER_REQUEST_OPTIONS` (or their :data:`ALIASES`) as flat keys of
        ``extra_args`` (``vllm_xargs`` over HTTP, whose values are numbers or strings, so
        ``batch_budget`` may also be 0 or 1) or as a nested ``{"tree_pruned": {...}}`` dict;
        other flat keys belong to other consumers of ``extra_args`` and are ignored. Raises
        ``ValueError`` naming the key, the value and the allowed range; without
        ``allow_larger_request_share`` a request can only lower its share.
        """
        if not extra_args:
            return self
        requested = {key: value for key, value in extra_args.items() if ALIASES.get(key, key) in PER_REQUEST_OPTIONS}
        nested = extra_args.get("tree_pruned")
        if nested is not None:
            if not isinstance(nested, dict):
                raise ValueError(
                    f"request option tree_pruned = {nested!r}: must be an object of per-request options "
                    f"{list(PER_REQUEST_OPTIONS)}; over HTTP give them as flat vllm_xargs keys"
                )
            not_per_request = sorted(set(nested) - set(PER_REQUEST_OPTIONS) - set(ALIASES))
            if not_per_request:
                raise ValueError(
                    f"tree_pruned option(s) {not_per_request} cannot be set per request; "
                    f"these can: {list(PER_REQUEST_OPTIONS)}"
                )
            twice = sorted(nested.keys() & requested.keys())
            if twice:
                raise ValueError(f"request option(s) {twice} given twice (flat and inside tree_pruned)")
            requested.update(nested)
        if not requested:
            return self
        options = _resolve_aliases(requested, "request option")
        if "batch_budget" in options:
            value = options["batch_budget"]
            # vllm_xargs carries JSON true/false as 1/0.
            _require(
                isinstance(value, bool) or (_is_int(value) and value in (0, 1)),
                "request option batch_budget",
                value,
                "true or false (or 1 or 0)",
            )
            options["batch_budget"] = bool(value)
        if not self.allow_larger_request_share:
            limit = self.max_draft_tokens
            value = options.get("max_draft_tokens", limit)
            _require(
                not _is_int(value) or value <= limit,
                "request option max_draft_tokens",
                value,
                f"an integer in [1, {limit}] (the server's max_draft_tokens; allow_larger_request_share lifts it)",
            )
            _require(
                options.get("batch_budget", self.batch_budget) or not self.batch_budget,
                "request option batch_budget",
                False,
                "true on this server (allow_larger_request_share lifts it)",
            )
        try:
            return replace(self, **options)
        except ValueError as exc:  # the range checks of __post_init__, reworded for a request
            raise ValueError(str(exc).replace("tree_pruned option", "request option", 1)) from None

    def configured_cost_model(self) -> VerifyCostModel | None:
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

"""The ``custom_class`` proposer: a pruned draft tree per request from its drafter.

vLLM's custom_class contract returns token ids only; the tree behind them stays here, keyed
by request id, and the tree model runner reads it back when the drafts are scheduled.
Node lists are in best-first topological order, so the scheduler truncating a request's
drafts, like the batch budget, keeps the most valuable subtree.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tree_attn_backend.drafting.calibration import IsotonicCalibration, ReliabilityCounts
from tree_attn_backend.drafting.draft_head import DraftHead, HeadRootDrafter, bundled_head_for
from tree_attn_backend.drafting.drafter import Drafter
from tree_attn_backend.drafting.hybrid_drafter import HybridDrafter
from tree_attn_backend.drafting.lookup_drafter import LookupIndex
from tree_attn_backend.drafting.pruning import PruningPolicy, expand_and_prune
from tree_attn_backend.drafting.recycle_drafter import RecycleTable
from tree_attn_backend.drafting.suffix_drafter import SuffixCache
from tree_attn_backend.drafting.tree import DraftTree
from tree_attn_backend.drafting.tree_shape import TreeShape
from tree_attn_backend.drafting.verify_budget import (
    OnlineCostFit,
    VerifyCostModel,
    allocate_verify_budget,
    drafts_can_pay,
    min_kept_value,
)
from tree_attn_backend.vllm_plugin.config import DRAFTERS, TreePrunedConfig, suffix_decoding_available
from tree_attn_backend.vllm_plugin.verification_kind import Verification

logger = logging.getLogger("vllm.tree_pruned")

# The calibration and the cost fit learn only from verified drafts, so a budget that keeps
# nothing stops them learning and can stay shut: measured on the shipped prompts at one request,
# a cold calibration shut drafting off for 100 to 200 of a run's ~620 steps, and on the tuning
# prompts at four requests one rejected exploration lowered the calibration below the budget's
# floor for good (no tree was grown again, so nothing could reopen it). After this many
# consecutive steps in which the budget kept nothing, the next step with a candidate grows whole
# pruned trees and keeps what pays for its own marginal cost, the fixed cost of a drafting step
# taken as sunk, or else the best node: at most that fixed cost and one token's once per this
# many steps, and the verdicts reach the calibration.
EXPLORE_AFTER_IDLE_STEPS = 8

# The sources each drafter grows its trees from (``hybrid`` merges them; it runs without
# SuffixDecoding when arctic-inference is missing, and without the head when none is configured).
SOURCES_OF = {
    "lookup": ("lookup",),
    "recycle": ("recycle",),
    "suffix": ("suffix",),
    "hybrid": ("lookup", "recycle", "suffix", "head"),
}
OPTIONAL_HYBRID_SOURCES = ("suffix", "head")


@dataclass(frozen=True)
class RequestDrafting:
    """How one request is drafted: its pruning policy, how it is verified (``TREE``: a
    branching tree; ``CHAIN``: the best chain; ``NONE``: no drafts), whether the batch
    budget applies to it, and its drafter (one of ``config.DRAFTERS``)."""

    policy: PruningPolicy
    verification: Verification
    batch_budget: bool
    drafter: str


@dataclass(frozen=True)
class BoundBatch:
    """What the runner tells the proposer before each ``propose``, per batch row in vLLM's
    order: the request id, how it is drafted, its prompt length (the rest of its tokens are its
    output), its length when it stops (prompt + ``max_tokens``; ``None``: unknown) and, for the
    draft head, the target's final hidden state where it chose the row's last token (``[B, D]``;
    ``None``: not given)."""

    req_ids: list[str]
    drafting: list[RequestDrafting]
    prompt_lengths: list[int]
    max_lengths: list[int | None]
    leaf_hidden: torch.Tensor | None = None


class TreeProposer:
    """``--speculative-config '{"method": "custom_class", "model":
    "tree_attn_backend.vllm_plugin.proposer.TreeProposer", "num_speculative_tokens": K}'``"""

    def __init__(self, vllm_config: Any) -> None:
        self.config = TreePrunedConfig.from_additional_config(vllm_config.additional_config)
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.shape = self.config.shape
        self.chain_shape = TreeShape.chain(self.shape.max_depth)
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.indexes: dict[str, LookupIndex] = {}
        self.trees: dict[str, DraftTree] = {}
        self.hybrids: dict[str, HybridDrafter] = {}  # a hybrid request's drafter of its current tree
        self.drafter_of: dict[str, str] = {}  # the drafter of each request's current tree
        # Allocated when a request first asks for it; from then on every verify pass feeds it.
        self.recycle: RecycleTable | None = None
        # Allocated when a request first asks for it; follows the requests that use it.
        self.suffix: SuffixCache | None = None
        self._warned_no_suffix = False
        # Both set by attach_model once the runner has loaded the model (a head needs its embedding).
        self.head: DraftHead | None = None
        self.embed: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.head_roots = 0  # roots the head has proposed children of (logged)
        # Set by the runner before serving: configured, or measured (then refitted as it serves).
        self.cost_model: VerifyCostModel | OnlineCostFit | None = None
        self.reset_calibration()
        self._batch: BoundBatch | None = None

    def load_model(self, *args: object, **kwargs: object) -> None:
        """Nothing to load: the drafter reads the requests' own tokens."""

    def attach_model(self, embed: Callable[[torch.Tensor], torch.Tensor], hidden_size: int) -> None:
        """Take the served model's input embedding (int64 ``[n]`` -> ``[n, D]``, ``D`` its
        ``hidden_size``) and load the draft head of the option ``draft_head``: ``"auto"``, the
        shipped head trained for this model if there is one; a path, that head, refused when it
        was trained for another model. Not called: no head (offline replay)."""
        option = self.config.draft_head
        if option is None:
            return
        if option == "auto":
            found = bundled_head_for(embed, hidden_size)
            if found is None:
                logger.info("tree_pruned: no shipped draft head fits this model (tree-pruned train-head fits one)")
                return
            path, head = found
        else:
            path, head = Path(option), DraftHead.load(option)
            if not head.fits(embed, hidden_size):
                raise ValueError(
                    f"tree_pruned option draft_head = {option!r}: the head was trained for another model (its "
                    f"hidden size is {head.hidden_size}, the model's {hidden_size}, or its embeddings of token ids "
                    f"0-{head.model_probe.shape[0] - 1} differ from the model's)"
                )
        self.head, self.embed = head, embed
        logger.info("tree_pruned: draft head %s", path)

    def reset_learned_state(self) -> None:
        """Forget what serving has taught the budget: the online cost fit back to its prior
        and the acceptance calibration back to the identity (benchmarks start every mode from
        here)."""
        if isinstance(self.cost_model, OnlineCostFit):
            self.cost_model.reset()
        self.reset_calibration()
        if self.recycle is not None:
            self.recycle.reset()
        if self.suffix is not None:
            self.suffix.reset()

    def reset_calibration(self) -> None:
        """Every drafter's calibration (its path values mapped to how often the target accepts
        such a node: the budget's node values) and the hybrid's per-source calibrations back to
        the identity; the budget's count of steps that kept nothing back to 0."""
        self.idle_budget_steps = 0
        self.calibration = {name: IsotonicCalibration() for name in DRAFTERS}
        self.source_calibration = {name: IsotonicCalibration() for name in SOURCES_OF["hybrid"]}
        # Per drafter, the calibrated predictions of every verified node against the outcome.
        self.reliability = {name: ReliabilityCounts() for name in DRAFTERS}

    def expected_accepted(self, tree: DraftTree, drafter: str) -> np.ndarray:
        """float ``[n]``: each draft node's expected acceptance, its path value through the
        drafter's calibration, in the tree's node order (root excluded; non-increasing when
        the path values are, the calibration being monotone)."""
        return self.calibration[drafter].calibrate(tree.path_probs[1:])

    def drafting_for(self, config: TreePrunedConfig, verification: Verification) -> RequestDrafting:
        """A request's drafting from its (per-request) config."""
        sources = SOURCES_OF[config.drafter]
        if "recycle" in sources and self.recycle is None:
            self.recycle = RecycleTable(self.vocab_size)
        if "suffix" in sources and self.suffix is None:
            if suffix_decoding_available():
                self.suffix = SuffixCache(self.config.suffix_max_cached_requests, self.config.suffix_max_tree_depth)
            elif not self._warned_no_suffix:  # only `hybrid` gets here (the option checks `suffix`)
                self._warned_no_suffix = True  # fewer drafts, the same tokens: said once
                logger.warning("tree_pruned: the hybrid drafter runs without SuffixDecoding (no arctic-inference)")
        return RequestDrafting(
            config.policy(self.num_speculative_tokens), verification, config.batch_budget, config.drafter
        )

    def bind_batch(
        self,
        req_ids: Sequence[str],
        drafting: Sequence[RequestDrafting],
        prompt_lengths: Sequence[int],
        max_lengths: Sequence[int | None] | None = None,
        leaf_hidden: torch.Tensor | None = None,
    ) -> None:
        """Called by the tree model runner before each ``propose``: the batch order, how each
        request is drafted, its prompt length (the rest of its tokens are its output), its
        length when it stops (prompt + ``max_tokens``; ``None`` or omitted: unknown) and the
        target's hidden state behind each row's last token (see :class:`BoundBatch`)."""
        stops: list[int | None] = list(max_lengths) if max_lengths is not None else [None] * len(req_ids)
        self._batch = BoundBatch(list(req_ids), list(drafting), list(prompt_lengths), stops, leaf_hidden)

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: object = None,
    ) -> list[list[int]]:
        if self._batch is None:
            raise RuntimeError(
                "TreeProposer runs only with the TREE_PRUNED model runner: start vLLM with "
                "VLLM_ATTENTION_BACKEND=TREE_PRUNED"
            )
        batch, self._batch = self._batch, None
        for req_id in batch.req_ids:
            self.trees.pop(req_id, None)
        # A row that sampled nothing is a prefill in progress: no context to draft from yet.
        contexts = [
            token_ids_cpu[row, : int(num_tokens_no_spec[row])] if sampled else None
            for row, sampled in enumerate(sampled_token_ids[: len(batch.req_ids)])
        ]
        self._draft(batch, contexts)
        return [self.trees[r].tokens[1:].tolist() if r in self.trees else [] for r in batch.req_ids]

    def _draft(self, batch: BoundBatch, contexts: list[np.ndarray | None]) -> None:
        """This step's tree of every drafted request into ``self.trees``: grown, pruned and cut
        by the batch budget. ``contexts``: per row, its tokens so far (``None``: not decoding)."""
        req_ids, drafting = batch.req_ids, batch.drafting
        decoding = {row: context for row, context in enumerate(contexts) if context is not None}
        drafted = [row for row in decoding if drafting[row].verification is not Verification.NONE]
        budgeted = [row for row in drafted if drafting[row].batch_budget]
        cost = self.cost_model_now if budgeted else None
        max_budgeted = sum(drafting[row].policy.max_nodes or 0 for row in budgeted)
        budgeted_drafters = {drafting[row].drafter for row in budgeted}
        # This step explores when it is the EXPLORE_AFTER_IDLE_STEPS-th in a row that the budget
        # keeps nothing (see there).
        explore = cost is not None and self.idle_budget_steps + 1 >= EXPLORE_AFTER_IDLE_STEPS
        floor = math.inf
        if explore:
            floor = 0.0  # whole pruned trees: the budget's floor is what keeps it shut
        elif cost is not None:
            # When not even certain drafts could pay, do not grow the trees the budget would drop.
            best_scale = max(float(self.calibration[name].calibrate(1.0)) for name in budgeted_drafters)
            if drafts_can_pay(len(decoding), max_budgeted, cost, best_scale):
                # Nodes the budget would drop anyway are not grown (the budget's choice is the same).
                floor = min_kept_value(len(decoding), cost)
        # Per drafter, the path value whose calibrated value reaches the floor (inf: none does).
        min_path_prob_of = {name: self.calibration[name].min_prob_for(floor) for name in budgeted_drafters}
        raised: dict[tuple[PruningPolicy, float], PruningPolicy] = {}  # built once per step, not per row
        # The rows that grow a tree: a budgeted row's needs a path value that can reach the floor.
        growing = [
            row for row in drafted if not drafting[row].batch_budget or min_path_prob_of[drafting[row].drafter] <= 1.0
        ]
        head_children = self._head_children(batch, decoding, growing)
        growing_rows = set(growing)
        grown = []  # the budgeted rows with a tree
        for row in drafted:
            if self.suffix is not None and "suffix" in SOURCES_OF[drafting[row].drafter]:
                # Every step, grown or not: the shared cache learns every request's output.
                self.suffix.follow(req_ids[row], decoding[row], batch.prompt_lengths[row])
            if row not in growing_rows:  # a budgeted row whose floor no path value reaches
                continue
            policy = drafting[row].policy
            max_length = batch.max_lengths[row]
            policy = policy.within_tokens_left(
                None if max_length is None else max_length - len(decoding[row]), self.shape.max_depth
            )
            if drafting[row].batch_budget:
                min_path_prob = min_path_prob_of[drafting[row].drafter]
                key = (policy, min_path_prob)
                if key not in raised:
                    raised[key] = replace(policy, min_path_prob=max(policy.min_path_prob, min_path_prob))
                policy = raised[key]
                grown.append(row)
            self.trees[req_ids[row]] = self._grow(
                req_ids[row], drafting[row], policy, decoding[row], head_children.get(row)
            )
        if cost is not None:
            trees = [self.trees[req_ids[row]] for row in grown]
            values = [self.expected_accepted(t, drafting[row].drafter) for row, t in zip(grown, trees)]
            keep = allocate_verify_budget(values, len(decoding), cost)
            if explore and not keep.any() and any(len(v) for v in values):
                keep = allocate_verify_budget(values, len(decoding), replace(cost, draft_step_ms=0.0))
                if not keep.any():  # the best node batch-wide: the calibration hears of the trees
                    keep[int(np.argmax([v[0] if len(v) else -1.0 for v in values]))] = 1
            # Counted without nodes too (a shut budget grows no tree); an exploring step without
            # any node leaves the count up, so the next step with one explores.
            self.idle_budget_steps = 0 if keep.any() else self.idle_budget_steps + 1
            for row, tree, k in zip(grown, trees, keep.tolist()):
                self.trees[req_ids[row]] = tree.truncate(k + 1)

    def _head_children(
        self, batch: BoundBatch, decoding: dict[int, np.ndarray], growing: list[int]
    ) -> dict[int, HeadRootDrafter]:
        """The draft head's children of the root of every hybrid row in ``growing``, by row, from
        one batched head call (empty without a head, the runner's hidden states or its embedding)."""
        rows = [row for row in growing if "head" in SOURCES_OF[batch.drafting[row].drafter]]
        if self.head is None or self.embed is None or batch.leaf_hidden is None or not rows:
            return {}
        roots = torch.tensor([int(decoding[row][-1]) for row in rows], dtype=torch.int64)
        with torch.no_grad():
            root_embedding = self.embed(roots)
        tokens, probs = self.head.top_children(
            batch.leaf_hidden[torch.tensor(rows)], root_embedding, len(self.shape.child_lists[0])
        )
        self.head_roots += len(rows)
        return {
            row: HeadRootDrafter(len(decoding[row]), t, p) for row, t, p in zip(rows, tokens.tolist(), probs.tolist())
        }

    def _grow(
        self,
        req_id: str,
        drafting: RequestDrafting,
        policy: PruningPolicy,
        tokens: np.ndarray,
        head_children: HeadRootDrafter | None,
    ) -> DraftTree:
        """The request's tree from its drafter (the suffix cache has followed ``tokens``;
        ``head_children``: the draft head's root children, when it ran), pruned by ``policy``
        (its own, or with the budget's floor raised into it)."""
        index = self.indexes.get(req_id)
        if index is None or len(index) > len(tokens):
            index = self.indexes[req_id] = LookupIndex(
                self.config.drafter_min_ngram, self.config.drafter_max_ngram, self.config.drafter_smoothing
            )
        index.extend(tokens[len(index) :].tolist())  # catches up on steps proposed without it
        shape = self.shape if drafting.verification is Verification.TREE else self.chain_shape
        self.drafter_of[req_id] = drafting.drafter
        # drafting_for allocated the shared sources; only hybrid may lack SuffixDecoding or the head.
        sources: dict[str, Drafter] = {}
        for name in SOURCES_OF[drafting.drafter]:
            if name == "lookup":
                sources[name] = index
            elif name == "recycle" and self.recycle is not None:
                sources[name] = self.recycle
            elif name == "suffix" and self.suffix is not None:
                max_nodes = policy.max_nodes or self.num_speculative_tokens
                sources[name] = self.suffix.tree_drafter(req_id, tokens, max_nodes)
            elif name == "head" and head_children is not None:
                sources[name] = head_children
            elif not (name in OPTIONAL_HYBRID_SOURCES and drafting.drafter == "hybrid"):
                raise RuntimeError(
                    f"request {req_id}: drafter {drafting.drafter!r} without its source (see drafting_for)"
                )
        drafter: Drafter
        if drafting.drafter == "hybrid":  # remembers what each source proposed, for observe()
            hybrid = self.hybrids[req_id] = HybridDrafter(sources, self.source_calibration)
            hybrid.start_tree(index.tokens)
            drafter = hybrid
        else:
            (drafter,) = sources.values()
        tree, _ = expand_and_prune(shape, drafter, index.tokens, policy)
        return tree

    @property
    def cost_model_now(self) -> VerifyCostModel:
        if self.cost_model is None:
            raise RuntimeError("the batch budget needs a cost model; the TREE_PRUNED runner sets it at start-up")
        return self.cost_model.model() if isinstance(self.cost_model, OnlineCostFit) else self.cost_model

    def record_acceptance(self, req_ids: Sequence[str], num_verified: np.ndarray, accepted_nodes: np.ndarray) -> None:
        """After verification: records the calibrated predictions of the verified nodes with
        their outcome, fits each drafter's calibration on its verified nodes' path values and
        outcomes, and the hybrid's sources on the nodes the target tested. ``num_verified``:
        int ``[len(req_ids)]`` draft nodes verified per request; ``accepted_nodes``: int
        ``[len(req_ids), D+1]`` the accepted paths' nodes, root first, ``-1`` padded."""
        path_values: dict[str, list[np.ndarray]] = {}
        outcomes: dict[str, list[np.ndarray]] = {}
        for i, req_id in enumerate(req_ids):
            tree, name = self.trees.get(req_id), self.drafter_of.get(req_id)
            if tree is None or name is None:  # no tree, or one no drafter grew (a benchmark's synthetic tree)
                continue
            verified = int(num_verified[i])
            hit = np.isin(np.arange(1, verified + 1), accepted_nodes[i])
            self.reliability[name].add(self.expected_accepted(tree, name)[:verified], hit)
            path_values.setdefault(name, []).append(tree.path_probs[1 : verified + 1])
            outcomes.setdefault(name, []).append(hit)
            if name == "hybrid":
                self.hybrids[req_id].observe(tree, verified, accepted_nodes[i])
        # After the reliability counts, which hold the predictions the budget used.
        for name, values in path_values.items():
            self.calibration[name].update(np.concatenate(values), np.concatenate(outcomes[name]))

    def tree_for(self, req_id: str, scheduled: Sequence[int]) -> DraftTree | None:
        """The tree behind a request's scheduled drafts (a prefix of its node list), or
        ``None`` when they are not ours (e.g. cleared and re-proposed elsewhere)."""
        tree = self.trees.get(req_id)
        if tree is None or len(scheduled) + 1 > tree.num_nodes:
            return None
        if tree.tokens[1 : len(scheduled) + 1].tolist() != list(scheduled):
            return None
        return tree

    def forget(self, req_id: str) -> None:
        self.indexes.pop(req_id, None)
        self.trees.pop(req_id, None)
        self.hybrids.pop(req_id, None)
        self.drafter_of.pop(req_id, None)
        if self.suffix is not None:
            self.suffix.stop(req_id)

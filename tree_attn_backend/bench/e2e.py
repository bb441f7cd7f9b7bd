"""``tree-pruned bench e2e``: does dynamic pruning pay, end to end, in a real vLLM engine?

Modes (named exactly so in the output):

* ``none``: no speculation (stock vLLM CPU engine);
* ``chain``: vLLM's ngram proposer (stock engine, :data:`CHAIN_SPECULATIVE_CONFIG`);
* ``suffix``: vLLM's SuffixDecoding (``method: "suffix"``, the ``arctic-inference`` package,
  vLLM's defaults: per-request and global suffix trees, drafts up to 24 tokens as a chain);
* ``suffix_packed``: the same SuffixDecoding chains verified by the TREE_PRUNED engine, which
  runs the tree modes' kernels (the packed small-batch linear layers): the tree modes' lead over
  it is what the trees and drafters earn, the rest of their lead over ``suffix`` the kernels';
* ``static_tree``: TREE_PRUNED, the tree shape filled up to ``num_speculative_tokens`` nodes
  with no thresholds and no budget;
* ``pruned_tree``: TREE_PRUNED with the per-node / path thresholds;
* ``pruned_budget``: ``pruned_tree`` plus the batch-wide verify budget.

The three tree modes share one engine (they differ only in per-request ``extra_args``), so a
repetition costs one engine start per peer mode and one for the tree modes, each in its own
process (``none``, ``chain``, ``suffix``: the stock platform; ``suffix_packed`` and ``tree``:
TREE_PRUNED) that runs the engine in process (:mod:`tree_attn_backend.bench.e2e_engine`); this
module plans the runs, reads the records back and turns them into rows, a table, and plots.
Requests are greedy, so every mode's tokens are compared with ``none``'s at the same
concurrency and repetition (``identical_to_baseline``).

Repetitions (``repeat``): each starts fresh engine processes, in a shuffled order, and runs each
engine's (mode, concurrency) runs in a shuffled order, so no mode always runs first or last on a
warming or cooling machine. Every mode starts from the same state: before its runs each engine
runs every (mode, concurrency) once, briefly and untimed (kernels for every batch shape), and
its drafter forgets what earlier requests taught it before every run (the tree engine's batch
budget, SuffixDecoding's global cache of responses). A row holds the median over repetitions
of each metric, ``spread`` the min and max.

Row metrics (per mode, concurrency, and ``category``: ``all`` or one prompt category):

* ``tokens_per_s``: output tokens / the run's wall time (category rows: that category's
  tokens over the same wall time, so categories add up to ``all``);
* ``draft_tokens_per_step``: draft tokens vLLM verified / decode request-steps (a request's
  engine step after its first token); ``all`` rows only: vLLM counts drafts per step, not per
  request (``null`` in category rows);
* ``accepted_tokens_per_step``: accepted draft tokens kept in the output / decode request-steps
  (per request: output tokens minus the steps that produced them);
* ``expected_accepted_per_step``: tree modes, ``all`` rows: the accepted draft tokens per
  decode request-step that the drafter's calibrated path values predicted for the nodes
  verified (the sum of their expected acceptances; ``null`` elsewhere);
* ``acceptance_rate``: accepted / draft tokens (``null`` without drafts);
* ``ttft_ms_p50``; ``tpot_ms_p50/p90/p99``: per request, (last token - first token) /
  (output tokens - 1), percentiles over requests;
* ``identical_to_baseline``: every request's tokens equal ``none``'s (in every repetition);
* ``repeats``: the repetitions behind the medians; ``spread``: ``{metric: [min, max]}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tree_attn_backend.vllm_plugin import default_speculative_config
from tree_attn_backend.vllm_plugin.config import DRAFTERS, suffix_decoding_available

MODES = ("none", "chain", "suffix", "suffix_packed", "static_tree", "pruned_tree", "pruned_budget")
CHAIN_SPECULATIVE_CONFIG = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 4,
    "prompt_lookup_min": 1,
}
SUFFIX_SPECULATIVE_CONFIG = {"method": "suffix"}
# Per peer mode (vLLM's own proposers): its speculative config and its engine process's
# environment (empty: the stock platform).
PEER_ENGINES: dict[str, tuple[dict | None, dict[str, str]]] = {
    "none": (None, {}),
    "chain": (CHAIN_SPECULATIVE_CONFIG, {}),
    "suffix": (SUFFIX_SPECULATIVE_CONFIG, {}),
    "suffix_packed": (SUFFIX_SPECULATIVE_CONFIG, {"VLLM_ATTENTION_BACKEND": "TREE_PRUNED"}),
}
# Per-request tree options of the three tree modes (one engine, defaults elsewhere).
TREE_MODE_OPTIONS: dict[str, dict[str, Any]] = {
    "static_tree": {"prune_min_prob": 0.0, "prune_path_prob": 0.0, "batch_budget": False},
    "pruned_tree": {"batch_budget": False},
    "pruned_budget": {"batch_budget": True},
}
DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "spec_bench_mixed.jsonl"
METRICS = (
    "tokens_per_s",
    "draft_tokens_per_step",
    "accepted_tokens_per_step",
    "expected_accepted_per_step",
    "acceptance_rate",
    "ttft_ms_p50",
    "tpot_ms_p50",
    "tpot_ms_p90",
    "tpot_ms_p99",
    "identical_to_baseline",
)


@dataclass(frozen=True)
class E2EConfig:
    """What to run. ``num_requests(c)`` conversations per run: every prompt ``repeat_prompts``
    times, and at least ``c`` so the concurrency is reached (prompts are cycled); with
    ``turns = 2`` a two-turn prompt's second turn is sent when its first is answered, with the
    answer in its context."""

    model: str
    prompts: tuple[dict, ...]  # {"category", "messages", "next_turns"} (load_prompts)
    modes: tuple[str, ...] = MODES
    concurrency: tuple[int, ...] = (1, 4, 16)
    max_tokens: int = 64
    repeat: int = 1
    drafter: str | None = None  # the tree modes' drafter (None: the engine's default)
    # The tree engine's draft_head option: "auto" (the shipped head for the model, if there is
    # one), a head file, or None (no head).
    draft_head: str | None = "auto"
    turns: int = 1  # 2: a conversation's second turn follows its first answer
    repeat_prompts: int = 1  # every prompt sent this many times per run (regenerations)
    shuffle_seed: int = 0  # the runs' order in every repetition

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {unknown}; modes are {list(MODES)}")
        if "none" not in self.modes:
            raise ValueError(f"modes {list(self.modes)} must include 'none', the baseline")
        if not self.prompts:
            raise ValueError("no prompts")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens = {self.max_tokens}: must be >= 2 (time per output token needs two)")
        if self.repeat < 1:
            raise ValueError(f"repeat = {self.repeat}: must be >= 1")
        if self.turns not in (1, 2):
            raise ValueError(f"turns = {self.turns}: must be 1 or 2")
        if self.repeat_prompts < 1:
            raise ValueError(f"repeat_prompts = {self.repeat_prompts}: must be >= 1")
        if self.drafter is not None and self.drafter not in DRAFTERS:
            raise ValueError(f"drafter {self.drafter!r}: must be one of {list(DRAFTERS)}")
        if self.draft_head not in (None, "auto") and not Path(self.draft_head).is_file():
            raise ValueError(f"draft_head {self.draft_head!r}: no such file")
        suffix_modes = [m for m in self.modes if m in PEER_ENGINES and PEER_ENGINES[m][0] == SUFFIX_SPECULATIVE_CONFIG]
        if suffix_modes and not suffix_decoding_available():
            raise ValueError(
                f"mode(s) {suffix_modes} need the arctic-inference package (vLLM's SuffixDecoding); "
                "`make setup` builds it from source"
            )

    def num_requests(self, concurrency: int) -> int:
        """Conversations per run (each one request per turn it has, up to ``turns``)."""
        return max(len(self.prompts) * self.repeat_prompts, concurrency)

    @property
    def workload(self) -> dict:
        """What the runs send, for the JSON report."""
        return {"prompts": len(self.prompts), "turns": self.turns, "repeat_prompts": self.repeat_prompts}


def load_prompts(path: str | Path, per_category: int | None = None) -> list[dict]:
    """Spec-Bench-style JSONL (``category``, ``turns``: the first turn is the prompt, the others
    ``next_turns``), in file order; ``per_category`` keeps the first that many of each category."""
    prompts: list[dict] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            category, turns = str(item["category"]), list(item["turns"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}:{number}: not a Spec-Bench record with 'category' and 'turns' ({exc!r})"
            ) from None
        if not turns:
            raise ValueError(f"{path}:{number}: turns is empty")
        for k, turn in enumerate(turns):
            if not isinstance(turn, str) or not turn:
                raise ValueError(f"{path}:{number}: turns[{k}] must be a non-empty string, got {turn!r}")
        seen[category] = seen.get(category, 0) + 1
        if per_category is None or seen[category] <= per_category:
            prompts.append(
                {"category": category, "messages": [{"role": "user", "content": turns[0]}], "next_turns": turns[1:]}
            )
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _engine_processes(config: E2EConfig) -> list[tuple[str, dict, list[dict]]]:
    """``(name, env, engines)`` per process, one engine each (a fresh process per engine: vLLM
    0.32's CPU worker start-up scans every loaded module, and trips over llvmlite objects that
    an earlier ngram engine in the same process loaded); an engine is
    ``{"name", "engine": EngineArgs kwargs, "runs": [...]}``."""
    # Prefix caching off: every run of a shared engine must pay the same prefill.
    base = {
        "model": config.model,
        "dtype": "float32",
        "max_model_len": 2048,
        "enforce_eager": True,
        "seed": 0,
        "disable_log_stats": False,
        "enable_prefix_caching": False,
        "distributed_executor_backend": "uni",
    }

    def extra_args(mode: str) -> dict | None:
        options = TREE_MODE_OPTIONS.get(mode)
        if options is None or config.drafter is None:
            return options
        return dict(options, drafter=config.drafter)

    def runs(modes: list[str]) -> list[dict]:
        return [{"mode": m, "concurrency": c, "extra_args": extra_args(m)} for c in config.concurrency for m in modes]

    processes: list[tuple[str, dict, list[dict]]] = []
    for mode, (speculative_config, env) in PEER_ENGINES.items():
        if mode in config.modes:
            engine = dict(base, speculative_config=speculative_config) if speculative_config else base
            processes.append((mode, env, [{"name": mode, "engine": engine, "runs": runs([mode])}]))
    tree_modes = [m for m in MODES if m in TREE_MODE_OPTIONS and m in config.modes]
    if tree_modes:
        engine = dict(
            base,
            speculative_config=default_speculative_config(),
            # the modes turn the batch budget off per request
            additional_config={
                "tree_pruned": {
                    "allow_larger_request_share": True,
                    "draft_head": (
                        config.draft_head
                        if config.draft_head in (None, "auto")
                        else str(Path(config.draft_head).resolve())
                    ),
                }
            },
        )
        processes.append(
            (
                "tree",
                {"VLLM_ATTENTION_BACKEND": "TREE_PRUNED"},
                [{"name": "tree", "engine": engine, "runs": runs(tree_modes)}],
            )
        )
    return processes


def tokenize_prompts(config: E2EConfig) -> list[dict]:
    """The prompts with their ``prompt_token_ids``, through the model's chat template; the
    next turns stay text (the engine adds each answer before them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    return [dict(p, prompt_token_ids=chat_token_ids(tokenizer, p["messages"])) for p in config.prompts]


def chat_token_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """``messages`` through the chat template, ending where the assistant's answer begins."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def run_engines(
    config: E2EConfig, prompts: list[dict], progress: Callable[[str, int], None] | None = None
) -> list[dict]:
    """Run every engine on ``prompts`` (``tokenize_prompts(config)``), ``config.repeat`` times
    in shuffled orders (module docstring); returns all runs' records (see ``e2e_engine``), each
    with its ``repetition``. ``progress(description, runs_done)`` is called as runs finish."""
    rng = np.random.default_rng(config.shuffle_seed)
    results: list[dict] = []
    done = 0
    for repetition in range(config.repeat):
        processes = _engine_processes(config)
        for name, env, engines in (processes[i] for i in rng.permutation(len(processes))):
            engines = [dict(e, runs=[e["runs"][i] for i in rng.permutation(len(e["runs"]))]) for e in engines]
            label = f"{name} engines" + (f", repetition {repetition + 1}/{config.repeat}" if config.repeat > 1 else "")
            if progress:
                progress(f"starting {label}", done)
            spec = {
                "engines": engines,
                "prompts": prompts,
                "max_tokens": config.max_tokens,
                "turns": config.turns,
                "num_requests": {str(c): config.num_requests(c) for c in config.concurrency},
            }

            def on_progress(line: str, offset: int = done, label: str = label) -> None:
                if progress:
                    progress(label, offset + int(line.split()[0]))

            runs = run_engine_process("tree_attn_backend.bench.e2e_engine", name, env, spec, on_progress)["runs"]
            results.extend(dict(run, repetition=repetition) for run in runs)
            done += sum(len(e["runs"]) for e in engines)
    return results


def engine_process_env(env: dict[str, str]) -> dict[str, str]:
    """An engine process's environment: this one's, offline, a 1 GiB KV cache, and ``env`` on top
    (``VLLM_ATTENTION_BACKEND`` only if ``env`` sets it)."""
    process_env = {k: v for k, v in os.environ.items() if k != "VLLM_ATTENTION_BACKEND"}
    process_env.update({"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **env})
    return process_env


def run_engine_process(
    module: str, name: str, env: dict[str, str], spec: dict, on_progress: Callable[[str], None] | None = None
) -> dict:
    """Run ``python -m module SPEC.json OUT.json`` (an engine-side benchmark module) in a fresh
    process (:func:`engine_process_env`) and return OUT's JSON; ``on_progress`` gets the rest of
    every ``PROGRESS ...`` line the process prints. A failing process raises with the end of its output."""
    with tempfile.TemporaryDirectory(prefix="tree-pruned-bench-") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.Popen(
            [sys.executable, "-m", module, str(spec_path), str(out_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=engine_process_env(env),
        )
        log = []
        for line in proc.stdout:  # type: ignore[union-attr]
            log.append(line)
            if line.startswith("PROGRESS ") and on_progress:
                on_progress(line[len("PROGRESS ") :].strip())
        if proc.wait() != 0:
            raise RuntimeError(f"the {name} engine process failed (exit {proc.returncode}):\n{''.join(log[-60:])}")
        return json.loads(out_path.read_text())


def tpot_ms(requests: list[dict]) -> list[float]:
    """Time per output token of each request with two tokens or more: (last token - first
    token) / (output tokens - 1), in ms."""
    return [
        (r["last_token"] - r["first_token"]) / (len(r["tokens"]) - 1) * 1e3 for r in requests if len(r["tokens"]) > 1
    ]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` rounded to 0.01 (None for no values)."""
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def _row(
    mode: str,
    concurrency: int,
    category: str,
    requests: list[dict],
    wall_s: float,
    counters: dict | None,
    calibration: dict | None,
    baseline: dict[tuple[int, int], list[int]] | None,
) -> dict:
    tokens = sum(len(r["tokens"]) for r in requests)
    decode_steps = sum(max(r["steps"] - 1, 0) for r in requests)
    accepted = sum(len(r["tokens"]) - r["steps"] for r in requests)
    drafts = counters.get("num_draft_tokens", 0) if counters is not None else None
    tpot = tpot_ms(requests)
    ttft = [(r["first_token"] - r["arrival"]) * 1e3 for r in requests if r["first_token"] is not None]
    return {
        "mode": mode,
        "concurrency": concurrency,
        "category": category,
        "requests": len(requests),
        "tokens_per_s": round(tokens / wall_s, 2),
        "draft_tokens_per_step": None if drafts is None else round(drafts / max(decode_steps, 1), 3),
        "accepted_tokens_per_step": round(accepted / max(decode_steps, 1), 3),
        # what the tree drafters' calibrated path values predicted for the same steps
        "expected_accepted_per_step": None
        if not calibration
        else round(sum(c["expected"] for c in calibration.values()) / max(decode_steps, 1), 3),
        "acceptance_rate": None if not drafts else round(accepted / drafts, 3),
        "ttft_ms_p50": percentile(ttft, 50),
        "tpot_ms_p50": percentile(tpot, 50),
        "tpot_ms_p90": percentile(tpot, 90),
        "tpot_ms_p99": percentile(tpot, 99),
        "identical_to_baseline": None
        if baseline is None
        else all(r["tokens"] == baseline[(r["index"], r["turn"])] for r in requests),
    }


def summarize(runs: list[dict]) -> list[dict]:
    """Rows from the engines' records: per (mode, concurrency) an ``all`` row, then one per
    category; each metric the median over the runs' repetitions (module docstring)."""
    baselines = {
        (run["concurrency"], run.get("repetition", 0)): {(r["index"], r["turn"]): r["tokens"] for r in run["requests"]}
        for run in runs
        if run["mode"] == "none"
    }
    per_repetition: dict[tuple[str, int, str], list[dict]] = {}
    for run in runs:
        baseline = baselines.get((run["concurrency"], run.get("repetition", 0)))
        requests = run["requests"]
        groups = [("all", requests, run["counters"], run.get("calibration"))]
        groups += [
            (c, [r for r in requests if r["category"] == c], None, None)
            for c in sorted({r["category"] for r in requests})
        ]
        for category, members, counters, calibration in groups:
            row = _row(
                run["mode"], run["concurrency"], category, members, run["wall_s"], counters, calibration, baseline
            )
            per_repetition.setdefault((run["mode"], run["concurrency"], category), []).append(row)
    order = sorted(per_repetition, key=lambda k: (k[1], MODES.index(k[0]), k[2] != "all", k[2]))
    return [_median_row(per_repetition[key]) for key in order]


def _median_row(rows: list[dict]) -> dict:
    """One row from the repetitions' rows: numeric metrics the median of the repetitions that
    have them (``spread``: min, max), ``identical_to_baseline`` true only if it is in every
    repetition."""
    out = dict(rows[0], repeats=len(rows), spread={})
    for key in METRICS:
        values = [r[key] for r in rows]
        if key == "identical_to_baseline":
            out[key] = None if all(v is None for v in values) else all(v is True for v in values)
        else:
            present = [v for v in values if v is not None]
            out[key] = round(float(np.median(present)), 3) if present else None
            if present:
                out["spread"][key] = [min(present), max(present)]
    return out

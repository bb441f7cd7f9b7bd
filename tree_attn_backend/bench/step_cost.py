"""``tree-pruned bench step-cost``: what a draft token costs a step, stock chain vs TREE_PRUNED tree.

In one run, three engines execute fixed decode batches (``batch_sizes`` requests, each with
``draft_tokens`` synthetic drafts per step; :mod:`.step_cost_engine` times every step):

* ``stock``: vLLM's CPU engine without speculation (drafts 0 only);
* ``stock_chain``: the stock engine with a ``custom_class`` proposer handing every request its
  drafts as a chain, verified by vLLM's rejection sampler (the path vLLM's ngram method takes);
* ``tree``: the TREE_PRUNED engine with its proposer's trees replaced by synthetic ones: chains
  and breadth-first binary trees of the same sizes.

Each engine lives in its own process and all three are alive at once: for every cell (drafts,
shape) the engines take turns step by step, in a shuffled order per step, so machine drift (on
a shared host, up to tens of percent over minutes) weighs on every engine alike; an engine
without the cell steps without drafts, untimed, so every engine's contexts grow alike. The
cells run forwards and then backwards, so the contexts' growth weighs on every cell alike too.
``repeat`` times, with fresh processes started in a shuffled order; per cell the median step
time over every timed step (both passes, all repetitions) is taken; a least-squares fit
``step_ms = fixed_ms + plain_ms * B + draft_ms * B * D`` per engine and shape gives:

* ``plain_token_ms``: ``plain_ms`` of ``stock`` (its fit has no draft term);
* ``chain_draft_token_ms``: ``draft_ms`` of ``stock_chain`` (its chains);
* ``tree_draft_token_ms``: ``draft_ms`` of ``tree`` over its draft-free and binary-tree cells
  (``tree_chain_draft_token_ms``: the same engine's chains);
* ``tree_vs_chain`` = tree_draft_token_ms / chain_draft_token_ms;
* ``no_draft_step_ratio``: the ``tree`` engine's draft-free steps over ``stock``'s: the median of
  the per-round ratios (the two engines step one after the other in each round, so a ratio is
  taken under the same machine state), pooled over the batch sizes
  (``no_draft_step_ratio_by_batch``: per batch size; ``no_draft_median_ratio_by_batch``: the
  ratio of the two cells' medians, which drift between rounds blurs).

``cells`` holds every cell's median, min and max (ms) and the number of timed steps.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tree_attn_backend.bench.e2e import DEFAULT_PROMPTS, E2EConfig, engine_process_env, load_prompts, tokenize_prompts

TARGETS = {"tree_vs_chain": 1.15, "no_draft_step_ratio": 1.03}  # upper bounds
_ENGINE_MODULE = "tree_attn_backend.bench.step_cost_engine"
MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class StepCostConfig:
    model: str
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    draft_tokens: tuple[int, ...] = (2, 4, 8, 16)  # besides 0
    context_tokens: int = 256
    warmup_steps: int = 3
    timed_steps: int = 10
    repeat: int = 3
    shuffle_seed: int = 0  # the processes' order in every repetition

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes = {self.batch_sizes}: need at least one, each >= 1")
        if not self.draft_tokens or min(self.draft_tokens) < 1:
            raise ValueError(f"draft_tokens = {self.draft_tokens}: need at least one, each >= 1 (0 is always run)")
        if len(self.batch_sizes) < 2:
            raise ValueError(f"batch_sizes = {self.batch_sizes}: the fit needs two batch sizes or more")
        if self.context_tokens < 1 or self.warmup_steps < 0 or self.timed_steps < 1 or self.repeat < 1:
            raise ValueError(
                f"context_tokens = {self.context_tokens}, warmup_steps = {self.warmup_steps}, "
                f"timed_steps = {self.timed_steps}, repeat = {self.repeat}: need >= 1, >= 0, >= 1, >= 1"
            )


@dataclass(frozen=True)
class _Engine:
    name: str
    env: dict[str, str]
    engine_args: dict
    cells: tuple[tuple[int, str], ...]


def _engines(config: StepCostConfig) -> list[_Engine]:
    from tree_attn_backend.vllm_plugin import default_speculative_config

    k = max(config.draft_tokens)
    base = {
        "model": config.model,
        "dtype": "float32",
        "max_model_len": MAX_MODEL_LEN,
        "enforce_eager": True,
        "seed": 0,
        "enable_prefix_caching": False,
        "distributed_executor_backend": "uni",
        "disable_log_stats": True,
    }
    chains = ((0, "chain"), *((d, "chain") for d in config.draft_tokens))
    trees = tuple((d, "tree") for d in config.draft_tokens)
    chain_spec = {
        "method": "custom_class",
        "model": f"{_ENGINE_MODULE}.SyntheticChainProposer",
        "num_speculative_tokens": k,
    }
    tree_spec = dict(default_speculative_config(k), model=f"{_ENGINE_MODULE}.SyntheticTreeProposer")
    return [
        _Engine("stock", {}, base, ((0, "chain"),)),
        _Engine("stock_chain", {}, dict(base, speculative_config=chain_spec), chains),
        _Engine(
            "tree", {"VLLM_ATTENTION_BACKEND": "TREE_PRUNED"}, dict(base, speculative_config=tree_spec), chains + trees
        ),
    ]


class _EngineProcess:
    """One engine process of :mod:`.step_cost_engine`, driven command by command."""

    def __init__(self, engine: _Engine, workdir: str) -> None:
        self.name = engine.name
        args_path = Path(workdir, f"{engine.name}.json")
        args_path.write_text(json.dumps(engine.engine_args))
        self.log: deque[str] = deque(maxlen=60)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", _ENGINE_MODULE, str(args_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=engine_process_env(engine.env),
        )
        self._read("READY")

    def request(self, **command: object) -> dict:
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass  # the process has exited: _read reports how
        return json.loads(self._read("REPLY "))

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith(prefix):
                return line[len(prefix) :]
            self.log.append(line)
        raise RuntimeError(f"the {self.name} engine process failed (exit {self.proc.wait()}):\n{''.join(self.log)}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]  # end of commands: the engine shuts down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _prompt(config: StepCostConfig) -> list[int]:
    """``context_tokens`` tokens: the shipped set's first prompt, chat-templated, repeated."""
    first = load_prompts(DEFAULT_PROMPTS)[:1]
    ids = tokenize_prompts(E2EConfig(model=config.model, prompts=tuple(first)))[0]["prompt_token_ids"]
    return list(itertools.islice(itertools.cycle(ids), config.context_tokens))


def run_step_cost(config: StepCostConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run every engine ``config.repeat`` times, interleaved step by step, and return the result
    object (``--json``; module docstring). ``progress`` gets a line per repetition and batch size."""
    prompt = _prompt(config)
    rng = np.random.default_rng(config.shuffle_seed)
    engines = _engines(config)
    all_cells = list(dict.fromkeys(cell for engine in engines for cell in engine.cells))
    steps: dict[tuple, list[float]] = {}
    for repetition in range(config.repeat):
        with tempfile.TemporaryDirectory(prefix="tree-pruned-step-cost-") as workdir, ExitStack() as stack:
            processes = {}
            for i in rng.permutation(len(engines)):
                processes[engines[i].name] = process = _EngineProcess(engines[i], workdir)
                stack.callback(process.close)
            for batch_size in config.batch_sizes:
                for process in processes.values():
                    process.request(
                        op="start",
                        batch_size=batch_size,
                        prompt_token_ids=prompt,
                        max_tokens=MAX_MODEL_LEN - len(prompt) - max(config.draft_tokens) - 1,
                    )
                for cell in [*all_cells, *reversed(all_cells)]:
                    for step in range(config.warmup_steps + config.timed_steps):
                        for engine in (engines[i] for i in rng.permutation(len(engines))):
                            # An engine without this cell steps without drafts, untimed, so every
                            # engine's contexts grow alike (attention cost follows them).
                            runs_cell = cell in engine.cells
                            timed = runs_cell and step >= config.warmup_steps
                            draft_tokens, shape = cell if runs_cell else (0, "chain")
                            reply = processes[engine.name].request(
                                op="step", draft_tokens=draft_tokens, shape=shape, check=timed
                            )
                            if timed:
                                steps.setdefault((engine.name, batch_size, *cell), []).append(reply["step_ms"])
                for process in processes.values():
                    process.request(op="finish")
                if progress:
                    progress(f"repetition {repetition + 1}, batch {batch_size}")
    cells = [
        {"engine": e, "batch_size": b, "draft_tokens": d, "shape": s, "step_ms": ms}
        for (e, b, d, s), ms in steps.items()
    ]
    return summarize(cells, config)


def fit_step_ms(points: list[tuple[int, int, float]]) -> dict[str, float]:
    """Least squares ``step_ms = fixed_ms + plain_ms * B + draft_ms * B * D`` over
    ``(B, D, step_ms)`` points (without drafts among them: no ``draft_ms``)."""
    b = np.array([p[0] for p in points], dtype=np.float64)
    d = np.array([p[1] for p in points], dtype=np.float64)
    t = np.array([p[2] for p in points], dtype=np.float64)
    with_drafts = bool((d > 0).any())
    columns = [np.ones_like(b), b] + ([b * d] if with_drafts else [])
    coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), t, rcond=None)
    fit = {"fixed_ms": float(coef[0]), "plain_ms": float(coef[1])}
    if with_drafts:
        fit["draft_ms"] = float(coef[2])
    return fit


def summarize(raw_cells: list[dict], config: StepCostConfig) -> dict:
    cells = [
        {
            "engine": c["engine"],
            "batch_size": c["batch_size"],
            "draft_tokens": c["draft_tokens"],
            "shape": c["shape"],
            "median_ms": float(np.median(c["step_ms"])),
            "min_ms": float(np.min(c["step_ms"])),
            "max_ms": float(np.max(c["step_ms"])),
            "steps": len(c["step_ms"]),
        }
        for c in raw_cells
    ]

    def points(engine: str, shapes: tuple[str, ...]) -> list[tuple[int, int, float]]:
        return [
            (c["batch_size"], c["draft_tokens"], c["median_ms"])
            for c in cells
            if c["engine"] == engine and (c["draft_tokens"] == 0 or c["shape"] in shapes)
        ]

    def paired_ratios(batch_size: int) -> np.ndarray:
        """tree / stock step times of the draft-free rounds of ``batch_size`` (both engines'
        lists hold one time per round, in round order)."""
        tree_ms, stock_ms = (
            next(
                np.array(c["step_ms"])
                for c in raw_cells
                if c["engine"] == engine and c["batch_size"] == batch_size and c["draft_tokens"] == 0
            )
            for engine in ("tree", "stock")
        )
        return tree_ms / stock_ms

    def draft_free(engine: str) -> dict[int, float]:
        return {c["batch_size"]: c["median_ms"] for c in cells if c["engine"] == engine and c["draft_tokens"] == 0}

    stock = fit_step_ms(points("stock", ()))
    chain = fit_step_ms(points("stock_chain", ("chain",)))
    tree = fit_step_ms(points("tree", ("tree",)))
    tree_chain = fit_step_ms(points("tree", ("chain",)))
    stock_0, tree_0 = draft_free("stock"), draft_free("tree")
    return {
        "plain_token_ms": stock["plain_ms"],
        "chain_draft_token_ms": chain["draft_ms"],
        "tree_draft_token_ms": tree["draft_ms"],
        "tree_chain_draft_token_ms": tree_chain["draft_ms"],
        "tree_vs_chain": tree["draft_ms"] / chain["draft_ms"],
        "no_draft_step_ratio": float(np.median(np.concatenate([paired_ratios(b) for b in sorted(stock_0)]))),
        "no_draft_step_ratio_by_batch": {str(b): float(np.median(paired_ratios(b))) for b in sorted(stock_0)},
        "no_draft_median_ratio_by_batch": {str(b): tree_0[b] / stock_0[b] for b in sorted(stock_0)},
        "fits": {"stock": stock, "stock_chain": chain, "tree": tree, "tree_chain": tree_chain},
        "config": {
            "batch_sizes": list(config.batch_sizes),
            "draft_tokens": [0, *config.draft_tokens],
            "context_tokens": config.context_tokens,
            "warmup_steps": config.warmup_steps,
            "timed_steps_per_pass": config.timed_steps,
            "passes": 2,
            "repeat": config.repeat,
        },
        "cells": cells,
    }


def check_targets(result: dict) -> list[tuple[str, bool]]:
    """``(description, met)`` per target."""
    return [(f"{key} = {result[key]:.3f} <= {bound}", result[key] <= bound) for key, bound in TARGETS.items()]


def format_summary(result: dict) -> str:
    lines = [
        f"plain token          {result['plain_token_ms']:.3f} ms  (stock engine, no speculation)",
        f"chain draft token    {result['chain_draft_token_ms']:.3f} ms  (stock engine, vLLM's rejection sampler)",
        f"tree draft token     {result['tree_draft_token_ms']:.3f} ms  (TREE_PRUNED, binary trees)",
        f"  its chains         {result['tree_chain_draft_token_ms']:.3f} ms",
        f"tree_vs_chain        {result['tree_vs_chain']:.3f}",
        f"no_draft_step_ratio  {result['no_draft_step_ratio']:.3f}  by batch size "
        + ", ".join(f"{b}: {r:.3f}" for b, r in result["no_draft_step_ratio_by_batch"].items())
        + " (per-round ratios; ratio of medians "
        + ", ".join(f"{r:.3f}" for r in result["no_draft_median_ratio_by_batch"].values())
        + ")",
        "",
        f"{'engine':<12} {'B':>3} {'D':>3} {'shape':<6} {'median ms':>10} {'min-max ms':>16}",
    ]
    for c in result["cells"]:
        lines.append(
            f"{c['engine']:<12} {c['batch_size']:>3} {c['draft_tokens']:>3} {c['shape']:<6} "
            f"{c['median_ms']:>10.2f} {c['min_ms']:>7.2f}-{c['max_ms']:<8.2f}"
        )
    return "\n".join(lines)

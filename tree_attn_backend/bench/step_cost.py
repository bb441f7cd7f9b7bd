"""``tree-pruned bench step-cost``: what a draft token costs a step, stock chain vs TREE_PRUNED tree.

In one run, three engines execute fixed decode batches (``batch_sizes`` requests, each with
``draft_tokens`` synthetic drafts per step; :mod:`.step_cost_engine` times every step):

* ``stock``: vLLM's CPU engine without speculation (drafts 0 only);
* ``stock_chain``: the stock engine with a ``custom_class`` proposer handing every request its
  drafts as a chain, verified by vLLM's rejection sampler (the path vLLM's ngram method takes);
* ``tree``: the TREE_PRUNED engine with its proposer's trees replaced by synthetic ones: chains
  and breadth-first binary trees of the same sizes.

The two engine processes run ``repeat`` times, in a shuffled order each time (machine drift
weighs on both platforms alike); per cell the median step time over every timed step (both
passes, all repetitions) is taken; a least-squares fit
``step_ms = fixed_ms + plain_ms * B + draft_ms * B * D`` per engine and shape gives:

* ``plain_token_ms``: ``plain_ms`` of ``stock`` (its fit has no draft term);
* ``chain_draft_token_ms``: ``draft_ms`` of ``stock_chain`` (its chains);
* ``tree_draft_token_ms``: ``draft_ms`` of ``tree`` over its draft-free and binary-tree cells
  (``tree_chain_draft_token_ms``: the same engine's chains);
* ``tree_vs_chain`` = tree_draft_token_ms / chain_draft_token_ms;
* ``no_draft_step_ratio``: the ``tree`` engine's draft-free steps over ``stock``'s, summed over
  the batch sizes (``no_draft_step_ratio_by_batch``: per batch size).

``cells`` holds every cell's median, min and max (ms) and the number of timed steps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .e2e import DEFAULT_PROMPTS, E2EConfig, load_prompts, run_engine_process, tokenize_prompts

TARGETS = {"tree_vs_chain": 1.15, "no_draft_step_ratio": 1.03}  # upper bounds
_ENGINE_MODULE = "tree_attn_backend.bench.step_cost_engine"


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
            raise ValueError(f"context_tokens = {self.context_tokens}, warmup_steps = {self.warmup_steps}, "
                             f"timed_steps = {self.timed_steps}, repeat = {self.repeat}: need >= 1, >= 0, >= 1, >= 1")


def _engine_processes(config: StepCostConfig) -> list[tuple[str, dict[str, str], list[dict]]]:
    """``(name, env, engines)`` per process, in run order."""
    from ..vllm_plugin import default_speculative_config

    k = max(config.draft_tokens)
    base = {"model": config.model, "dtype": "float32", "max_model_len": 4096, "enforce_eager": True, "seed": 0,
            "enable_prefix_caching": False, "distributed_executor_backend": "uni", "disable_log_stats": True}
    chains = [[0, "chain"], *([d, "chain"] for d in config.draft_tokens)]
    trees = [[d, "tree"] for d in config.draft_tokens]
    chain_spec = {"method": "custom_class", "model": f"{_ENGINE_MODULE}.SyntheticChainProposer", "num_speculative_tokens": k}
    tree_spec = dict(default_speculative_config(k), model=f"{_ENGINE_MODULE}.SyntheticTreeProposer")
    return [
        ("stock", {}, [{"name": "stock", "engine": base, "cells": [[0, "chain"]]},
                       {"name": "stock_chain", "engine": dict(base, speculative_config=chain_spec), "cells": chains}]),
        ("tree", {"VLLM_ATTENTION_BACKEND": "TREE_PRUNED"},
         [{"name": "tree", "engine": dict(base, speculative_config=tree_spec), "cells": chains + trees}]),
    ]


def _prompt(config: StepCostConfig) -> list[int]:
    """``context_tokens`` tokens: the shipped set's first prompt, chat-templated, repeated."""
    first = load_prompts(DEFAULT_PROMPTS)[:1]
    ids = tokenize_prompts(E2EConfig(model=config.model, prompts=tuple(first)))[0]["prompt_token_ids"]
    return list(itertools.islice(itertools.cycle(ids), config.context_tokens))


def run_step_cost(config: StepCostConfig, progress: "Callable[[str], None] | None" = None) -> dict:
    """Run every engine process ``config.repeat`` times and return the result object
    (``--json``; module docstring). ``progress`` gets a line per batch size an engine finishes."""
    prompt = _prompt(config)
    rng = np.random.default_rng(config.shuffle_seed)
    steps: dict[tuple, list[float]] = {}
    for _ in range(config.repeat):
        processes = _engine_processes(config)
        for name, env, engines in (processes[i] for i in rng.permutation(len(processes))):
            spec = {"engines": engines, "batch_sizes": list(config.batch_sizes), "prompt_token_ids": prompt,
                    "warmup_steps": config.warmup_steps, "timed_steps": config.timed_steps}
            for cell in run_engine_process(_ENGINE_MODULE, name, env, spec, progress)["cells"]:
                key = (cell["engine"], cell["batch_size"], cell["draft_tokens"], cell["shape"])
                steps.setdefault(key, []).extend(cell["step_ms"])
    cells = [{"engine": e, "batch_size": b, "draft_tokens": d, "shape": s, "step_ms": ms} for (e, b, d, s), ms in steps.items()]
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
    cells = [{"engine": c["engine"], "batch_size": c["batch_size"], "draft_tokens": c["draft_tokens"], "shape": c["shape"],
              "median_ms": float(np.median(c["step_ms"])), "min_ms": float(np.min(c["step_ms"])),
              "max_ms": float(np.max(c["step_ms"])), "steps": len(c["step_ms"])} for c in raw_cells]

    def points(engine: str, shapes: tuple[str, ...]) -> list[tuple[int, int, float]]:
        return [(c["batch_size"], c["draft_tokens"], c["median_ms"]) for c in cells
                if c["engine"] == engine and (c["draft_tokens"] == 0 or c["shape"] in shapes)]

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
        "no_draft_step_ratio": sum(tree_0.values()) / sum(stock_0.values()),
        "no_draft_step_ratio_by_batch": {str(b): tree_0[b] / stock_0[b] for b in sorted(stock_0)},
        "fits": {"stock": stock, "stock_chain": chain, "tree": tree, "tree_chain": tree_chain},
        "config": {"batch_sizes": list(config.batch_sizes), "draft_tokens": [0, *config.draft_tokens],
                   "context_tokens": config.context_tokens, "warmup_steps": config.warmup_steps,
                   "timed_steps_per_pass": config.timed_steps, "passes": 2, "repeat": config.repeat},
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
        + ", ".join(f"{b}: {r:.3f}" for b, r in result["no_draft_step_ratio_by_batch"].items()),
        "",
        f"{'engine':<12} {'B':>3} {'D':>3} {'shape':<6} {'median ms':>10} {'min-max ms':>16}",
    ]
    for c in result["cells"]:
        lines.append(f"{c['engine']:<12} {c['batch_size']:>3} {c['draft_tokens']:>3} {c['shape']:<6} "
                     f"{c['median_ms']:>10.2f} {c['min_ms']:>7.2f}-{c['max_ms']:<8.2f}")
    return "\n".join(lines)

"""The step-cost benchmark's engine side: one vLLM engine in this process, fixed batches timed
step by step.

    python -m tree_attn_backend.bench.step_cost_engine SPEC.json OUT.json

Run in its own process by ``tree-pruned bench step-cost`` (the platform is fixed per process
by ``VLLM_ATTENTION_BACKEND``). The engine runs in process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
uni executor), so one ``step()`` is one scheduled batch: forward, sampling or verification,
compaction, drafting and output processing, timed with ``perf_counter``. SPEC::

    {"engines": [{"name", "engine": {EngineArgs kwargs}, "cells": [[draft_tokens, shape], ...]}],
     "batch_sizes": [B, ...], "prompt_token_ids": [...], "warmup_steps": W, "timed_steps": S}

Engines run one after another. For each ``B``, ``B`` greedy requests (the same prompt, ``ignore_eos``) are prefilled, then each
cell runs ``W`` untimed and ``S`` timed steps with every request carrying ``draft_tokens``
synthetic drafts of ``shape`` (``"chain"`` or ``"tree"``, see :func:`synthetic_parents`); the
cells run forwards and then backwards (so the contexts' growth weighs on every cell alike).
Output: ``{"cells": [{"engine", "batch_size", "draft_tokens", "shape", "step_ms": [...]}]}``; a cell's
``step_ms`` holds both passes.

The drafts are token ids no greedy continuation of the prompt is likely to pick, so almost
every step verifies the whole batch shape and accepts nothing (a step that accepts tokens
still runs the same shape; the requests only grow faster).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Sequence

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM reads its environment

import numpy as np  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402

from ..tree import DraftTree  # noqa: E402
from ..vllm_plugin.proposer import TreeProposer  # noqa: E402

FIRST_DRAFT_TOKEN = 1000  # node i drafts token FIRST_DRAFT_TOKEN + i: distinct, and rarely the greedy choice


class _Cell:
    """The drafts every request gets this step (set between cells; the proposers read it)."""

    draft_tokens = 0
    shape = "chain"


def synthetic_parents(draft_tokens: int, shape: str) -> np.ndarray:
    """int32 ``[draft_tokens + 1]`` parents of a synthetic tree: ``"chain"`` (node ``i``
    under ``i - 1``) or ``"tree"`` (a binary tree in breadth-first order, node ``i`` under
    ``(i - 1) // 2``: as branching as a tree of that size gets with two children a node)."""
    nodes = np.arange(draft_tokens + 1)
    if shape == "chain":
        return (nodes - 1).astype(np.int32)
    if shape == "tree":
        return np.where(nodes == 0, -1, (nodes - 1) // 2).astype(np.int32)
    raise ValueError(f"shape = {shape!r}: must be 'chain' or 'tree'")


def _drafts() -> list[int]:
    return list(range(FIRST_DRAFT_TOKEN, FIRST_DRAFT_TOKEN + _Cell.draft_tokens))


class SyntheticChainProposer:
    """A ``custom_class`` proposer for the stock engine: every decoding request gets the cell's
    draft tokens as a chain (what vLLM's ngram proposer hands its rejection sampler)."""

    def __init__(self, vllm_config) -> None:  # noqa: ANN001
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens

    def load_model(self, *args: object, **kwargs: object) -> None:
        """Nothing to load."""

    def propose(self, sampled_token_ids: list[list[int]], *args: object, **kwargs: object) -> list[list[int]]:
        return [_drafts() if sampled else [] for sampled in sampled_token_ids]


class SyntheticTreeProposer(TreeProposer):
    """The tree proposer with its drafter and pruning replaced by the cell's synthetic tree, so
    the TREE_PRUNED runner verifies exactly that shape for every decoding request."""

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: object = None,
    ) -> list[list[int]]:
        (req_ids, _), self._batch = self._batch, None
        parents = synthetic_parents(_Cell.draft_tokens, _Cell.shape)
        self.trees.clear()
        out = []
        for row, req_id in enumerate(req_ids):
            if not sampled_token_ids[row] or _Cell.draft_tokens == 0:
                out.append([])
                continue
            root = int(token_ids_cpu[row, int(num_tokens_no_spec[row]) - 1])
            tokens = np.array([root, *_drafts()], dtype=np.int64)
            self.trees[req_id] = DraftTree(parents=parents, tokens=tokens, probs=np.full(len(tokens), 0.5))
            out.append(tokens[1:].tolist())
        return out


def time_cells(engine: LLMEngine, batch_size: int, cells: Sequence[tuple[int, str]], prompt: list[int],
               warmup_steps: int, timed_steps: int) -> dict[tuple[int, str], list[float]]:
    """Step times (ms) per cell for ``batch_size`` decoding requests (module docstring)."""
    steps_needed = 2 * len(cells) * (warmup_steps + timed_steps)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps_needed * (1 + max(d for d, _ in cells)) + 64)
    _Cell.draft_tokens = 0
    ids = [f"b{batch_size}-{i}" for i in range(batch_size)]
    for request_id in ids:
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    while engine.engine_core.engine_core.scheduler.waiting or _any_prefilling(engine):
        engine.step()
    times: dict[tuple[int, str], list[float]] = {cell: [] for cell in cells}
    for cell in [*cells, *reversed(cells)]:
        _Cell.draft_tokens, _Cell.shape = cell
        for step in range(warmup_steps + timed_steps):
            if step >= warmup_steps:
                _check_drafts(engine, batch_size, cell)
            start = time.perf_counter()
            outputs = engine.step()
            elapsed = (time.perf_counter() - start) * 1e3
            if any(o.finished for o in outputs):
                raise RuntimeError(f"a request finished during cell {cell} of batch {batch_size}: max_tokens too small")
            if step >= warmup_steps:
                times[cell].append(elapsed)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return times


def _check_drafts(engine: LLMEngine, batch_size: int, cell: tuple[int, str]) -> None:
    """Every request of the batch is about to be scheduled with the cell's drafts."""
    running = engine.engine_core.engine_core.scheduler.running
    counts = sorted(len(r.spec_token_ids) for r in running)
    if counts != [cell[0]] * batch_size:
        raise RuntimeError(f"cell {cell} of batch {batch_size}: requests carry {counts} drafts")


def _any_prefilling(engine: LLMEngine) -> bool:
    scheduler = engine.engine_core.engine_core.scheduler
    return any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running)


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    results = []
    for group in spec["engines"]:
        engine = LLMEngine.from_engine_args(EngineArgs(**group["engine"]))
        cells = [(int(d), str(s)) for d, s in group["cells"]]
        for batch_size in spec["batch_sizes"]:
            times = time_cells(engine, batch_size, cells, spec["prompt_token_ids"], spec["warmup_steps"], spec["timed_steps"])
            results += [{"engine": group["name"], "batch_size": batch_size, "draft_tokens": d, "shape": s,
                         "step_ms": times[(d, s)]} for d, s in cells]
            print(f"PROGRESS {group['name']} {batch_size}", flush=True)
        engine.engine_core.shutdown()
        del engine
        gc.collect()
    with open(out_path, "w") as f:
        json.dump({"cells": results}, f)


if __name__ == "__main__":
    # vLLM imports the proposers by module path: run that module's main, so the timing loop sets
    # the same _Cell they read (not the copy this file defines as __main__).
    from tree_attn_backend.bench import step_cost_engine

    step_cost_engine.main(sys.argv[1], sys.argv[2])

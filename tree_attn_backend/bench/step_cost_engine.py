"""The step-cost benchmark's engine side: one vLLM engine in this process, stepped on command.

    python -m tree_attn_backend.bench.step_cost_engine ENGINE_ARGS.json

Started by ``tree-pruned bench step-cost``, one process per engine (the platform is fixed per
process by ``VLLM_ATTENTION_BACKEND``), all alive at once so that the driver can interleave
their steps one by one: machine drift then weighs on every engine alike. The engine runs in
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni executor), so one ``step()`` is one scheduled
batch: forward, sampling or verification, compaction, drafting and output processing, timed
with ``perf_counter``.

Protocol: one JSON command per stdin line, one ``REPLY <json>`` stdout line per command (other
stdout lines are vLLM's log); ``READY`` once the engine is built.

* ``{"op": "start", "batch_size": B, "prompt_token_ids": [...], "max_tokens": M}``: ``B`` greedy
  requests of that prompt (``ignore_eos``), prefilled; reply ``{}``.
* ``{"op": "step", "draft_tokens": D, "shape": S, "check": bool}``: every decoding request gets
  ``D`` synthetic drafts of shape ``S`` (``"chain"`` or ``"tree"``, see :func:`synthetic_parents`)
  from this step's proposal on; with ``check``, first verify that every request is scheduled
  with ``D`` drafts now (the previous step proposed them). Reply ``{"step_ms": t}``.
* ``{"op": "finish"}``: abort the batch's requests; reply ``{}``.

The end of stdin shuts the engine down.

The drafts are token ids no greedy continuation of the prompt is likely to pick, so almost
every step verifies the whole batch shape and accepts nothing (a step that accepts tokens
still runs the same shape; the requests only grow faster).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM reads its environment

import numpy as np
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.engine.llm_engine import LLMEngine

from tree_attn_backend.drafting.tree import DraftTree
from tree_attn_backend.vllm_plugin.compat import engine_scheduler
from tree_attn_backend.vllm_plugin.proposer import BoundBatch, TreeProposer

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

    def __init__(self, vllm_config: Any) -> None:
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens

    def load_model(self, *args: object, **kwargs: object) -> None:
        """Nothing to load."""

    def propose(self, sampled_token_ids: list[list[int]], *args: object, **kwargs: object) -> list[list[int]]:
        return [_drafts() if sampled else [] for sampled in sampled_token_ids]


class SyntheticTreeProposer(TreeProposer):
    """The tree proposer with its drafter and pruning replaced by the cell's synthetic tree, so
    the TREE_PRUNED runner verifies exactly that shape for every decoding request."""

    def _draft(self, batch: BoundBatch, contexts: list[np.ndarray | None]) -> None:
        if _Cell.draft_tokens == 0:
            return
        parents = synthetic_parents(_Cell.draft_tokens, _Cell.shape)
        for req_id, context in zip(batch.req_ids, contexts):
            if context is not None:
                tokens = np.array([int(context[-1]), *_drafts()], dtype=np.int64)
                self.trees[req_id] = DraftTree(parents=parents, tokens=tokens, probs=np.full(len(tokens), 0.5))


def start_batch(engine: LLMEngine, batch_size: int, prompt: list[int], max_tokens: int) -> list[str]:
    """Add ``batch_size`` greedy requests of ``prompt`` and run until all are decoding."""
    _Cell.draft_tokens = 0
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    ids = [f"b{batch_size}-{i}" for i in range(batch_size)]
    for request_id in ids:
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    while engine_scheduler(engine).waiting or _any_prefilling(engine):
        engine.step()
    return ids


def timed_step(engine: LLMEngine, batch_size: int, cell: tuple[int, str], check: bool) -> float:
    """One ``engine.step()`` in ms, with the cell's drafts proposed from this step on."""
    _Cell.draft_tokens, _Cell.shape = cell
    if check:
        _check_drafts(engine, batch_size, cell)
    start = time.perf_counter()
    outputs = engine.step()
    elapsed = (time.perf_counter() - start) * 1e3
    if any(o.finished for o in outputs):
        raise RuntimeError(f"a request finished during cell {cell} of batch {batch_size}: max_tokens too small")
    return elapsed


def finish_batch(engine: LLMEngine, ids: list[str]) -> None:
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()


def _check_drafts(engine: LLMEngine, batch_size: int, cell: tuple[int, str]) -> None:
    """Every request of the batch is about to be scheduled with the cell's drafts."""
    counts = sorted(len(r.spec_token_ids) for r in engine_scheduler(engine).running)
    if counts != [cell[0]] * batch_size:
        raise RuntimeError(f"cell {cell} of batch {batch_size}: requests carry {counts} drafts")


def _any_prefilling(engine: LLMEngine) -> bool:
    return any(r.num_computed_tokens < r.num_prompt_tokens for r in engine_scheduler(engine).running)


def main(engine_args_path: str) -> None:
    engine = LLMEngine.from_engine_args(EngineArgs(**json.loads(open(engine_args_path).read())))
    print("READY", flush=True)
    ids: list[str] = []
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        reply: dict = {}
        if op == "start":
            ids = start_batch(engine, command["batch_size"], command["prompt_token_ids"], command["max_tokens"])
        elif op == "step":
            reply["step_ms"] = timed_step(
                engine, len(ids), (command["draft_tokens"], command["shape"]), command["check"]
            )
        elif op == "finish":
            finish_batch(engine, ids)
            ids = []
        else:
            raise ValueError(f"unknown command {op!r}")
        print("REPLY " + json.dumps(reply), flush=True)
    engine.engine_core.shutdown()


if __name__ == "__main__":
    # vLLM imports the proposers by module path: run that module's main, so the step loop sets
    # the same _Cell they read (not the copy this file defines as __main__).
    from tree_attn_backend.bench import step_cost_engine

    step_cost_engine.main(sys.argv[1])

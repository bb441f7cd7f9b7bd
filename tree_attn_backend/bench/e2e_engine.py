"""The end-to-end benchmark's engine side: vLLM engines in this process, modes x concurrencies.

    python -m tree_attn_backend.bench.e2e_engine SPEC.json OUT.json

Run in its own process by ``tree-pruned bench e2e`` because the platform (stock CPU or
TREE_PRUNED) is fixed per process by ``VLLM_ATTENTION_BACKEND``. The engines run in process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni executor), one after another, and are driven step
by step: every ``step()`` is one engine step, so per-request step counts and token times are
exact. SPEC::

    {"engines": [{"name", "engine": {EngineArgs kwargs}, "runs": [{"mode", "concurrency", "extra_args"}]}],
     "prompts": [{"category", "prompt_token_ids", "messages", "next_turns"}],
     "num_requests": {concurrency: n}, "max_tokens": N, "turns": 1 or 2}

A run keeps ``concurrency`` greedy requests in flight (closed loop; prompts in order, cycled)
until ``num_requests`` conversations are done: conversation ``i`` runs prompt
``i % len(prompts)``, and with ``turns = 2`` a prompt's second turn is sent as soon as its
first is answered (the first question and answer before it, through the chat template),
ahead of new conversations. Per request it records the conversation's index and the turn,
category, output tokens, arrival / first / last token times and the number of engine steps that
produced its tokens; per run: wall time and vLLM's count of verified draft tokens. Prints
``PROGRESS <done>`` after each run.

Before its runs, an engine runs each of them once untimed with ``concurrency`` requests of a few
tokens (every batch shape's kernels are built before any timing), and before every run its
drafter forgets what earlier requests taught it (:func:`reset_drafter`), so each run starts from
the same state.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections import Counter
from typing import Any

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vLLM reads its environment

from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.llm_engine import LLMEngine
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.spec_decode.suffix_decoding import SuffixDecodingProposer

from tree_attn_backend.bench.e2e import chat_token_ids
from tree_attn_backend.vllm_plugin.compat import replace_runner_drafter, runner_drafter
from tree_attn_backend.vllm_plugin.proposer import TreeProposer

WARM_UP_TOKENS = 8  # per warm-up request: enough decode steps to draft and verify


class SpecCounters(StatLoggerBase):
    """Sums vLLM's count of verified draft tokens over the engine's steps (accepted tokens
    are counted per request, from the outputs)."""

    totals: Counter = Counter()

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        pass

    def record(
        self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
    ) -> None:
        spec = getattr(scheduler_stats, "spec_decoding_stats", None)
        if spec is not None:
            SpecCounters.totals["num_draft_tokens"] += spec.num_draft_tokens

    def log_engine_initialized(self) -> None:
        pass


def reset_drafter(worker: Any) -> None:
    """On the worker (``collective_rpc``): TREE_PRUNED's proposer forgets what its batch budget
    learned (cost fit, acceptance calibration); a SuffixDecoding proposer is replaced by a fresh
    one (its global tree caches earlier responses, and every run re-sends the same prompts).
    vLLM's ngram proposer keeps nothing between requests."""
    drafter = runner_drafter(worker.model_runner)
    if isinstance(drafter, TreeProposer):
        drafter.reset_learned_state()
    elif isinstance(drafter, SuffixDecodingProposer):
        replace_runner_drafter(worker.model_runner, SuffixDecodingProposer(worker.vllm_config))


def drafter_calibration(worker: Any) -> dict | None:
    """On the worker: TREE_PRUNED's per-drafter reliability counts since the last reset
    (``ReliabilityCounts.to_dict`` by drafter name, drafters that verified nothing left out);
    None for the stock engines."""
    drafter = runner_drafter(worker.model_runner)
    if not isinstance(drafter, TreeProposer):
        return None
    return {name: counts.to_dict() for name, counts in drafter.reliability.items() if counts.nodes.any()}


def run_workload(engine: LLMEngine, spec: dict, run: dict, run_index: int) -> dict:
    prompts = spec["prompts"]
    num_requests = spec["num_requests"][str(run["concurrency"])]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=spec["max_tokens"],
        output_kind=RequestOutputKind.DELTA,
        extra_args=run.get("extra_args"),
    )
    records: dict[str, dict] = {}
    submitted = 0
    follow_ups: list[tuple[int, list[int]]] = []  # second turns ready to send: (index, prompt)

    def submit(index: int, turn: int, prompt_token_ids: list[int]) -> None:
        request_id = f"run{run_index}-req{index}-turn{turn}"
        records[request_id] = {
            "request_id": request_id,
            "index": index,
            "turn": turn,
            "category": prompts[index % len(prompts)]["category"],
            "tokens": [],
            "steps": 0,
            "arrival": time.perf_counter(),
            "first_token": None,
            "last_token": None,
        }
        engine.add_request(request_id, {"prompt_token_ids": prompt_token_ids}, params)

    def second_turn(record: dict) -> list[int] | None:
        prompt = prompts[record["index"] % len(prompts)]
        if record["turn"] >= spec["turns"] or not prompt["next_turns"]:
            return None
        tokenizer = engine.get_tokenizer()
        answer = tokenizer.decode(record["tokens"], skip_special_tokens=True)
        messages = [
            *prompt["messages"],
            {"role": "assistant", "content": answer},
            {"role": "user", "content": prompt["next_turns"][0]},
        ]
        return chat_token_ids(tokenizer, messages)

    before = Counter(SpecCounters.totals)
    start = time.perf_counter()
    in_flight = 0
    while submitted < num_requests or in_flight or follow_ups:
        while in_flight < run["concurrency"] and (follow_ups or submitted < num_requests):
            if follow_ups:
                index, prompt_token_ids = follow_ups.pop(0)
                submit(index, 2, prompt_token_ids)
            else:
                submit(submitted, 1, prompts[submitted % len(prompts)]["prompt_token_ids"])
                submitted += 1
            in_flight += 1
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            record = records[out.request_id]
            new = out.outputs[0].token_ids
            if new:
                record["tokens"].extend(new)
                record["steps"] += 1
                record["first_token"] = record["first_token"] or now
                record["last_token"] = now
            if out.finished:
                in_flight -= 1
                follow_up = second_turn(record)
                if follow_up is not None:
                    follow_ups.append((record["index"], follow_up))
    wall = time.perf_counter() - start
    counters = Counter(SpecCounters.totals)
    counters.subtract(before)
    return {
        "mode": run["mode"],
        "concurrency": run["concurrency"],
        "wall_s": wall,
        "counters": dict(counters),
        "requests": sorted(records.values(), key=lambda r: (r["index"], r["turn"])),
    }


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    results = []
    done = 0
    for group in spec["engines"]:
        engine = LLMEngine.from_engine_args(EngineArgs(**group["engine"]), stat_loggers=[SpecCounters])
        for warm_up, run in enumerate(group["runs"]):
            short = dict(
                spec, num_requests={str(run["concurrency"]): run["concurrency"]}, max_tokens=WARM_UP_TOKENS, turns=1
            )
            run_workload(engine, short, run, -1 - warm_up)
        for run in group["runs"]:
            engine.collective_rpc(reset_drafter)
            result = run_workload(engine, spec, run, done)
            result["calibration"] = engine.collective_rpc(drafter_calibration)[0]
            results.append(result)
            done += 1
            print(f"PROGRESS {done}", flush=True)
        engine.engine_core.shutdown()
        del engine
        gc.collect()
    with open(out_path, "w") as f:
        json.dump({"runs": results}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

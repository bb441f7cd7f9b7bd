"""The end-to-end benchmark's engine side: one vLLM engine, several modes and concurrencies.

    python -m tree_attn_backend.bench.e2e_engine SPEC.json OUT.json

Run in its own process by ``tree-pruned bench e2e`` because the platform (stock CPU or
TREE_PRUNED) is fixed per process by ``VLLM_ATTENTION_BACKEND``. SPEC::

    {"engine": {AsyncEngineArgs kwargs}, "runs": [{"mode", "concurrency", "extra_args"}],
     "prompts": [{"category", "prompt_token_ids"}], "num_requests": {concurrency: n},
     "max_tokens": N}

Each run sends its requests (prompts in order, cycled) greedily with ``concurrency`` of them in
flight at a time, and records per request: category, output tokens, arrival / first / last
token times and the number of engine steps that produced its tokens; per run: wall time and
vLLM's speculative-decoding counters. Prints ``PROGRESS <done> <total>`` lines for the parent's
progress bar.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase


class SpecCounters(StatLoggerBase):
    """Sums vLLM's speculative-decoding counters and counts decode request-steps (one per
    request per engine step that produced tokens after its first)."""

    totals: Counter = Counter()

    def __init__(self, vllm_config, engine_index: int = 0) -> None:  # noqa: ANN001
        pass

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:  # noqa: ANN001
        spec = getattr(scheduler_stats, "spec_decoding_stats", None)
        if spec is not None:
            SpecCounters.totals["num_drafts"] += spec.num_drafts
            SpecCounters.totals["num_draft_tokens"] += spec.num_draft_tokens
            SpecCounters.totals["num_accepted_tokens"] += spec.num_accepted_tokens
        if iteration_stats is not None:
            SpecCounters.totals["decode_steps"] += len(iteration_stats.inter_token_latencies_iter)

    def log_engine_initialized(self) -> None:
        pass


def _count_steps_per_request(engine: AsyncLLM, steps: Counter) -> None:
    """Count, per external request id, the engine steps that gave it tokens (an output merged
    for a slow consumer would hide steps from the consumer side, so count them here)."""
    processor = engine.output_processor
    process = processor.process_outputs

    def counting(engine_core_outputs, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        for output in engine_core_outputs:
            state = processor.request_states.get(output.request_id)
            if state is not None and output.new_token_ids:
                steps[state.external_req_id] += 1
        return process(engine_core_outputs, *args, **kwargs)

    processor.process_outputs = counting


async def _one_request(engine: AsyncLLM, request_id: str, prompt: dict, params: SamplingParams) -> dict:
    arrival = time.perf_counter()
    first = last = None
    tokens: list[int] = []
    async for out in engine.generate({"prompt_token_ids": prompt["prompt_token_ids"]}, params, request_id):
        now = time.perf_counter()
        new = out.outputs[0].token_ids
        if new:
            first = now if first is None else first
            last = now
            tokens.extend(new)
    return {"request_id": request_id, "category": prompt["category"], "prompt_index": prompt["index"],
            "tokens": tokens, "arrival": arrival, "first_token": first, "last_token": last}


async def _run(engine: AsyncLLM, spec: dict, run: dict, run_index: int, steps: Counter) -> dict:
    prompts = spec["prompts"]
    num_requests = spec["num_requests"][str(run["concurrency"])]
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=spec.get("ignore_eos", False),
                            output_kind=1, extra_args=run.get("extra_args"))  # 1 = RequestOutputKind.DELTA
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)
    records: list[dict] = []

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            prompt = dict(prompts[i % len(prompts)], index=i % len(prompts))
            records.append(await _one_request(engine, f"run{run_index}-req{i}", prompt, params))

    before = Counter(SpecCounters.totals)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(run["concurrency"])))
    wall = time.perf_counter() - start
    await asyncio.sleep(0.2)  # the last step's stats arrive just after its outputs
    counters = Counter(SpecCounters.totals)
    counters.subtract(before)
    for record in records:
        record["steps"] = steps.pop(record["request_id"], 0)
    records.sort(key=lambda r: int(r["request_id"].rsplit("req", 1)[1]))
    return {"mode": run["mode"], "concurrency": run["concurrency"], "wall_s": wall, "counters": dict(counters),
            "requests": records}


async def _main(spec: dict) -> list[dict]:
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**spec["engine"]), stat_loggers=[SpecCounters])
    steps: Counter = Counter()
    _count_steps_per_request(engine, steps)
    results = []
    try:
        # One short untimed request first, so no run pays for lazy initialisation.
        warm = SamplingParams(temperature=0.0, max_tokens=4)
        async for _ in engine.generate({"prompt_token_ids": spec["prompts"][0]["prompt_token_ids"][:32]}, warm, "warm-up"):
            pass
        steps.clear()
        for index, run in enumerate(spec["runs"]):
            results.append(await _run(engine, spec, run, index, steps))
            print(f"PROGRESS {index + 1} {len(spec['runs'])}", flush=True)
    finally:
        engine.shutdown()
    return results


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    started = time.perf_counter()
    results = asyncio.run(_main(spec))
    with open(out_path, "w") as f:
        json.dump({"runs": results, "process_s": time.perf_counter() - started}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

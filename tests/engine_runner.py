"""Runs real vLLM engines in a fresh process and writes what they produced as JSON.

    python tests/engine_runner.py SPEC.json OUT.json

The platform (stock CPU or TREE_PRUNED) is fixed per process by VLLM_ATTENTION_BACKEND, so
the tests start one process per platform and run several engines in it, one after another.
SPEC: {"env": {...}, "engines": [{"name", "llm": {LLM kwargs}, "jobs": [...]}]}; jobs:
  {"kind": "greedy", "messages": [[chat messages], ...], "max_tokens": N[, "extra_args": {...}]}
  {"kind": "requests", "requests": [{"messages": [...] or "prompt": "...", "params": {SamplingParams kwargs}}, ...]}
    (one batch, each request with its own parameters; ``structured_outputs`` is given as the
    kwargs of ``StructuredOutputsParams``): per request and completion its tokens, text,
    finish reason and logprobs ({token id: logprob} per position), and the prompt logprobs
  {"kind": "cached_prompt", "prompt": "...", "max_tokens": N}: the prompt's tokens cut to two
    KV blocks plus one token, decoded greedily twice, one request after the other: the second
    finds all but its last prompt token in the prefix cache, and vLLM schedules such a request
    straight into a decode step padded with placeholder drafts; the tokens of both runs
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def run_job(llm, job: dict) -> dict:
    from vllm import SamplingParams

    start = time.perf_counter()
    if job["kind"] == "greedy":
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], extra_args=job.get("extra_args"))
        outs = llm.chat(job["messages"], params, use_tqdm=False)
        result = [list(o.outputs[0].token_ids) for o in outs]
    elif job["kind"] == "requests":
        from vllm.sampling_params import StructuredOutputsParams

        params = []
        for request in job["requests"]:
            kwargs = dict(request["params"])
            if "logit_bias" in kwargs:  # JSON object keys are strings
                kwargs["logit_bias"] = {int(t): b for t, b in kwargs["logit_bias"].items()}
            if "structured_outputs" in kwargs:
                kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
            params.append(SamplingParams(**kwargs))
        if all("prompt" in r for r in job["requests"]):  # raw completion prompts
            outs = llm.generate([r["prompt"] for r in job["requests"]], params, use_tqdm=False)
        else:
            outs = llm.chat([r["messages"] for r in job["requests"]], params, use_tqdm=False)
        result = [
            {
                "completions": [
                    {
                        "tokens": list(c.token_ids),
                        "text": c.text,
                        "finish_reason": c.finish_reason,
                        "logprobs": _logprobs(c.logprobs),
                    }
                    for c in o.outputs
                ],
                "prompt_logprobs": _logprobs(o.prompt_logprobs),
            }
            for o in outs
        ]
    elif job["kind"] == "cached_prompt":
        block_size = llm.llm_engine.vllm_config.cache_config.block_size
        token_ids = llm.get_tokenizer().encode(job["prompt"])[: 2 * block_size + 1]
        if len(token_ids) != 2 * block_size + 1:
            raise ValueError(f"cached_prompt: the prompt has {len(token_ids)} tokens, needs {2 * block_size + 1}")
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
        result = [
            list(llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0].outputs[0].token_ids)
            for _ in range(2)
        ]
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")
    return {"kind": job["kind"], "tokens": result, "seconds": time.perf_counter() - start}


def _logprobs(positions) -> list[dict[str, float]] | None:
    """vLLM's logprobs (a list of {token id: Logprob} or None per position) as plain JSON."""
    if positions is None:
        return None
    return [None if p is None else {str(t): float(lp.logprob) for t, lp in p.items()} for p in positions]


def spec_metrics(llm) -> dict:
    out = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode_num_") and hasattr(metric, "value"):
            out[metric.name] = metric.value
    return out


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    os.environ.update(spec.get("env", {}))
    from vllm import LLM

    results = {}
    for engine in spec["engines"]:
        start = time.perf_counter()
        llm = LLM(**engine["llm"])
        started = time.perf_counter() - start
        jobs = [run_job(llm, job) for job in engine["jobs"]]
        results[engine["name"]] = {"start_seconds": started, "jobs": jobs, "metrics": spec_metrics(llm)}
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    json.dump(results, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

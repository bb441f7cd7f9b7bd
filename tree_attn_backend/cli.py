"""``tree-pruned``: the project's command line.

tree-pruned fuzz --examples N [pytest args]
    the Hypothesis property suite, N examples each
tree-pruned bench metadata [--json]
    builder vs per-node Python builder
tree-pruned bench kernels [--json] [--plot DIR] [--device cuda|cpu]
    tree attention per kernel path (FlashInfer on a GPU)
tree-pruned bench e2e [--quick] [--repeat N] [--check] [--json] [--plot DIR] [--prompts FILE] [--drafter D]
    [--draft-head auto|none|FILE] [--turns 2] [--repeat-prompts K]
    modes x concurrency in vLLM
tree-pruned bench replay [--prompts FILE] [--path-probs P,...] [--drafter D,...]
    drafters and pruning scored offline on greedy outputs
tree-pruned bench load [--quick] [--json] [--check] [--clients N] [--requests N]
    the tree server under streaming load
tree-pruned bench step-cost [--quick] [--repeat N] [--json] [--check]
    what a draft token costs: stock chain vs TREE_PRUNED tree
tree-pruned bench linear [--quick] [--rows N,...] [--repeat N] [--json]
    a model's linear layers at a few rows: vLLM's CPU product vs the packed one (float32, bfloat16)
tree-pruned train-head --prompts FILE --out FILE [--model DIR] [--max-tokens N] [--vocab N] [--epochs N]
    a draft head fitted to the model's own greedy answers (the hybrid drafter's option draft_head)
tree-pruned serve [--port P] [-- vLLM server args]
    the default model with TREE_PRUNED
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tree_attn_backend.bench.e2e import E2EConfig


def _fuzz(args: argparse.Namespace) -> int:
    from tree_attn_backend.ops.csrc_build import REPO_ROOT

    if args.examples < 1:
        raise SystemExit(f"--examples {args.examples}: must be >= 1")
    suite = REPO_ROOT / "fuzz"
    if not suite.is_dir():
        raise SystemExit(f"tree-pruned fuzz runs the suite of a source checkout; {suite} does not exist")
    env = dict(os.environ, TREE_PRUNED_FUZZ_EXAMPLES=str(args.examples))
    cmd = [sys.executable, "-m", "pytest", "-q", str(suite), *args.extra]
    return subprocess.call(cmd, env=env)


def _serve(args: argparse.Namespace) -> int:
    from tree_attn_backend import serve

    extra = [a for a in args.extra if a != "--"]
    return serve.main(args.port, extra)


def _train_head(args: argparse.Namespace) -> int:
    from tree_attn_backend import train_head
    from tree_attn_backend.bench.e2e import load_prompts
    from tree_attn_backend.default_model import default_model_dir

    for name in ("max_tokens", "vocab", "epochs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    report = train_head.train_head(
        args.model or str(default_model_dir()),
        load_prompts(args.prompts),
        args.out,
        max_tokens=args.max_tokens,
        vocab_size=args.vocab,
        epochs=args.epochs,
    )
    print(json.dumps(report))
    return 0


def _print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).rjust(w) for k, w in zip(keys, widths)))


def _report(args: argparse.Namespace, as_json: object, summary: str, targets: list[tuple[str, bool]]) -> int:
    """Print ``as_json`` (``--json``) or the summary and every target as met / NOT MET; the exit
    status: 1 under ``--check`` when a target is missed."""
    if args.json:
        print(json.dumps(as_json))
    else:
        print(summary)
        for statement, met in targets:
            print(f"[{'met' if met else 'NOT MET'}] {statement}")
    return 1 if args.check and not all(met for _, met in targets) else 0


def _bench_metadata(args: argparse.Namespace) -> int:
    from tree_attn_backend.bench import metadata_bench

    rows = metadata_bench.run(args.batches, args.tree_nodes, args.contexts, progress=not args.json)
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows)
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from tree_attn_backend.bench import kernels

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tree-pruned bench kernels: --device cuda but torch sees no CUDA device")
    grid = dict(kernels.GPU_GRID if device.type == "cuda" else kernels.CPU_GRID)
    for name in ("batches", "tree_nodes", "contexts"):
        if getattr(args, name) is not None:
            grid[name] = getattr(args, name)
    rows = []
    cells = kernels.grid_cells(grid)
    with tqdm(total=len(cells), desc=f"bench kernels ({device.type})", unit="row", file=sys.stderr) as bar:
        for row in kernels.run(grid, device):
            rows.append(row)
            bar.update()
    if args.json:
        print(json.dumps({"rows": rows, "targets": kernels.check_targets(rows)}))
    else:
        print(kernels.report(rows))
    if args.plot:
        print(f"wrote {kernels.plot(rows, args.plot)}", file=sys.stderr)
    return 0


def _bench_config(args: argparse.Namespace, per_category: int | None, **options: Any) -> E2EConfig:
    """The prompts (``--prompts``, ``--per-category`` else ``per_category``) and the default
    model in an ``E2EConfig`` with ``options``; ``concurrency=None`` = one request per prompt,
    at most 16 at a time. A bad argument exits naming its value."""
    from tree_attn_backend.bench import e2e
    from tree_attn_backend.default_model import default_model_dir

    try:
        if args.per_category is not None and args.per_category < 1:
            raise ValueError(f"--per-category {args.per_category}: must be >= 1")
        prompts = e2e.load_prompts(
            args.prompts, per_category=args.per_category if args.per_category is not None else per_category
        )
        if options.get("concurrency") is None:
            options["concurrency"] = (min(16, len(prompts)),)
        return e2e.E2EConfig(model=str(default_model_dir()), prompts=tuple(prompts), **options)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"tree-pruned bench {args.bench}: {exc}") from None


def _bench_e2e(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tree_attn_backend.bench import e2e, e2e_report

    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    config = _bench_config(
        args,
        1 if args.quick else None,
        modes=args.modes or e2e.MODES,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens or (16 if args.quick else 64),
        repeat=repeat,
        drafter=args.drafter,
        draft_head=None if args.draft_head == "none" else args.draft_head,
        turns=args.turns,
        repeat_prompts=args.repeat_prompts,
    )
    total = len(config.modes) * len(config.concurrency) * config.repeat
    with tqdm(total=total, desc="bench e2e", unit="run", file=sys.stderr) as bar:

        def progress(description: str, done: int) -> None:
            bar.set_description(description)
            bar.update(done - bar.n)

        runs = e2e.run_engines(config, e2e.tokenize_prompts(config), progress)
    rows = e2e.summarize(runs)
    if args.plot:
        for path in e2e_report.plot(rows, runs, args.plot):
            print(f"wrote {path}", file=sys.stderr)
    summary = e2e_report.format_table(rows, categories=args.categories) + "\n"
    calibration = e2e_report.calibration_totals(runs)
    targets = e2e_report.check_targets(rows, calibration, config.workload)
    report = {
        "drafter": config.drafter,
        "draft_head": config.draft_head,
        "workload": config.workload,
        "calibration": calibration,
        "targets": [{"target": statement, "met": met} for statement, met in targets],
        "rows": rows,
    }
    return _report(args, report, summary, targets)


def _bench_replay(args: argparse.Namespace) -> int:
    from tree_attn_backend.bench import e2e, replay

    try:
        path_probs = [float(x) for x in args.path_probs.split(",")] if args.path_probs else []
    except ValueError as exc:
        raise SystemExit(f"tree-pruned bench replay: --path-probs {args.path_probs!r}: {exc}") from None
    try:
        settings = replay.replay_settings(path_probs, args.drafter.split(","))
    except ValueError as exc:  # names the option and its value
        raise SystemExit(f"tree-pruned bench replay: {exc}") from None
    # Every prompt runs exactly once (concurrency None).
    config = _bench_config(args, None, modes=("none",), concurrency=None, max_tokens=args.max_tokens)
    print(f"greedy outputs of {len(config.prompts)} prompts from the stock engine...", file=sys.stderr)
    prompts = e2e.tokenize_prompts(config)
    (run,) = e2e.run_engines(config, prompts)
    ordered = [prompts[r["index"] % len(prompts)]["prompt_token_ids"] for r in run["requests"]]
    rows = replay.replay_rows(ordered, [r["tokens"] for r in run["requests"]], settings, config.max_tokens)
    if args.json:
        print(json.dumps({"rows": rows}))
    else:
        _print_table(rows)
    return 0


def _bench_load(args: argparse.Namespace) -> int:
    from tree_attn_backend.bench import e2e, load
    from tree_attn_backend.default_model import default_model_dir

    quick = {"clients": 8, "requests": 24, "max_tokens": (8, 16)} if args.quick else {}
    given = {name: getattr(args, name) for name in ("clients", "requests") if getattr(args, name) is not None}
    try:
        config = load.LoadConfig(
            model=str(default_model_dir()),
            prompts=tuple(e2e.load_prompts(args.prompts)),
            prompts_file=args.prompts,
            seed=args.seed,
            disconnect_fraction=args.disconnect_fraction,
            onednn_primitive_cache=None if args.onednn_primitive_cache < 0 else args.onednn_primitive_cache,
            **{**quick, **given},
        )
    except (OSError, ValueError) as exc:
        raise SystemExit(f"tree-pruned bench load: {exc}") from None
    result = load.run_load(config)
    return _report(args, result, load.format_summary(result), load.check_targets(result))


def _bench_linear(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from tree_attn_backend.bench import linear

    shape = linear.ModelShape(layers=2) if args.quick else linear.ModelShape()
    rows = args.rows or ((1, 5) if args.quick else (1, 2, 3, 5, 9, 17, 33))
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    passes = 2 if args.quick else 8
    if repeat < 1:
        raise SystemExit(f"tree-pruned bench linear: --repeat {repeat}: must be >= 1")
    cells = len(rows) * len(linear.PRODUCTS) * repeat
    with tqdm(total=cells, desc="bench linear", unit="cell", file=sys.stderr) as bar:
        table = linear.run(shape, tuple(rows), repeat, passes, progress=bar.update)
    if args.json:
        print(json.dumps({"shape": dataclasses.asdict(shape), "threads": torch.get_num_threads(), "rows": table}))
    else:
        print(f"{shape}, {torch.get_num_threads()} threads; one pass, ms: median (min-max) over {repeat} repetitions")
        _print_table(table)
    return 0


def _bench_step_cost(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tree_attn_backend.bench import step_cost
    from tree_attn_backend.default_model import default_model_dir

    quick: dict[str, Any] = (
        {"batch_sizes": (1, 4), "draft_tokens": (4,), "warmup_steps": 2, "timed_steps": 4, "repeat": 1}
        if args.quick
        else {}
    )
    if args.repeat is not None:
        quick["repeat"] = args.repeat
    try:
        config = step_cost.StepCostConfig(model=str(default_model_dir()), **quick)
    except ValueError as exc:
        raise SystemExit(f"tree-pruned bench step-cost: {exc}") from None
    with tqdm(
        total=len(config.batch_sizes) * config.repeat, desc="bench step-cost", unit="batch", file=sys.stderr
    ) as bar:

        def progress(line: str) -> None:
            bar.set_postfix_str(line)
            bar.update()

        result = step_cost.run_step_cost(config, progress=progress)
    return _report(args, result, step_cost.format_summary(result), step_cost.check_targets(result))


def _modes(text: str) -> tuple[str, ...]:
    from tree_attn_backend.bench.e2e import MODES

    modes = tuple(m.strip() for m in text.split(","))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}; modes are {','.join(MODES)}")
    return modes


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: values must be integers >= 1")
    return values


def metadata_bench_defaults(name: str) -> tuple[int, ...]:
    from tree_attn_backend.bench import metadata_bench

    return getattr(metadata_bench, name)


def _add_prompt_arguments(parser: argparse.ArgumentParser, per_category: bool) -> None:
    """The prompt set of a benchmark that sends prompts: ``--prompts`` and, if asked for,
    ``--per-category``."""
    from tree_attn_backend.bench.e2e import DEFAULT_PROMPTS

    parser.add_argument(
        "--prompts", default=str(DEFAULT_PROMPTS), help="Spec-Bench-style JSONL (default: the shipped mixed set)"
    )
    if per_category:
        parser.add_argument(
            "--per-category", type=int, default=None, help="the first N prompts of each category (default: all)"
        )


def _add_report_arguments(
    parser: argparse.ArgumentParser, json_help: str, check_help: str, repeat_help: str | None = None
) -> None:
    """``--json``, ``--check`` (see :func:`_report`) and, with ``repeat_help``, ``--repeat``."""
    parser.add_argument("--json", action="store_true", help=json_help)
    if repeat_help:
        parser.add_argument("--repeat", type=int, default=None, help=repeat_help)
    parser.add_argument("--check", action="store_true", help=check_help)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` for ``None``) as a namespace whose ``func`` runs it;
    a bad command line exits with argparse's usage error."""
    parser = argparse.ArgumentParser(
        prog="tree-pruned", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fuzz_p = sub.add_parser("fuzz", help="run the Hypothesis property suite")
    fuzz_p.add_argument("--examples", type=int, default=500, help="examples per property (default 500)")
    fuzz_p.set_defaults(func=_fuzz)
    bench = sub.add_parser("bench", help="benchmarks that print numbers")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    meta = bench_sub.add_parser("metadata", help="metadata builder vs a per-node Python builder")
    meta.add_argument("--json", action="store_true", help="print one JSON list of rows")
    meta.add_argument("--batches", type=_int_list, default=metadata_bench_defaults("BATCHES"), help="e.g. 1,8,64,256")
    meta.add_argument(
        "--tree-nodes", type=_int_list, default=metadata_bench_defaults("TREE_NODES"), help="e.g. 8,32,64"
    )
    meta.add_argument("--contexts", type=_int_list, default=metadata_bench_defaults("CONTEXTS"), help="e.g. 512,4096")
    meta.set_defaults(func=_bench_metadata)
    kern = bench_sub.add_parser(
        "kernels", help="one tree-verify attention layer per kernel path (GPU grid, or a reduced CPU grid)"
    )
    kern.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...], "targets": [...]}')
    kern.add_argument("--plot", metavar="DIR", help="write kernels.png into DIR")
    kern.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when torch sees one")
    kern.add_argument("--batches", type=_int_list, default=None, help="default: 1,8,32,128 on cuda, 1,4 on cpu")
    kern.add_argument("--tree-nodes", type=_int_list, default=None, help="default: 8,32,64 on cuda, 8,32 on cpu")
    kern.add_argument("--contexts", type=_int_list, default=None, help="default: 1024,8192 on cuda, 256,1024 on cpu")
    kern.set_defaults(func=_bench_kernels)
    e2e_p = bench_sub.add_parser("e2e", help="end to end in vLLM: modes x concurrency (tokens/s, drafts, latency)")
    e2e_p.add_argument("--quick", action="store_true", help="one prompt per category, 16 tokens (under 4 minutes)")
    e2e_p.add_argument("--plot", metavar="DIR", help="write PNG plots into DIR")
    _add_prompt_arguments(e2e_p, per_category=True)
    e2e_p.add_argument("--concurrency", type=_int_list, default=(1, 4, 16), help="e.g. 1,4,16")
    e2e_p.add_argument(
        "--modes",
        type=_modes,
        default=None,
        help="comma-separated subset of none,chain,suffix,suffix_packed,static_tree,pruned_tree,pruned_budget "
        "(default: all; none is required)",
    )
    e2e_p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 64, quick 16)")
    e2e_p.add_argument(
        "--drafter",
        default=None,
        help="the tree modes' drafter: lookup, recycle, suffix or hybrid (default: the engine's)",
    )
    e2e_p.add_argument(
        "--draft-head",
        default="auto",
        help="the tree engine's draft head for its hybrid drafter: auto (the shipped head for the model, "
        "if there is one), none, or a file from tree-pruned train-head",
    )
    e2e_p.add_argument(
        "--turns", type=int, default=1, help="2: send each two-turn prompt's second turn after its first answer"
    )
    e2e_p.add_argument(
        "--repeat-prompts", type=int, default=1, help="send every prompt K times per run (regenerations)"
    )
    e2e_p.add_argument(
        "--categories", action="store_true", help="table rows per prompt category too (JSON always has them)"
    )
    _add_report_arguments(
        e2e_p,
        'print one JSON object {"rows": [...]}',
        "exit 1 when a printed target is not met",
        "repetitions, each in a shuffled order from fresh engines; rows are medians (default 3, quick 1)",
    )
    e2e_p.set_defaults(func=_bench_e2e)
    replay_p = bench_sub.add_parser(
        "replay", help="score drafters and pruning settings offline on greedy outputs (exact for greedy)"
    )
    _add_prompt_arguments(replay_p, per_category=True)
    replay_p.add_argument("--max-tokens", type=int, default=128, help="greedy output tokens per prompt (default 128)")
    replay_p.add_argument(
        "--path-probs", default="0.02,0.05,0.08,0.12", help="path thresholds to score besides the defaults"
    )
    replay_p.add_argument(
        "--drafter", default="lookup", help="the drafters to replay, comma-separated: lookup (default), suffix"
    )
    replay_p.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...]}')
    replay_p.set_defaults(func=_bench_replay)
    load_p = bench_sub.add_parser("load", help="the tree server under streaming clients, preemption, disconnects")
    load_p.add_argument(
        "--quick", action="store_true", help="8 clients, 24 requests, 8-16 tokens (default 32, 256, 16-64)"
    )
    load_p.add_argument("--clients", type=int, default=None, help="requests in flight (default 32, quick 8)")
    load_p.add_argument("--requests", type=int, default=None, help="requests in all (default 256, quick 24)")
    load_p.add_argument("--seed", type=int, default=0, help="draws the workload (default 0)")
    load_p.add_argument(
        "--disconnect-fraction",
        type=float,
        default=0.1,
        help="fraction of requests the client closes after a few chunks (default 0.1)",
    )
    _add_prompt_arguments(load_p, per_category=False)
    load_p.add_argument(
        "--onednn-primitive-cache",
        type=int,
        default=0,
        metavar="N",
        help="the tree server's ONEDNN_PRIMITIVE_CACHE_CAPACITY (default 0, so the RSS figures show "
        "per-request state, not oneDNN's per-shape kernel cache; -1 keeps oneDNN's 1024)",
    )
    _add_report_arguments(
        load_p,
        "print one JSON object",
        "exit 1 when a target is missed (errors, greedy mismatches, health, drained, RSS growth)",
    )
    load_p.set_defaults(func=_bench_load)
    step_p = bench_sub.add_parser("step-cost", help="the cost of a draft token: stock chains vs TREE_PRUNED trees")
    step_p.add_argument(
        "--quick",
        action="store_true",
        help="batch sizes 1,4; 0 or 4 drafts; 4 timed steps; one repetition (default 1,4,16; 0,2,4,8,16; 10; 3)",
    )
    _add_report_arguments(
        step_p,
        "print one JSON object",
        "exit 1 when a target is missed (tree_vs_chain, no_draft_step_ratio)",
        "runs of the three engine processes, fresh each time (default 3, quick 1)",
    )
    step_p.set_defaults(func=_bench_step_cost)
    linear_p = bench_sub.add_parser(
        "linear", help="a model's linear layers at a few rows: vLLM's CPU product vs the packed small-batch one"
    )
    linear_p.add_argument("--quick", action="store_true", help="2 layers, rows 1 and 5, one repetition")
    linear_p.add_argument("--rows", type=_int_list, default=None, help="default 1,2,3,5,9,17,33")
    linear_p.add_argument("--repeat", type=int, default=None, help="repetitions (default 3)")
    linear_p.add_argument("--json", action="store_true", help='print one JSON object {"shape", "threads", "rows"}')
    linear_p.set_defaults(func=_bench_linear)
    head_p = sub.add_parser("train-head", help="fit a draft head to the model's own greedy answers")
    head_p.add_argument(
        "--prompts", required=True, help="Spec-Bench-style JSONL to answer (train on prompts you do not measure on)"
    )
    head_p.add_argument("--out", required=True, help="where to write the head (safetensors)")
    head_p.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    head_p.add_argument("--max-tokens", type=int, default=256, help="answer length per prompt (default 256)")
    head_p.add_argument("--vocab", type=int, default=4096, help="tokens the head may propose (default 4096)")
    head_p.add_argument("--epochs", type=int, default=3, help="passes over the examples (default 3)")
    head_p.set_defaults(func=_train_head)
    serve_p = sub.add_parser("serve", help="serve the default model with the tree path on 127.0.0.1")
    serve_p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    serve_p.set_defaults(func=_serve)
    # Arguments `fuzz` does not know go to pytest (e.g. `-k verify`), `serve`'s to vLLM.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("fuzz", "serve"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

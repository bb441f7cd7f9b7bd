"""``tree-pruned``: the project's command line.

    tree-pruned fuzz --examples N [pytest args]   the Hypothesis property suite, N examples each
    tree-pruned bench metadata [--json]   builder vs per-node Python builder
    tree-pruned serve [--port P] [-- vLLM server args]   the default model with TREE_PRUNED
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _fuzz(args: argparse.Namespace) -> int:
    import fuzz

    if args.examples < 1:
        raise SystemExit(f"--examples {args.examples}: must be >= 1")
    env = dict(os.environ, TREE_PRUNED_FUZZ_EXAMPLES=str(args.examples))
    cmd = [sys.executable, "-m", "pytest", "-q", str(Path(fuzz.__file__).parent), *args.extra]
    return subprocess.call(cmd, env=env)


def _serve(args: argparse.Namespace) -> int:
    from . import serve

    extra = [a for a in args.extra if a != "--"]
    return serve.main(args.port, extra)


def _print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).rjust(w) for k, w in zip(keys, widths)))


def _bench_metadata(args: argparse.Namespace) -> int:
    from .bench import metadata_bench

    rows = metadata_bench.run(args.batches, args.tree_nodes, args.contexts, progress=not args.json)
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows)
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: values must be integers >= 1")
    return values


def metadata_bench_defaults(name: str) -> tuple[int, ...]:
    from .bench import metadata_bench

    return getattr(metadata_bench, name)


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="tree-pruned", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fuzz_p = sub.add_parser("fuzz", help="run the Hypothesis property suite")
    fuzz_p.add_argument("--examples", type=int, default=500, help="examples per property (default 500)")
    fuzz_p.set_defaults(func=_fuzz)
    bench = sub.add_parser("bench", help="benchmarks that print numbers")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    meta = bench_sub.add_parser("metadata", help="metadata builder vs a per-node Python builder")
    meta.add_argument("--json", action="store_true", help="print one JSON list of rows")
    meta.add_argument("--batches", type=_int_list, default=metadata_bench_defaults("BATCHES"), help="e.g. 1,8,64,256")
    meta.add_argument("--tree-nodes", type=_int_list, default=metadata_bench_defaults("TREE_NODES"), help="e.g. 8,32,64")
    meta.add_argument("--contexts", type=_int_list, default=metadata_bench_defaults("CONTEXTS"), help="e.g. 512,4096")
    meta.set_defaults(func=_bench_metadata)
    serve_p = sub.add_parser("serve", help="serve the default model with the tree path on 127.0.0.1")
    serve_p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    serve_p.set_defaults(func=_serve)
    # Arguments `fuzz` does not know go to pytest (e.g. `-k verify`), `serve`'s to vLLM.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("fuzz", "serve"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

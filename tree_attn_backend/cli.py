"""``tree-pruned``: the project's command line.

    tree-pruned fuzz --examples N         run the Hypothesis property suite with N examples
    tree-pruned bench metadata [--json]   builder vs per-node Python builder
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
    cmd = [sys.executable, "-m", "pytest", "-q", str(Path(fuzz.__file__).parent), *args.pytest_args]
    return subprocess.call(cmd, env=env)


def _print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).rjust(w) for k, w in zip(keys, widths)))


def _bench_metadata(args: argparse.Namespace) -> int:
    from .bench import metadata_bench

    rows = metadata_bench.run(progress=not args.json)
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table(rows)
    return 0


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="tree-pruned", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fuzz_p = sub.add_parser("fuzz", help="run the Hypothesis property suite")
    fuzz_p.add_argument("--examples", type=int, default=500, help="examples per property (default 500)")
    fuzz_p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, e.g. -k verify")
    fuzz_p.set_defaults(func=_fuzz)
    bench = sub.add_parser("bench", help="benchmarks that print numbers")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    meta = bench_sub.add_parser("metadata", help="metadata builder vs a per-node Python builder")
    meta.add_argument("--json", action="store_true", help="print one JSON list of rows")
    meta.set_defaults(func=_bench_metadata)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

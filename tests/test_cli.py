"""The command line runs as documented (small grids, so CI stays quick)."""

import json
import subprocess
import sys

import pytest

from tree_attn_backend.cli import main


def test_bench_metadata_json_rows(capsys):
    assert main(["bench", "metadata", "--json", "--batches", "1,4", "--tree-nodes", "8", "--contexts", "64"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["batch"], r["tree_nodes"], r["context"]) for r in rows] == [(1, 8, 64), (4, 8, 64)]
    for r in rows:
        assert set(r) >= {"batch", "tree_nodes", "context", "build_us", "naive_us", "speedup"}
        assert r["build_us"] > 0 and r["naive_us"] > 0


def test_bench_rejects_bad_grid():
    with pytest.raises(SystemExit):
        main(["bench", "metadata", "--batches", "0"])


def test_fuzz_command_runs_the_property_suite():
    proc = subprocess.run(
        [sys.executable, "-m", "tree_attn_backend.cli", "fuzz", "--examples", "3", "-k", "test_invalid_inputs"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


def test_bench_linear_times_every_product_per_row_count():
    proc = subprocess.run(
        [sys.executable, "-m", "tree_attn_backend.cli", "bench", "linear", "--quick", "--rows", "1,3", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["shape"]["layers"] == 2 and report["threads"] >= 1
    assert [r["rows"] for r in report["rows"]] == [1, 3]
    for r in report["rows"]:
        for product in ("vllm", "packed", "packed_bf16"):
            low, high = r[f"{product}_ms_range"]
            assert 0 < low <= r[f"{product}_ms"] <= high
        assert r["packed_over_vllm"] > 0 and r["packed_bf16_over_vllm"] > 0


def test_bench_linear_rejects_a_bad_repeat():
    with pytest.raises(SystemExit, match="--repeat 0: must be >= 1"):
        main(["bench", "linear", "--repeat", "0"])

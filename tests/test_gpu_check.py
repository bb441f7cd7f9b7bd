"""scripts/gpu_check.sh --dry-run: every step of the GPU check, on this machine's CPU; and
the bundle's checksum verification."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tree_attn_backend.ops import gpu_bundle as bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.engine
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, TREE_PRUNED_GPU_BUNDLE=str(tmp_path / "no-bundle"))
    result = subprocess.run(
        [str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = (out / "steps.log").read_text()
    assert "FAILED" not in steps and "done: exit 0" in steps
    assert "passed" in (out / "fuzz.log").read_text()
    report = json.loads((out / "kernels.json").read_text())
    assert [(r["device"], r["batch"]) for r in report["rows"]] == [("cpu", 1), ("cpu", 2)]
    assert "[n/a]" in (out / "kernels.txt").read_text()
    assert (out / "kernels.png").stat().st_size > 0
    page = (out / "gpu-results.md").read_text()
    assert "passed" in page and "batch | tree_nodes" in page and "kernels.png" in page


def test_gpu_check_rejects_unknown_arguments():
    result = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_bundle_verify_names_a_changed_file(tmp_path):
    (tmp_path / "wheels").mkdir()
    payload = tmp_path / "wheels" / "x.whl"
    payload.write_bytes(b"wheel")
    manifest = {"created": "now", "files": {"wheels/x.whl": bundle._sha256(payload)}}
    (tmp_path / "MANIFEST.json").write_text(json.dumps(manifest))
    assert bundle.verify(tmp_path)["files"] == manifest["files"]
    payload.write_bytes(b"other")
    with pytest.raises(SystemExit, match="x.whl does not match its checksum"):
        bundle.verify(tmp_path)
    payload.unlink()
    with pytest.raises(SystemExit, match="x.whl is missing"):
        bundle.verify(tmp_path)
    with pytest.raises(SystemExit, match="no bundle at"):
        bundle.verify(tmp_path / "absent")

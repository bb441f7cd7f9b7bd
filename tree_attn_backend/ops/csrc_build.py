"""Build the native ops in ``csrc/`` into ``tree_attn_backend/_C/``.

- ``tree_pruned_C.so``: the CPU torch ops (every ``csrc/*.cpp``), built against this torch.
- ``tree_pruned_cuda.so``: the CUDA helpers (``csrc/*.cu``), plain C ABI, built with nvcc for
  the architectures in ``TREE_PRUNED_CUDA_ARCHS`` (default ``90a``, the H200 this project
  targets first, plus PTX for newer GPUs). Built wherever nvcc exists, GPU or not.

Run by ``make setup`` (and so by ``make test``); ``python -m tree_attn_backend.ops.csrc_build
[cpu|cuda] [-v]`` rebuilds by hand. The package works without either result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CSRC = REPO_ROOT / "csrc"
BUILD_DIR = REPO_ROOT / "build" / "csrc_cpu"
DEFAULT_CUDA_ARCHS = "90a"


def build_cpu_ops(verbose: bool = False) -> Path:
    """Compile every ``csrc/*.cpp`` into one torch op library and install it in the package."""
    from torch.utils.cpp_extension import load

    from tree_attn_backend.ops.native import LIBRARY_PATH

    sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {CSRC}")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    load(
        name="tree_pruned_C",
        sources=sources,
        # Built where it runs (make setup), so the host's vector units are fair game. -fopenmp:
        # at::parallel_for is an OpenMP pragma inlined from ATen's headers, serial without it;
        # the library then needs libgomp.so.1, the one torch has already loaded.
        extra_cflags=["-O3", "-std=c++17", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(BUILD_DIR),
        is_python_module=False,
        verbose=verbose,
    )
    install_library(BUILD_DIR / "tree_pruned_C.so", LIBRARY_PATH)
    return LIBRARY_PATH


def install_library(built: Path, target: Path) -> None:
    """Put ``built`` at ``target`` by rename: a process that has the old library loaded keeps
    its (unlinked) file; writing over it in place would crash that process."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.tmp")
    shutil.copy(built, staged)  # a fresh mtime: make compares it with the sources
    os.replace(staged, target)


def find_nvcc() -> Path | None:
    """nvcc from ``$CUDA_HOME/bin``, else from ``PATH``."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return Path(cuda_home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def cuda_home(nvcc: Path) -> Path:
    """The toolkit root of ``nvcc`` as nvcc itself reports it (``TOP`` of ``--dryrun``):
    ``nvcc`` on PATH may be a wrapper script or a link."""
    result = subprocess.run(
        [str(nvcc), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True
    )
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return Path(line.split("=", 1)[1].strip()).resolve()
    return nvcc.resolve().parent.parent


def gencode_flags(archs: str) -> list[str]:
    """nvcc ``-gencode`` flags for ``archs`` ("90a 100a", say): SASS for each, plus portable PTX
    of the newest one's base architecture ("90" for "90a": arch-specific PTX runs nowhere else)
    so that later GPUs can JIT it."""
    names = archs.replace(",", " ").split()
    if not names or not all(n[:2].isdigit() and n[2:] in ("", "a", "f") for n in names):
        raise ValueError(f"TREE_PRUNED_CUDA_ARCHS = {archs!r}: expected compute capabilities like '90a 100a'")
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in names]
    base = names[-1][:2]
    return flags + [f"-gencode=arch=compute_{base},code=compute_{base}"]


def build_cuda_helpers(nvcc: Path, archs: str = DEFAULT_CUDA_ARCHS, verbose: bool = False) -> Path:
    """Compile ``csrc/*.cu`` with nvcc into one shared library (static CUDA runtime, no torch)."""
    from tree_attn_backend.ops.native import CUDA_LIBRARY_PATH

    sources = sorted(str(p) for p in CSRC.glob("*.cu"))
    if not sources:
        raise FileNotFoundError(f"no CUDA sources in {CSRC}")
    built = REPO_ROOT / "build" / "csrc_cuda" / CUDA_LIBRARY_PATH.name
    built.parent.mkdir(parents=True, exist_ok=True)
    command = [
        str(nvcc),
        "-O3",
        "-std=c++17",
        "-shared",
        "-Xcompiler",
        "-fPIC",
        "-cudart",
        "static",
        *gencode_flags(archs),
        "-o",
        str(built),
        *sources,
    ]
    if verbose:
        print(" ".join(command))
    subprocess.run(command, check=True)
    install_library(built, CUDA_LIBRARY_PATH)
    return CUDA_LIBRARY_PATH


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args
    targets = [a for a in args if a != "-v"] or ["cpu", "cuda"]
    unknown = set(targets) - {"cpu", "cuda"}
    if unknown:
        raise SystemExit(f"unknown target(s) {sorted(unknown)}: choose from cpu, cuda")
    if "cpu" in targets:
        print(f"built {build_cpu_ops(verbose=verbose)}")
    if "cuda" in targets:
        nvcc = find_nvcc()
        if nvcc is None:
            print("nvcc not found (set CUDA_HOME or PATH): CUDA helpers not built; the GPU path uses torch versions")
        else:
            archs = os.environ.get("TREE_PRUNED_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
            print(f"built {build_cuda_helpers(nvcc, archs, verbose=verbose)} for sm_{archs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Build the native CPU ops in ``csrc/`` into ``tree_attn_backend/_C/tree_pruned_C.so``.

Run by ``make setup`` (and so by ``make test``); ``python -m tree_attn_backend.csrc_build``
rebuilds by hand. Needs a C++ compiler and ninja; the package works without the result.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CSRC = REPO_ROOT / "csrc"
BUILD_DIR = REPO_ROOT / "build" / "csrc_cpu"


def build_cpu_ops(verbose: bool = False) -> Path:
    """Compile every ``csrc/*.cpp`` into one torch op library and install it in the package."""
    from torch.utils.cpp_extension import load

    from .native import LIBRARY_PATH

    sources = sorted(str(p) for p in CSRC.glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {CSRC}")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    load(
        name="tree_pruned_C",
        sources=sources,
        # Built where it runs (make setup), so the host's vector units are fair game.
        extra_cflags=["-O3", "-std=c++17", "-march=native"],
        build_directory=str(BUILD_DIR),
        is_python_module=False,
        verbose=verbose,
    )
    LIBRARY_PATH.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUILD_DIR / "tree_pruned_C.so", LIBRARY_PATH)
    return LIBRARY_PATH


def main() -> int:
    path = build_cpu_ops(verbose="-v" in sys.argv)
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

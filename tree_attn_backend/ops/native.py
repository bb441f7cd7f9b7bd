"""The optional native ops built from ``csrc/`` (see ``tree_attn_backend.ops.csrc_build``).

Importing the package never requires them: every op has a torch/numpy version that is both
the fallback and the oracle the tests hold the native op against. Falling back only costs
speed, and is logged once per op.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger("tree_attn_backend")

# Both libraries live in the package's _C/ (built by tree_attn_backend.ops.csrc_build).
_LIBRARY_DIR = Path(__file__).resolve().parents[1] / "_C"
LIBRARY_PATH = _LIBRARY_DIR / "tree_pruned_C.so"
CUDA_LIBRARY_PATH = _LIBRARY_DIR / "tree_pruned_cuda.so"


@cache
def _load_library() -> bool:
    if not LIBRARY_PATH.exists():
        return False
    try:
        torch.ops.load_library(str(LIBRARY_PATH))
    except OSError as exc:  # built against another torch, say
        logger.warning("tree_attn_backend: cannot load %s (%s); using the torch fallbacks", LIBRARY_PATH, exc)
        return False
    return True


@cache
def native_op(name: str) -> torch._ops.OpOverloadPacket | None:
    """``torch.ops.tree_pruned.<name>`` if the native library is built, else ``None``.

    The first miss per op logs one warning naming the op and how to build it.
    """
    if _load_library() and hasattr(torch.ops.tree_pruned, name):
        return getattr(torch.ops.tree_pruned, name)
    logger.warning(
        "tree_attn_backend: native op %s is not built (run `python -m tree_attn_backend.ops.csrc_build`); "
        "using the slower torch/numpy version, results are identical",
        name,
    )
    return None

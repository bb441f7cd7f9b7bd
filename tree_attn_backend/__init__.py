"""Pruned-tree speculative decoding for vLLM: the ``TREE_PRUNED`` attention backend.

The pipeline, one folder per stage (``docs/architecture.md`` draws it)::

    drafting/      draft trees, drafters, pruning, the batch verify budget
    metadata/      (top-level package) tree masks, positions, KV slots for the kernels
    attention/     tree attention: reference, CPU kernels, cascade, KV layouts, gpu/
    verification/  the accepted path and KV compaction
    vllm_plugin/   the only code that imports vLLM

:mod:`tree_attn_backend.ragged` holds the index arithmetic they share and
:mod:`tree_attn_backend.ops` the native ops. The stages' public names (their ``__all__``:
``DraftTree``, ``expand_and_prune``, ``verify_greedy``, ``compaction_moves``, ...) are
importable from the package itself; each stage loads on first use, so ``import
tree_attn_backend`` stays cheap and ``metadata`` can use ``ragged`` and ``ops`` without an
import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

_STAGES = ("drafting", "attention", "verification")  # each lists its public names in __all__


def _stage_modules() -> list[Any]:
    return [importlib.import_module(f"tree_attn_backend.{stage}") for stage in _STAGES]


def __getattr__(name: str) -> Any:
    for module in _stage_modules():
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module 'tree_attn_backend' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *(name for module in _stage_modules() for name in module.__all__)})

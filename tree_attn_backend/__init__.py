"""Pruned-tree speculative decoding for vLLM: the ``TREE_PRUNED`` attention backend.

The pipeline, one folder per stage (``docs/architecture.md`` draws it)::

    drafting/      draft trees, drafters, pruning, the batch verify budget
    metadata/      (top-level package) tree masks, positions, KV slots for the kernels
    attention/     tree attention: reference, CPU kernels, cascade, KV layouts, gpu/
    verification/  the accepted path and KV compaction
    vllm_plugin/   the only code that imports vLLM

:mod:`tree_attn_backend.ragged` holds the index arithmetic they share and
:mod:`tree_attn_backend.ops` the native ops. The names below are importable from the package
itself; each loads its stage on first use, so ``import tree_attn_backend`` stays cheap and
``metadata`` can use :mod:`ragged` and :mod:`ops` without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_STAGES = ("drafting", "attention", "verification")  # each stage package lists its names in __all__
__all__ = [
    "CpuAttentionPlan",
    "DraftTree",
    "Drafter",
    "FlatTrees",
    "LookupIndex",
    "OnlineCostFit",
    "PruningPolicy",
    "ReferenceRequest",
    "SyntheticDrafter",
    "TreeShape",
    "VerifyCostModel",
    "VerifyResult",
    "allocate_verify_budget",
    "apply_compaction",
    "cascade_attention",
    "compaction_moves",
    "expand_and_prune",
    "plan_cpu_attention",
    "reference_tree_attention",
    "run_cpu_attention",
    "verify_greedy",
    "verify_sampling",
    "verify_target_tokens",
]

if TYPE_CHECKING:
    from tree_attn_backend.attention import (
        CpuAttentionPlan,
        ReferenceRequest,
        cascade_attention,
        plan_cpu_attention,
        reference_tree_attention,
        run_cpu_attention,
    )
    from tree_attn_backend.drafting import (
        Drafter,
        DraftTree,
        FlatTrees,
        LookupIndex,
        OnlineCostFit,
        PruningPolicy,
        SyntheticDrafter,
        TreeShape,
        VerifyCostModel,
        allocate_verify_budget,
        expand_and_prune,
    )
    from tree_attn_backend.verification import (
        VerifyResult,
        apply_compaction,
        compaction_moves,
        verify_greedy,
        verify_sampling,
        verify_target_tokens,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        for stage in _STAGES:
            module = importlib.import_module(f"tree_attn_backend.{stage}")
            if name in module.__all__:
                return getattr(module, name)
    raise AttributeError(f"module 'tree_attn_backend' has no attribute {name!r}")

"""Stage 3, attention: tree attention over the paged KV cache from the metadata the builder
packs (``metadata/``). The dense float64 reference, the CPU kernels, the cascade formulation
the GPU path runs, the paged KV layouts, and ``gpu/`` (FlashInfer and the CUDA helpers)."""

from tree_attn_backend.attention.cascade import cascade_attention
from tree_attn_backend.attention.cpu_attention import CpuAttentionPlan, plan_cpu_attention, run_cpu_attention
from tree_attn_backend.attention.reference import ReferenceRequest, reference_tree_attention

__all__ = [
    "CpuAttentionPlan",
    "ReferenceRequest",
    "cascade_attention",
    "plan_cpu_attention",
    "reference_tree_attention",
    "run_cpu_attention",
]

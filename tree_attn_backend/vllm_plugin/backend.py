"""TREE_PRUNED as a vLLM attention backend (CPU): thin adapters over ``metadata`` and
``tree_attn_backend.cpu_attention``.

On CPU this class is registered in the ``CPU_ATTN`` slot of vLLM's backend registry (the CPU
platform always asks for that slot), so ``get_name()`` returns ``"CPU_ATTN"``: vLLM looks the
name up as an enum member in every process. The KV cache keeps vLLM's CPU layout (see
``tree_attn_backend.paged_kv``); this backend writes and reads it itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from metadata import MaskWorkspace, StepBatch, TreeAttentionMetadata, build_tree_attention_metadata

from ..cpu_attention import CpuAttentionPlan, plan_cpu_attention, run_cpu_attention
from ..paged_kv import write_kv
from .side_channel import TREE_STEP


@dataclass
class TreePrunedMetadata:
    """Per-step metadata shared by all layers."""

    num_actual_tokens: int
    tree: TreeAttentionMetadata
    plan: CpuAttentionPlan


class TreePrunedMetadataBuilder(AttentionMetadataBuilder[TreePrunedMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:  # noqa: ANN001 (vLLM's types)
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.workspace = MaskWorkspace()

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> TreePrunedMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        query_lens = np.diff(qsl)
        seq_lens = cm.seq_lens[:num_reqs].cpu().numpy().astype(np.int64)
        batch = StepBatch(
            context_lens=seq_lens - query_lens,
            query_lens=query_lens,
            parents=TREE_STEP.parents_for(query_lens),
            block_table=cm.block_table_tensor[:num_reqs].cpu().numpy(),
            block_size=self.block_size,
        )
        tree = build_tree_attention_metadata(batch, self.workspace)
        return TreePrunedMetadata(num_actual_tokens=cm.num_actual_tokens, tree=tree, plan=plan_cpu_attention(tree))


class TreePrunedImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: "list[float] | None",
        sliding_window: "int | None",
        kv_cache_dtype: str,
        logits_soft_cap: "float | None" = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: "str | None" = None,
        sinks: "torch.Tensor | None" = None,
    ) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes,
            "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap or None,
            "sinks": sinks,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"TREE_PRUNED attention does not support {name} (got {value!r})")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"TREE_PRUNED attention supports decoder attention only, got {attn_type!r}")
        if kv_cache_dtype != "auto":
            raise NotImplementedError(f"TREE_PRUNED attention supports kv_cache_dtype 'auto' only, got {kv_cache_dtype!r}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads

    def do_kv_cache_update(
        self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        n = slot_mapping.shape[0]
        valid = slot_mapping >= 0  # padded tokens carry slot -1
        write_kv(kv_cache, key[:n][valid], value[:n][valid], slot_mapping[valid])

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: "TreePrunedMetadata | None",
        output: torch.Tensor,
        output_scale: "torch.Tensor | None" = None,
        output_block_scale: "torch.Tensor | None" = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("TREE_PRUNED attention does not support fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        run_cpu_attention(attn_metadata.plan, q, kv_cache, self.scale, out=out)
        return output


class TreePrunedBackend(CPUAttentionBackend):
    """vLLM's CPU backend contract (dtypes, head and block sizes, cache layout) with the
    tree-aware builder and impl."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[TreePrunedImpl]:
        return TreePrunedImpl

    @staticmethod
    def get_builder_cls() -> type[TreePrunedMetadataBuilder]:
        return TreePrunedMetadataBuilder

"""TREE_PRUNED as a vLLM attention backend (CPU).

vLLM's own CPU attention kernel runs every row of the batch (it is causal, which is exact for
prefill chunks, plain decodes and chain drafts); rows that carry a branching draft tree are
then recomputed by :mod:`tree_attn_backend.cpu_attention` over ``metadata``'s tree layout and
overwritten. Steps without trees therefore cost what stock vLLM costs.

On CPU this class is registered in the ``CPU_ATTN`` slot of vLLM's backend registry (the CPU
platform always asks for that slot), so ``get_name()`` returns ``"CPU_ATTN"``: vLLM looks the
name up as an enum member in every process. The KV cache keeps vLLM's CPU layout (see
``tree_attn_backend.paged_kv``), written by vLLM's own op.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from metadata import MaskWorkspace, StepBatch, build_tree_attention_metadata

from ..cpu_attention import CpuAttentionPlan, plan_cpu_attention, run_cpu_attention, segment_arange
from .side_channel import TREE_STEP


@dataclass
class TreeRowsAttention:
    """The tree rows of one step, shared by all layers.

    token_index: int64 ``[T]`` the tree rows' query tokens in the step's token order;
    plan: the CPU attention plan of the sub-batch made of those rows only (its token ``i`` is
    ``token_index[i]``).
    """

    token_index: torch.Tensor
    plan: CpuAttentionPlan


@dataclass
class TreePrunedMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata for the whole batch, plus the tree rows (``None``: no trees)."""

    tree_rows: "TreeRowsAttention | None" = None


class TreePrunedMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:  # noqa: ANN001 (vLLM's types)
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.workspace = MaskWorkspace()

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> TreePrunedMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        metadata = TreePrunedMetadata(**{f.name: getattr(base, f.name) for f in fields(CPUAttentionMetadata)})
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
        query_lens = np.diff(qsl)
        published = TREE_STEP.tree_rows_for(query_lens)
        if published is None or published.rows.size == 0:
            return metadata
        rows = published.rows
        seq_lens = cm.seq_lens[:num_reqs].cpu().numpy().astype(np.int64)[rows]
        batch = StepBatch(
            context_lens=seq_lens - query_lens[rows],
            query_lens=query_lens[rows],
            parents=published.parents,
            block_table=cm.block_table_tensor[:num_reqs].cpu().numpy()[rows],
            block_size=self.block_size,
        )
        tree = build_tree_attention_metadata(batch, self.workspace)
        metadata.tree_rows = TreeRowsAttention(
            token_index=torch.from_numpy(segment_arange(qsl[rows], query_lens[rows])),
            plan=plan_cpu_attention(tree),
        )
        return metadata


class TreePrunedImpl(CPUAttentionBackendImpl):
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
        # The tree rows' attention is plain scaled softmax attention over the paged cache.
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
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)

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
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        if attn_metadata is None or attn_metadata.tree_rows is None:
            return output
        tree_rows = attn_metadata.tree_rows
        index = tree_rows.token_index
        q = query.index_select(0, index).view(-1, self.num_heads, self.head_size)
        out = run_cpu_attention(tree_rows.plan, q, kv_cache, self.scale)
        output.view(output.shape[0], -1).index_copy_(0, index, out.view(index.shape[0], -1).to(output.dtype))
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

"""TREE_PRUNED as a vLLM attention backend (CPU).

Every row is computed once. Steps without branching trees are vLLM's own CPU attention, untouched
(it is causal, which is exact for prefill chunks, plain decodes and chain drafts). In a step with
trees, vLLM's kernel runs on the sub-batch of rows without trees (vLLM's metadata built for those
rows only) and :mod:`tree_attn_backend.attention.cpu_attention` runs the tree rows over ``metadata``'s tree
layout; each writes its rows of the output.

On CPU this class is registered in the ``CPU_ATTN`` slot of vLLM's backend registry (the CPU
platform always asks for that slot), so ``get_name()`` returns ``"CPU_ATTN"``: vLLM looks the
name up as an enum member in every process. The KV cache keeps vLLM's CPU layout (see
``tree_attn_backend.attention.kv_layout.CPU_LAYOUT``), written by vLLM's own op.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

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
from tree_attn_backend.attention.cpu_attention import CpuAttentionPlan, plan_cpu_attention, run_cpu_attention
from tree_attn_backend.ragged import indptr, segment_arange
from tree_attn_backend.vllm_plugin.step_trees import STEP_TREES


@dataclass
class TreeRowsAttention:
    """The tree rows of one step, shared by all layers.

    token_index: int64 ``[T]`` the tree rows' query tokens in the step's token order, or
    ``None`` when they are all of the step's tokens (every row has a tree: no gather, no scatter);
    plan: the CPU attention plan of the sub-batch made of those rows only (its token ``i`` is
    ``token_index[i]``).
    """

    token_index: torch.Tensor | None
    plan: CpuAttentionPlan


@dataclass
class PlainRowsAttention:
    """The rows without trees of a step that has trees, shared by all layers.

    token_index: int64 ``[P]`` their query tokens in the step's token order;
    metadata: vLLM's CPU metadata of the sub-batch made of those rows only (its token ``i`` is
    ``token_index[i]``).
    """

    token_index: torch.Tensor
    metadata: CPUAttentionMetadata


@dataclass
class TreePrunedMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata for the whole batch, plus the tree rows (``None``: no trees) and, when
    there are tree rows, the other rows (``None``: every row has a tree)."""

    tree_rows: TreeRowsAttention | None = None
    plain_rows: PlainRowsAttention | None = None


class TreePrunedMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
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
        step = STEP_TREES.for_batch(query_lens)
        if step is None or step.branching_rows.size == 0:
            return metadata
        rows = step.branching_rows
        seq_lens = cm.seq_lens[:num_reqs].cpu().numpy().astype(np.int64)[rows]
        batch = StepBatch(
            context_lens=seq_lens - query_lens[rows],
            query_lens=query_lens[rows],
            parents=step.parents[step.tokens_of(rows)],
            block_table=cm.block_table_tensor[:num_reqs].cpu().numpy()[rows],
            block_size=self.block_size,
        )
        tree = build_tree_attention_metadata(batch, self.workspace)
        plain = np.setdiff1d(np.arange(num_reqs), rows)
        metadata.tree_rows = TreeRowsAttention(
            token_index=torch.from_numpy(step.tokens_of(rows)) if plain.size else None,
            plan=plan_cpu_attention(tree),
        )
        if plain.size:
            metadata.plain_rows = self._plain_rows(cm, plain, qsl, query_lens)
        return metadata

    def _plain_rows(
        self, cm: CommonAttentionMetadata, plain: np.ndarray, qsl: np.ndarray, query_lens: np.ndarray
    ) -> PlainRowsAttention:
        """vLLM's metadata for the sub-batch of rows ``plain`` (sorted request indices): their
        query tokens packed in order, their sequences and block tables. The KV cache is written
        for every row before attention (``do_kv_cache_update``), so no slot mapping is needed."""
        sub_lens = query_lens[plain]
        sub_qsl = torch.from_numpy(indptr(sub_lens).astype(np.int32))
        index = torch.from_numpy(plain)
        seq_lens = cm.seq_lens[: cm.num_reqs].index_select(0, index)
        sub = replace(
            cm,
            query_start_loc=sub_qsl,
            query_start_loc_cpu=sub_qsl,
            seq_lens=seq_lens,
            num_reqs=int(plain.size),
            num_actual_tokens=int(sub_lens.sum()),
            max_query_len=int(sub_lens.max()),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=cm.block_table_tensor[: cm.num_reqs].index_select(0, index),
            slot_mapping=cm.slot_mapping[:0],
        )
        return PlainRowsAttention(
            token_index=torch.from_numpy(segment_arange(qsl[plain], sub_lens)),
            metadata=super().build(0, sub),
        )


class TreePrunedImpl(CPUAttentionBackendImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
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
            raise NotImplementedError(
                f"TREE_PRUNED attention supports kv_cache_dtype 'auto' only, got {kv_cache_dtype!r}"
            )
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads,
            alibi_slopes,
            sliding_window,
            kv_cache_dtype,
            logits_soft_cap,
            attn_type,
            kv_sharing_target_layer_name,
            sinks,
        )

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TreePrunedMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None or attn_metadata.tree_rows is None:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        plain_rows = attn_metadata.plain_rows
        if plain_rows is not None:
            index = plain_rows.token_index
            plain_out = output.new_empty((index.shape[0], *output.shape[1:]))
            # key and value are not read: vLLM's decoder attention reads the cache only.
            super().forward(
                layer,
                query.index_select(0, index),
                key,
                value,
                kv_cache,
                plain_rows.metadata,
                plain_out,
                output_scale,
                output_block_scale,
            )
            output.index_copy_(0, index, plain_out)
        tree_rows = attn_metadata.tree_rows
        tree_index = tree_rows.token_index
        if tree_index is None:  # the step's tokens are all tree rows, in order: straight in and out
            n = tree_rows.plan.num_tokens
            shape = (n, self.num_heads, self.head_size)
            run_cpu_attention(tree_rows.plan, query[:n].view(shape), kv_cache, self.scale, out=output[:n].view(shape))
            return output
        q = query.index_select(0, tree_index).view(-1, self.num_heads, self.head_size)
        out = run_cpu_attention(tree_rows.plan, q, kv_cache, self.scale)
        output.view(output.shape[0], -1).index_copy_(0, tree_index, out.view(tree_index.shape[0], -1).to(output.dtype))
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

"""Turns a batch description into concrete tensors: a paged cache holding random K/V, the
step's queries, the builder's metadata, and the same data in dense form for the reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metadata import StepBatch, TreeAttentionMetadata, build_tree_attention_metadata
from tree_attn_backend.attention.kv_layout import CPU_LAYOUT, NHD_LAYOUT
from tree_attn_backend.attention.reference import ReferenceRequest


@dataclass(frozen=True)
class BatchSpec:
    """A batch to build: per request its context length and new-token parents."""

    context_lens: tuple[int, ...]
    parents: tuple[tuple[int, ...], ...]
    block_size: int
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_size: int = 64
    spare_blocks: int = 3  # unused blocks, so a wrong index reads garbage, not zeros


@dataclass
class AttentionCase:
    spec: BatchSpec
    meta: TreeAttentionMetadata
    batch: StepBatch
    query: torch.Tensor  # [N, Hq, D]
    key: torch.Tensor  # [N, Hkv, D]
    value: torch.Tensor
    kv_cache: torch.Tensor  # context and new tokens written
    reference: list[ReferenceRequest]
    scale: float


def make_block_table(
    kv_lens: Sequence[int], block_size: int, spare_blocks: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """A shuffled block table with enough blocks for every request; returns (table, num_blocks)."""
    need = [-(-k // block_size) for k in kv_lens]
    num_blocks = sum(need) + spare_blocks
    ids = rng.permutation(num_blocks)
    width = max(need) + 1
    table = np.full((len(kv_lens), width), num_blocks - 1, dtype=np.int64)  # padding: a valid id
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = ids[at : at + n]
        at += n
    return table, num_blocks


def context_slots(block_row: np.ndarray, context_len: int, block_size: int) -> torch.Tensor:
    """int64 cache slots of a request's first ``context_len`` tokens through its block-table row."""
    linear = torch.arange(context_len)
    return torch.from_numpy(block_row)[linear // block_size] * block_size + linear % block_size


def nhd_cache(case: AttentionCase, device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """The case's KV (every context token and every new token) in FlashInfer's NHD layout
    ``[num_blocks, 2, block_size, Hkv, D]`` on ``device``; unwritten slots hold garbage."""

    spec = case.spec
    num_blocks = case.kv_cache.shape[0]
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(num_blocks, 2, spec.block_size, spec.num_kv_heads, spec.head_size, generator=gen)
    cache = cache.to(device=device, dtype=case.query.dtype)
    for b, req in enumerate(case.reference):
        ctx = req.context_key.shape[0]
        slots = context_slots(case.batch.block_table[b], ctx, spec.block_size).to(device)
        NHD_LAYOUT.write_kv(cache, req.context_key.to(device), req.context_value.to(device), slots)
    NHD_LAYOUT.write_kv(cache, case.key.to(device), case.value.to(device), case.meta.slot_mapping.to(device))
    return cache


def make_attention_case(spec: BatchSpec, dtype: torch.dtype, seed: int) -> AttentionCase:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    q_lens = [len(p) for p in spec.parents]
    kv_lens = [c + q for c, q in zip(spec.context_lens, q_lens)]
    table, num_blocks = make_block_table(kv_lens, spec.block_size, spec.spare_blocks, rng)
    batch = StepBatch(
        context_lens=np.array(spec.context_lens),
        query_lens=np.array(q_lens),
        parents=np.concatenate([np.array(p, dtype=np.int32) for p in spec.parents]),
        block_table=table,
        block_size=spec.block_size,
    )
    meta = build_tree_attention_metadata(batch)
    hq, hkv, d = spec.num_q_heads, spec.num_kv_heads, spec.head_size
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    cache = CPU_LAYOUT.allocate(num_blocks, spec.block_size, hkv, d, dtype)
    cache.copy_(randn(*cache.shape))  # garbage everywhere that is not written below
    n = sum(q_lens)
    query, key, value = randn(n, hq, d), randn(n, hkv, d), randn(n, hkv, d)
    CPU_LAYOUT.write_kv(cache, key, value, meta.slot_mapping)
    reference = []
    qo = meta.qo_indptr.tolist()
    for b, ctx in enumerate(spec.context_lens):
        ck, cv = randn(ctx, hkv, d), randn(ctx, hkv, d)
        CPU_LAYOUT.write_kv(cache, ck, cv, context_slots(table[b], ctx, spec.block_size))
        s, e = qo[b], qo[b + 1]
        reference.append(ReferenceRequest(query[s:e], ck, cv, key[s:e], value[s:e], spec.parents[b]))
    return AttentionCase(spec, meta, batch, query, key, value, cache, reference, scale=d**-0.5)

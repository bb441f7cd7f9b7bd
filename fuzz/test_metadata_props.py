"""The builder's layouts against their definitions and independent oracles."""

import numpy as np
import torch
from hypothesis import given

from metadata import MaskWorkspace, build_tree_attention_metadata
from metadata.masks import pack_segments
from tree_attn_backend.attention.reference import reference_depths, reference_tree_mask
from tree_attn_backend.ops.native import native_op

from .harness import make_attention_case
from .strategies import batch_specs


@given(spec=batch_specs(max_context=600))
def test_metadata_matches_definitions(spec):
    case = make_attention_case(spec, torch.float32, seed=0)
    meta, table, bs = case.meta, case.batch.block_table, spec.block_size
    qo = meta.qo_indptr.tolist()
    dense = meta.materialize()
    packed, mask_indptr = meta.packed_custom_mask.numpy(), meta.mask_indptr.numpy()
    tree_flat, tree_indptr = meta.tree_mask.numpy(), meta.tree_mask_indptr.numpy()
    for b, (ctx, parents) in enumerate(zip(spec.context_lens, spec.parents)):
        q = len(parents)
        expected = reference_tree_mask(parents, ctx)
        assert torch.equal(dense[b], expected)
        # Packed: np.packbits little-endian of the dense mask, at its byte offset.
        want = np.packbits(expected.numpy().ravel(), bitorder="little")
        assert np.array_equal(packed[mask_indptr[b] : mask_indptr[b + 1]], want)
        # Cascade: the [q, q] tail of the dense mask.
        assert np.array_equal(tree_flat[tree_indptr[b] : tree_indptr[b + 1]].reshape(q, q), expected[:, ctx:].numpy())
        # Positions = context + depth; slots = linear position through the block table.
        assert meta.positions[qo[b] : qo[b + 1]].tolist() == [ctx + d for d in reference_depths(parents)]
        linear = np.arange(ctx, ctx + q)
        assert meta.slot_mapping[qo[b] : qo[b + 1]].tolist() == (table[b, linear // bs] * bs + linear % bs).tolist()
        # Paged layout: the pages covering context + new tokens, and the context alone.
        for indptr, indices, last, length in (
            (meta.paged_kv_indptr, meta.paged_kv_indices, meta.paged_kv_last_page_len, ctx + q),
            (meta.prefix_kv_indptr, meta.prefix_kv_indices, meta.prefix_kv_last_page_len, ctx),
        ):
            pages = -(-length // bs)
            assert indices[indptr[b] : indptr[b + 1]].tolist() == table[b, :pages].tolist()
            assert int(last[b]) == (length - (pages - 1) * bs if pages else 0)
        assert bool(meta.is_chain[b]) == (list(parents) == list(range(-1, q - 1)))


@given(spec=batch_specs(max_context=300))
def test_native_masks_equal_numpy_fallback(spec):
    op = native_op("build_tree_masks")
    assert op is not None, "native ops are built by `make setup`"
    meta = make_attention_case(spec, torch.float32, seed=0).meta
    packed, indptr, tree_mask = op(meta.parents, meta.qo_indptr.to(torch.int64), meta.context_lens.to(torch.int64))
    assert np.array_equal(tree_mask.numpy(), meta._numpy_tree_mask())
    want, want_indptr = pack_segments(meta.custom_mask.numpy(), meta.mask_bit_indptr.numpy())
    assert np.array_equal(packed.numpy(), want)
    assert np.array_equal(indptr.numpy(), want_indptr)


@given(spec=batch_specs(max_context=300))
def test_native_token_layout_equals_numpy(spec):
    from metadata.builder import token_layout_numpy

    batch = make_attention_case(spec, torch.float32, seed=0).batch
    op = native_op("tree_token_layout")
    assert op is not None, "native ops are built by `make setup`"
    qo = np.concatenate([[0], np.cumsum(batch.query_lens)])
    native = op(
        torch.from_numpy(batch.parents),
        torch.from_numpy(qo),
        torch.from_numpy(batch.context_lens),
        torch.from_numpy(batch.block_table),
        batch.block_size,
    )
    for got, want in zip(native, token_layout_numpy(batch, qo)):
        assert got.dtype == torch.from_numpy(want).dtype
        assert np.array_equal(got.numpy(), want)


SHARED_WORKSPACE = MaskWorkspace()  # reused across examples: stale bytes would show up


@given(spec=batch_specs(max_context=300))
def test_workspace_reuse_gives_identical_masks(spec):
    batch = make_attention_case(spec, torch.float32, seed=0).batch
    fresh = build_tree_attention_metadata(batch)
    reused = build_tree_attention_metadata(batch, SHARED_WORKSPACE)
    assert torch.equal(reused.packed_custom_mask, fresh.packed_custom_mask)
    assert torch.equal(reused.mask_indptr, fresh.mask_indptr)
    assert torch.equal(reused.tree_mask, fresh.tree_mask)

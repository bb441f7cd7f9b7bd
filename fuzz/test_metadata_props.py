"""The builder's layouts against their definitions and independent oracles."""

import numpy as np
import torch
from hypothesis import given

from metadata.masks import pack_segments
from tree_attn_backend.native import native_op
from tree_attn_backend.reference import reference_depths, reference_tree_mask

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

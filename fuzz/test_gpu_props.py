"""The GPU verify path against its oracles, on a CUDA device (skipped without one).

- the CUDA mask helpers equal the builder's masks bit for bit;
- the CUDA KV compaction equals the torch slot copy;
- both FlashInfer modes equal the float64 reference (computed on the GPU) within bf16
  tolerance on mixed batches: decodes, prefill chunks, chains, random and pruned trees.

The FlashInfer modules are the bf16 / head_dim 128 ones the GPU bundle carries
(scripts/gpu_check.sh), so these properties fix that dtype and head size.
"""

from functools import cache

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tree_attn_backend.attention.gpu import cuda_ops
from tree_attn_backend.attention.kv_layout import NHD_LAYOUT
from tree_attn_backend.attention.reference import ReferenceRequest, reference_tree_attention

from .harness import make_attention_case, nhd_cache
from .strategies import FUZZ_BLOCK_SIZES, TOLERANCE, batch_specs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"


def _require_cuda_library() -> None:
    # Without the library the helpers fall back to their own oracles: that would prove nothing.
    assert cuda_ops.cuda_library() is not None, f"{cuda_ops.CUDA_LIBRARY_PATH} is not built"


@cache
def _attention(mode: str):  # one per mode: each owns a workspace
    from tree_attn_backend.attention.gpu.flashinfer_attention import FlashInferTreeAttention

    return FlashInferTreeAttention(DEVICE, mode)


@given(spec=batch_specs(), seed=st.integers(0, 2**31 - 1))
def test_cuda_masks_equal_builder_masks(spec, seed):
    _require_cuda_library()
    meta = make_attention_case(spec, torch.float32, seed).meta
    assert torch.equal(cuda_ops.tree_mask(meta, DEVICE).cpu(), meta.tree_mask)
    assert torch.equal(cuda_ops.custom_mask(meta, DEVICE).cpu(), meta.custom_mask)
    packed, byte_indptr = cuda_ops.packed_custom_mask(meta, DEVICE)
    assert torch.equal(packed.cpu(), meta.packed_custom_mask)
    assert torch.equal(byte_indptr, meta.mask_indptr)


@given(
    block_size=st.sampled_from(FUZZ_BLOCK_SIZES),
    num_blocks=st.integers(1, 40),
    layers=st.integers(1, 4),
    heads=st.sampled_from([1, 3, 8]),
    head_dim=st.sampled_from([7, 64, 128]),
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    data=st.data(),
)
def test_cuda_compaction_equals_torch_copy(block_size, num_blocks, layers, heads, head_dim, dtype, data):
    _require_cuda_library()
    slots = num_blocks * block_size
    moves = data.draw(st.integers(0, min(slots, 64)))
    dst = torch.tensor(
        data.draw(st.lists(st.integers(0, slots - 1), min_size=moves, max_size=moves, unique=True)), dtype=torch.int64
    )
    src = torch.tensor(
        data.draw(st.lists(st.integers(0, slots - 1), min_size=moves, max_size=moves)), dtype=torch.int64
    )
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    caches = [
        torch.randn(num_blocks, 2, block_size, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
        for _ in range(layers)
    ]
    expected = [c.clone() for c in caches]
    for expected_cache in expected:
        NHD_LAYOUT.copy_slots(expected_cache, src.to(DEVICE), dst.to(DEVICE))
    cuda_ops.compact_kv(caches, src, dst)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)


@given(
    spec=batch_specs(head_sizes=(128,)), seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["cascade", "full_mask"])
)
def test_flashinfer_modes_equal_reference(spec, seed, mode):
    case = make_attention_case(spec, torch.bfloat16, seed)
    cache = nhd_cache(case, DEVICE, seed)
    reference = reference_tree_attention(
        [
            ReferenceRequest(
                *(t.to(DEVICE) for t in (r.query, r.context_key, r.context_value, r.new_key, r.new_value)), r.parents
            )
            for r in case.reference
        ],
        case.scale,
    )
    attention = _attention(mode)
    attention.plan(
        case.meta,
        num_qo_heads=spec.num_q_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        dtype=torch.bfloat16,
        scale=case.scale,
    )
    out = attention.run(case.query.to(DEVICE), case.key.to(DEVICE), case.value.to(DEVICE), cache)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    error = (out.double() - reference).abs().max().item()
    assert error <= TOLERANCE[torch.bfloat16], f"{mode}: max error {error:.3g} on {spec}"

"""CPU path and cascade equal the dense float64 reference on fuzzed mixed batches."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tree_attn_backend.attention.cascade import cascade_attention
from tree_attn_backend.attention.cpu_attention import plan_cpu_attention, run_cpu_attention
from tree_attn_backend.attention.reference import reference_tree_attention

from .harness import make_attention_case
from .strategies import DTYPES, TOLERANCE, batch_specs


def _max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    return (out.double() - ref).abs().max().item()


@settings(max_examples=max(10, settings().max_examples // 2))
@given(
    spec=batch_specs(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    short_query_max=st.sampled_from([1, 16, 128]),
    max_group_keys=st.sampled_from([1, 1 << 12, 1 << 16]),
    use_native=st.booleans(),
)
def test_cpu_path_and_cascade_match_reference(spec, dtype, seed, short_query_max, max_group_keys, use_native):
    case = make_attention_case(spec, dtype, seed)
    ref = reference_tree_attention(case.reference, case.scale)
    plan = plan_cpu_attention(
        case.meta, short_query_max=short_query_max, max_group_keys=max_group_keys, use_native=use_native
    )
    cpu = run_cpu_attention(plan, case.query, case.kv_cache, case.scale)
    assert _max_error(cpu, ref) <= TOLERANCE[dtype]
    cascade = cascade_attention(case.meta, case.query, case.key, case.value, case.kv_cache, case.scale)
    assert _max_error(cascade, ref) <= TOLERANCE[dtype]


# Besides the usual sizes, ones whose blocks or heads are not a whole number of the op's vector
# tiles (8 or 16 float32 lanes, tiles of one or two vectors), so every remainder path runs.
NATIVE_HEAD_SIZES = (64, 72, 80, 128, 256)
NATIVE_BLOCK_SIZES = (4, 8, 16, 32, 128)


@given(
    spec=batch_specs(head_sizes=NATIVE_HEAD_SIZES, block_sizes=NATIVE_BLOCK_SIZES),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_native_tree_paged_attention_matches_reference(spec, dtype, seed):
    """The C++ op over every request (long chains included), against the float64 reference."""
    from tree_attn_backend.ops.native import native_op

    op = native_op("tree_paged_attention")
    assert op is not None, "csrc/ is not built: run `make setup`"
    case = make_attention_case(spec, dtype, seed)
    ref = reference_tree_attention(case.reference, case.scale)
    meta = case.meta
    out = torch.empty_like(case.query, dtype=case.kv_cache.dtype)
    op(
        case.query.to(case.kv_cache.dtype).contiguous(),
        case.kv_cache,
        *(
            t.to(torch.int32).contiguous()
            for t in (meta.qo_indptr, meta.context_lens, meta.parents, meta.paged_kv_indptr, meta.paged_kv_indices)
        ),
        case.scale,
        out,
    )
    assert _max_error(out, ref) <= TOLERANCE[dtype]

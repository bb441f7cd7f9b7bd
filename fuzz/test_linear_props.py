"""The small-batch linear op (``tree_pruned::packed_linear``) against a float64 product.

Properties over random shapes (rows 0-40, features and outputs 1-70: every tile shape,
partial column blocks and the row tiles' tails), with or without bias, rows strided apart or
not: the product matches ``x @ weight.T + bias`` in float64 within float32 rounding of a
K-term sum, and every row's output is bit for bit what that row gives alone (the op is
batch invariant, so a token verified in a tree gets the logits it gets decoded alone). Weights
that are bfloat16 values give the same bits stored as bfloat16 as stored as float32.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tree_attn_backend.ops.native import native_op
from tree_attn_backend.ops.packed_linear import SmallBatchLinear, holds_bfloat16_values, reference_linear


def _ops() -> tuple:
    pack, product = native_op("pack_linear_weight"), native_op("packed_linear")
    assert pack is not None and product is not None, "csrc/ is not built: run `make setup`"
    return pack, product


@settings(deadline=None, max_examples=150)
@given(
    rows=st.integers(0, 40),
    features=st.integers(1, 70),
    outputs=st.integers(1, 70),
    with_bias=st.booleans(),
    row_padding=st.sampled_from([0, 3]),
    bfloat16=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_linear_matches_a_float64_product_and_is_batch_invariant(
    rows, features, outputs, with_bias, row_padding, bfloat16, seed
):
    pack, product = _ops()
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs, features, generator=generator)
    if bfloat16:  # a bfloat16 checkpoint's weights, loaded as float32
        weight = weight.to(torch.bfloat16).float()
    bias = torch.randn(outputs, generator=generator) if with_bias else None
    x = torch.randn(rows, features + row_padding, generator=generator)[:, :features]  # strided rows
    packed = pack(weight, bfloat16)
    assert packed.dtype == (torch.bfloat16 if bfloat16 else torch.float32)
    out = product(x, packed, bias, outputs)
    if bfloat16:
        assert torch.equal(out, product(x, pack(weight, False), bias, outputs)), "bfloat16 storage changed the bits"
    assert out.shape == (rows, outputs) and out.dtype == torch.float32
    expected = reference_linear(x, weight, bias)
    # float32 rounding of a K-term sum of products: |error| <= K * eps * sum |x_k w_k| (+ bias)
    bound = features * 2**-23 * (x.double().abs() @ weight.double().abs().T) + 2**-23 * (
        0 if bias is None else bias.double().abs()
    )
    assert torch.all((out.double() - expected).abs() <= bound + 1e-30)
    for r in range(rows):
        assert torch.equal(product(x[r : r + 1], packed, bias, outputs), out[r : r + 1]), f"row {r} alone differs"


def test_small_batch_linear_runs_the_packed_op_up_to_max_rows_and_the_large_product_above():
    calls: list[int] = []

    def large_batch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(x.shape[0])
        return torch.nn.functional.linear(x, weight, bias)

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
    layer = SmallBatchLinear(weight, large_batch, max_rows=4)
    x = torch.randn(2, 3, 24, generator=generator)  # 6 rows in a [..., K] input
    for rows in (x[0], x[:1], x):
        out = layer(rows, weight, bias)
        assert out.shape == (*rows.shape[:-1], 40)
        torch.testing.assert_close(out, torch.nn.functional.linear(rows, weight, bias), rtol=1e-5, atol=1e-5)
    assert calls == [2], "3 and 3 rows run packed, 6 rows the large-batch product"
    assert torch.equal(layer(x[0], weight, bias), layer(x.reshape(6, 24), weight, bias)[:3])


def test_small_batch_linear_stores_bfloat16_values_as_bfloat16_and_others_as_float32():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 24, generator=generator)
    rounded = weight.to(torch.bfloat16).float()
    assert holds_bfloat16_values(rounded) and not holds_bfloat16_values(weight)
    nan = rounded.clone()
    nan[3, 4] = float("nan")
    assert not holds_bfloat16_values(nan)
    x = torch.randn(3, 24, generator=generator)
    for w, dtype in ((rounded, torch.bfloat16), (weight, torch.float32), (nan, torch.float32)):
        layer = SmallBatchLinear(w, torch.nn.functional.linear, max_rows=4)
        assert layer.packed.dtype == dtype
        out = layer(x, w, None)
        expected = reference_linear(x, w, None)
        assert torch.equal(out.isnan(), expected.isnan())
        finite = ~expected.isnan()
        torch.testing.assert_close(out[finite].double(), expected[finite], rtol=1e-5, atol=1e-5)

"""Linear layers for small batches on CPU: the native ``packed_linear`` op behind vLLM's call.

A verify step at low concurrency has a few rows (1 + draft tokens per request). vLLM's CPU
linear layers (oneDNN) pay each extra row's arithmetic on top of streaming the weights;
``tree_pruned::packed_linear`` (``csrc/packed_linear_cpu.cpp``) loads every weight vector once
for all the rows and overlaps the arithmetic with the stream, so a few more rows cost little.
Large batches (prefill, high concurrency) keep vLLM's own product, which blocks for them better.

A few rows are bound by streaming the weights. When every value of a float32 weight is a
bfloat16 value (a bfloat16 checkpoint loaded as float32, as vLLM loads SmolLM2 here), the packed
copy is stored as bfloat16 and widened back in registers: the same values and arithmetic, half
the bytes to stream (`tree-pruned bench linear`).

The op is exact in a stronger sense than the product it stands in for: a row's output does not
depend on the other rows of the call (each output is one fused multiply-add chain over the
input features in order) nor on how the weights are stored. Its oracle is a float64 matrix
product (``fuzz``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tree_attn_backend.ops.native import native_op

# vLLM's CPU linear callable: (x, weight, bias) -> x @ weight.T + bias.
LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# Rows up to which the packed product is used: it beats vLLM's oneDNN product by 9% at 17 rows
# and loses by 5% at 33 (SmolLM2-135M, float32, two threads; `tree-pruned bench linear`).
DEFAULT_MAX_ROWS = 16


def packed_linear_available() -> bool:
    """Whether the native ops are built (``make setup``); without them nothing is packed."""
    return native_op("packed_linear") is not None and native_op("pack_linear_weight") is not None


def holds_bfloat16_values(weight: torch.Tensor) -> bool:
    """Whether every value of a float32 ``weight`` is a bfloat16 value (so bfloat16 storage
    holds it exactly). NaN is not (it never compares equal)."""
    return bool(torch.equal(weight.to(torch.bfloat16).to(weight.dtype), weight))


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` in float64 (the oracle): x [..., K], weight [N, K], bias [N]."""
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


class SmallBatchLinear:
    """A linear layer's CPU product: the packed op for at most ``max_rows`` rows, else ``large_batch``.

    Holds its own packed copy of ``weight`` (float32 [N, K]; the copy holds its columns in pairs
    of blocks of ``lanes`` (16 with AVX-512, else 8), padded to a whole pair, bfloat16 when
    :func:`holds_bfloat16_values`, else float32; layout in ``csrc/packed_linear_cpu.cpp``), so
    the layer's weights are in memory twice: once for ``large_batch`` and once
    here (at half or the same size). Called as vLLM calls a layer's
    ``cpu_linear``: ``(x [..., K], weight, bias [N] or None) -> [..., N]``, float32; the
    ``weight`` argument is ignored (vLLM may have released it after packing its own copy).
    """

    def __init__(self, weight: torch.Tensor, large_batch: LinearFn, max_rows: int) -> None:
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise ValueError(f"SmallBatchLinear needs a 2-D float32 weight, got {weight.dtype} {tuple(weight.shape)}")
        if max_rows < 1:
            raise ValueError(f"SmallBatchLinear max_rows = {max_rows}: must be at least 1")
        pack = native_op("pack_linear_weight")
        product = native_op("packed_linear")
        if pack is None or product is None:
            raise RuntimeError("SmallBatchLinear needs the native ops (make setup); check packed_linear_available()")
        self.out_features, self.in_features = weight.shape
        self.packed: torch.Tensor = pack(weight.detach(), holds_bfloat16_values(weight))
        self._product = product
        self.large_batch = large_batch
        self.max_rows = max_rows

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > self.max_rows or x.dtype != torch.float32:
            return self.large_batch(x, weight, bias)
        out = self._product(rows, self.packed, bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)

"""``tree-pruned bench linear``: a model's linear layers at a few rows, vLLM's product vs the packed one.

A pass multiplies ``rows`` input rows through the linear layers of ``layers`` decoder layers
(fused q/k/v, o, fused gate/up, down) and the LM head, shaped as SmolLM2-135M by default, each
layer with its own random float32 weights so that a pass streams them from memory as an engine
step does (the cache holds a layer or two, not the model). The weights are bfloat16 values held
in float32, as a bfloat16 checkpoint's are when vLLM loads it as float32 (SmolLM2's). Three
products run the same passes: ``vllm``, vLLM's CPU product as its linear layers call it
(oneDNN, weights prepacked), and ``tree_pruned::packed_linear`` (``csrc/packed_linear_cpu.cpp``)
with the weights stored as float32 (``packed``) and as bfloat16 (``packed_bf16``, what the
TREE_PRUNED worker stores when every weight is a bfloat16 value). Each repetition
times every (rows, product) cell in a shuffled order, ``passes`` passes after one untimed; a
cell's figure is the median over repetitions of its per-repetition median, with the min-max.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

from tree_attn_backend.ops.native import native_op


@dataclass(frozen=True)
class ModelShape:
    """A decoder's linear layers: ``(out_features, in_features)`` per layer, and the LM head's."""

    hidden: int = 576
    kv_width: int = 192  # KV heads x head size
    intermediate: int = 1536
    vocab: int = 49152
    layers: int = 30

    def layer_weights(self) -> list[tuple[int, int]]:
        h = self.hidden
        return [(h + 2 * self.kv_width, h), (h, h), (2 * self.intermediate, h), (h, self.intermediate)]


Product = Callable[[torch.Tensor], torch.Tensor]


PRODUCTS = ("vllm", "packed", "packed_bf16")


def _products(shape: ModelShape) -> Iterator[tuple[int, dict[str, Product]]]:
    """Per weight of the model, in pass order: its in_features and its product per name of
    :data:`PRODUCTS`."""
    from vllm import _custom_ops as vllm_ops  # the product vLLM's CPU linear layers call

    pack, packed_linear = native_op("pack_linear_weight"), native_op("packed_linear")
    if pack is None or packed_linear is None:
        raise SystemExit("tree-pruned bench linear: the native ops are not built (make setup)")
    weights = [w for _ in range(shape.layers) for w in shape.layer_weights()] + [(shape.vocab, shape.hidden)]

    def _packed(packed: torch.Tensor, out_features: int, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, packed, None, out_features)

    for out_features, in_features in weights:
        weight = torch.randn(out_features, in_features).to(torch.bfloat16).float()
        handler = vllm_ops.create_onednn_mm(weight.t(), 32)
        yield (
            in_features,
            {
                "vllm": partial(vllm_ops.onednn_mm, handler, bias=None),
                "packed": partial(_packed, pack(weight, False), out_features),
                "packed_bf16": partial(_packed, pack(weight, True), out_features),
            },
        )


def run(
    shape: ModelShape, rows: tuple[int, ...], repeat: int, passes: int, progress: Callable[[], None] | None = None
) -> list[dict]:
    """One row per row count: ``{"rows"}``, per product of :data:`PRODUCTS` ``"<product>_ms"`` and
    ``"<product>_ms_range"`` (one pass through the whole model, milliseconds), and
    ``"packed_over_vllm"``, ``"packed_bf16_over_vllm"`` (ratios of the medians)."""
    layers = list(_products(shape))
    inputs = {(m, k): torch.randn(m, k) for m in rows for k in {k for k, _ in layers}}
    times: dict[tuple[int, str], list[float]] = {(m, name): [] for m in rows for name in PRODUCTS}
    for _ in range(repeat):
        cells = list(times)
        random.shuffle(cells)
        for m, name in cells:

            def one_pass(m: int = m, name: str = name) -> None:
                for in_features, products in layers:
                    products[name](inputs[m, in_features])

            one_pass()
            samples = []
            for _ in range(passes):
                start = time.perf_counter()
                one_pass()
                samples.append((time.perf_counter() - start) * 1e3)
            times[m, name].append(statistics.median(samples))
            if progress is not None:
                progress()
    table = []
    for m in rows:
        row: dict = {"rows": m}
        for name in PRODUCTS:
            samples = times[m, name]
            row[f"{name}_ms"] = round(statistics.median(samples), 2)
            row[f"{name}_ms_range"] = [round(min(samples), 2), round(max(samples), 2)]
        for name in PRODUCTS[1:]:
            row[f"{name}_over_vllm"] = round(statistics.median(times[m, name]) / statistics.median(times[m, "vllm"]), 3)
        table.append(row)
    return table

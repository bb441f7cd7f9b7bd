"""The native ops reject corrupt inputs before touching memory.

Valid inputs come from the fuzzed batches the other properties use; each test corrupts one
value (a parent, an indptr entry, a length, a page id, a dtype or layout) and requires a
``RuntimeError`` naming the op, the array, the bad index and its value. Covered: the CPU torch
ops (``torch.ops.tree_pruned.*``) and the host validator that guards the CUDA entry points
(:func:`tree_attn_backend.attention.gpu.cuda_ops.check_mask_inputs`), called here on CPU tensors.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metadata import StepBatch, TreeAttentionMetadata, build_tree_attention_metadata
from tree_attn_backend.attention.gpu import cuda_ops
from tree_attn_backend.ops.native import LIBRARY_PATH, native_op

from .harness import BatchSpec, make_block_table
from .strategies import batch_specs

# A call that has not returned after this long is taken for a hang (valid calls take
# milliseconds, rejected ones microseconds).
CALL_LIMIT_S = 20
# Per example: corrupt inputs are rejected in microseconds, valid small batches run in
# milliseconds; the slack is for a slow shared machine.
PER_EXAMPLE = settings(deadline=5000)
INT32_LIMIT = 2**31

small_batches = batch_specs(max_reqs=4, max_context=200, max_chunk=24, head_sizes=(8,))

_hangs: list[str] = []  # calls that never returned


def bounded(call: Callable[[], object], what: str) -> object:
    """``call()``, run in a daemon thread (the ops release the GIL) so that a hang fails the test
    after CALL_LIMIT_S instead of stalling the run. A stuck thread cannot be stopped: it spins
    until the process exits, and every later call fails at once, so that shrinking the failing
    example does not wait out the limit again and again."""
    if _hangs:
        pytest.fail(f"not run: {_hangs[0]}, so a thread is still stuck in native code")
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(CALL_LIMIT_S)
    if thread.is_alive():
        _hangs.append(f"{what} did not return within {CALL_LIMIT_S} s")
        pytest.fail(_hangs[-1])
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


@dataclass
class Inputs:
    """One valid step: its batch, the builder's metadata, and a query and cache to attend over
    (values are irrelevant here; shapes and the number of cache blocks matter)."""

    batch: StepBatch
    meta: TreeAttentionMetadata
    query: torch.Tensor  # float32 [N, Hq, D]
    kv_cache: torch.Tensor  # float32 [num_blocks, Hkv, block_size, 2 * D]


def make_inputs(spec: BatchSpec) -> Inputs:
    """The builder's view of ``spec`` (as :func:`harness.make_attention_case`, without the K/V)."""
    q_lens = [len(p) for p in spec.parents]
    kv_lens = [c + q for c, q in zip(spec.context_lens, q_lens)]
    table, num_blocks = make_block_table(kv_lens, spec.block_size, spec.spare_blocks, np.random.default_rng(0))
    batch = StepBatch(
        context_lens=np.array(spec.context_lens),
        query_lens=np.array(q_lens),
        parents=np.concatenate([np.array(p, dtype=np.int32) for p in spec.parents]),
        block_table=table,
        block_size=spec.block_size,
    )
    meta = build_tree_attention_metadata(batch)
    query = torch.zeros(sum(q_lens), spec.num_q_heads, spec.head_size)
    kv_cache = torch.zeros(num_blocks, spec.num_kv_heads, spec.block_size, 2 * spec.head_size)
    return Inputs(batch, meta, query, kv_cache)


@dataclass(frozen=True)
class Entry:
    """One entry point under test: its name (the one its errors start with), its integer
    arrays built fresh from valid inputs, and a call with (possibly corrupted) arrays."""

    name: str
    arrays: Callable[[Inputs], dict[str, torch.Tensor]]
    call: Callable[[Inputs, dict[str, torch.Tensor]], object]
    native: bool  # a C++ op (contiguity is checked) rather than the CUDA host validator


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).clone()


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).clone()


def _attention_arrays(x: Inputs) -> dict[str, torch.Tensor]:
    m = x.meta
    return {
        "qo_indptr": _i32(m.qo_indptr),
        "context_lens": _i32(m.context_lens),
        "parents": _i32(m.parents),
        "page_indptr": _i32(m.paged_kv_indptr),
        "page_indices": _i32(m.paged_kv_indices),
    }


def _attention(x: Inputs, a: dict[str, torch.Tensor]) -> object:
    out = torch.empty_like(x.query)
    return native_op("tree_paged_attention")(
        x.query,
        x.kv_cache,
        a["qo_indptr"],
        a["context_lens"],
        a["parents"],
        a["page_indptr"],
        a["page_indices"],
        1.0,
        out,
    )


def _mask_op_arrays(x: Inputs) -> dict[str, torch.Tensor]:
    m = x.meta
    return {"parents": _i32(m.parents), "qo_indptr": _i64(m.qo_indptr), "context_lens": _i64(m.context_lens)}


def _layout_arrays(x: Inputs) -> dict[str, torch.Tensor]:
    return {**_mask_op_arrays(x), "block_table": torch.from_numpy(x.batch.block_table.copy())}


def _cuda_arrays(with_context: bool, packed: bool) -> Callable[[Inputs], dict[str, torch.Tensor]]:
    """What cuda_ops passes to a mask entry point (the tree mask has no context)."""

    def arrays(x: Inputs) -> dict[str, torch.Tensor]:
        m = x.meta
        out = {
            "parents": _i32(m.parents),
            "qo_indptr": _i32(m.qo_indptr),
            "mask_indptr": _i64(m.mask_bit_indptr if with_context else m.tree_mask_indptr),
        }
        if with_context:
            out["context_lens"] = _i32(m.context_lens)
        if packed:
            out["byte_indptr"] = cuda_ops.packed_byte_indptr(m.mask_bit_indptr)
        return out

    return arrays


def _cuda_check(name: str) -> Callable[[Inputs, dict[str, torch.Tensor]], object]:
    return lambda x, a: cuda_ops.check_mask_inputs(name, **a)


ENTRIES = (
    Entry("tree_paged_attention", _attention_arrays, _attention, native=True),
    Entry(
        "build_tree_masks",
        _mask_op_arrays,
        lambda x, a: native_op("build_tree_masks")(a["parents"], a["qo_indptr"], a["context_lens"]),
        native=True,
    ),
    Entry(
        "tree_token_layout",
        _layout_arrays,
        lambda x, a: native_op("tree_token_layout")(
            a["parents"], a["qo_indptr"], a["context_lens"], a["block_table"], x.batch.block_size
        ),
        native=True,
    ),
    Entry("tree_pruned_tree_mask", _cuda_arrays(False, False), _cuda_check("tree_pruned_tree_mask"), native=False),
    Entry("tree_pruned_custom_mask", _cuda_arrays(True, False), _cuda_check("tree_pruned_custom_mask"), native=False),
    Entry(
        "tree_pruned_packed_custom_mask",
        _cuda_arrays(True, True),
        _cuda_check("tree_pruned_packed_custom_mask"),
        native=False,
    ),
)


def _with(entries: tuple[Entry, ...], array: str, x: Inputs) -> list[tuple[Entry, dict[str, torch.Tensor]]]:
    """The entries that take ``array``, each with its own fresh valid arrays."""
    return [(e, a) for e in entries if array in (a := e.arrays(x))]


def _rejects(entry: Entry, x: Inputs, arrays: dict[str, torch.Tensor], message: str) -> None:
    """``entry`` raises RuntimeError whose text contains ``"<entry name>: " + message``."""
    with pytest.raises(RuntimeError, match=re.escape(f"{entry.name}: {message}")):
        bounded(lambda: entry.call(x, arrays), entry.name)


def test_every_op_is_built():
    """Without the library the properties below would test nothing."""
    for name in (
        "tree_paged_attention",
        "build_tree_masks",
        "tree_token_layout",
        "top_k_probs",
        "pack_linear_weight",
        "packed_linear",
    ):
        assert native_op(name) is not None, f"{name}: run `python -m tree_attn_backend.ops.csrc_build cpu`"


def test_ops_run_on_torchs_openmp_threads():
    """``at::parallel_for`` in the ops is an OpenMP pragma: built without OpenMP they run on one
    thread. Built with it, they must use the OpenMP runtime torch loaded (one thread pool)."""
    assert native_op("tree_paged_attention") is not None
    needed = subprocess.run(["ldd", str(LIBRARY_PATH)], capture_output=True, text=True, check=True).stdout
    assert "libgomp.so.1" in needed, f"{LIBRARY_PATH} is not built with -fopenmp:\n{needed}"
    # Wheels may bundle private OpenMP copies under mangled names (sentencepiece does); the
    # soname the library asks for must map to one file, the one torch loaded.
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if line.rstrip().endswith("/libgomp.so.1")}
    assert len(runtimes) == 1, f"libgomp.so.1 is loaded from {sorted(runtimes)}"


@PER_EXAMPLE
@given(spec=small_batches)
def test_valid_inputs_pass_every_check(spec):
    """The checks accept whatever the builder produces (the other properties compare the
    results with their oracles)."""
    x = make_inputs(spec)
    for entry in ENTRIES:
        bounded(lambda: entry.call(x, entry.arrays(x)), entry.name)  # noqa: B023 (called before the loop moves on)


@PER_EXAMPLE
@given(spec=small_batches, data=st.data())
def test_corrupted_parent_is_rejected(spec, data):
    x = make_inputs(spec)
    qo = x.meta.qo_indptr.tolist()
    b = data.draw(st.integers(0, x.meta.num_reqs - 1), label="request")
    q = qo[b + 1] - qo[b]
    i = data.draw(st.integers(0, q - 1), label="node")
    if i == 0:  # the root's parent must be -1
        bad = data.draw(st.sampled_from([0, 1, q, -2, -(2**31)]))
        rule = "(must be -1 at the root)"
    else:  # a self-parent, a later node, a second root, below -1
        bad = data.draw(st.sampled_from([i, i + 1, q + 5, 2**31 - 1, -1, -2, -(2**31)]))
        rule = f"(must be in [0, {i}))"
    for entry, arrays in _with(ENTRIES, "parents", x):
        arrays["parents"][qo[b] + i] = bad
        _rejects(entry, x, arrays, f"request {b}: parents[{i}] = {bad} {rule}")


@PER_EXAMPLE
@given(spec=small_batches, data=st.data())
def test_corrupted_indptr_is_rejected(spec, data):
    x = make_inputs(spec)
    num_reqs = x.meta.num_reqs
    kind = data.draw(st.sampled_from(["start", "decrease", "end"]))
    k = 0 if kind == "start" else num_reqs if kind == "end" else data.draw(st.integers(1, num_reqs), label="k")
    for name in ("qo_indptr", "page_indptr", "mask_indptr", "byte_indptr"):
        for entry, arrays in _with(ENTRIES, name, x):
            indptr = arrays[name]
            if kind == "start":
                indptr[0] = data.draw(st.sampled_from([1, -1, int(indptr[-1])]))
            elif kind == "decrease":
                indptr[k] = indptr[k - 1] - data.draw(st.integers(1, 3))
            else:  # every segment is non-empty, so the end can move by one either way and stay sorted
                indptr[k] += data.draw(st.sampled_from([-1, 1, 1000]))
            _rejects(entry, x, arrays, f"{name}[{k}] = {int(indptr[k])} ")


@PER_EXAMPLE
@given(spec=small_batches, data=st.data())
def test_bad_context_length_is_rejected(spec, data):
    x = make_inputs(spec)
    b = data.draw(st.integers(0, x.meta.num_reqs - 1), label="request")
    for entry, arrays in _with(ENTRIES, "context_lens", x):
        if arrays["context_lens"].dtype == torch.int64 and data.draw(st.booleans()):
            bad, why = INT32_LIMIT + data.draw(st.integers(0, 2**40)), f">= the int32 limit {INT32_LIMIT}"
        else:
            bad, why = -data.draw(st.integers(1, 2**31)), "< 0"
        arrays["context_lens"][b] = bad
        _rejects(entry, x, arrays, f"context_lens[{b}] = {bad} {why}")


@PER_EXAMPLE
@given(spec=small_batches, data=st.data())
def test_context_beyond_its_pages_is_rejected(spec, data):
    """A context longer than the pages (or mask offsets) given for it would read past them."""
    x = make_inputs(spec)
    b = data.draw(st.integers(0, x.meta.num_reqs - 1), label="request")
    pages = int(x.meta.paged_kv_indptr[b + 1] - x.meta.paged_kv_indptr[b])
    q = int(x.meta.qo_indptr[b + 1] - x.meta.qo_indptr[b])
    bs = x.batch.block_size
    # Past the whole block-table row (which has spare columns), so past the request's pages too.
    ctx = x.batch.block_table.shape[1] * bs - q + data.draw(st.integers(1, 3 * bs))
    expected = {
        "tree_paged_attention": f"request {b} has {pages} pages of {bs} for {ctx + q} tokens",
        "tree_token_layout": f"block_table is too short for request {b}: context {ctx} + {q} new tokens",
        # the mask offsets no longer match q * (c + q): request b's end offset is the first wrong one
        "tree_pruned_custom_mask": f"mask_indptr[{b + 1}] = ",
        "tree_pruned_packed_custom_mask": f"mask_indptr[{b + 1}] = ",
    }
    for entry, arrays in _with(ENTRIES, "context_lens", x):
        if entry.name == "build_tree_masks":
            continue  # a mask has no pages: any context is fine
        arrays["context_lens"][b] = ctx
        _rejects(entry, x, arrays, expected[entry.name])


@PER_EXAMPLE
@given(spec=small_batches, data=st.data())
def test_page_id_out_of_range_is_rejected(spec, data):
    x = make_inputs(spec)
    num_blocks = x.kv_cache.shape[0]
    ((entry, arrays),) = _with(ENTRIES, "page_indices", x)
    pages = arrays["page_indices"]
    k = data.draw(st.integers(0, pages.numel() - 1), label="k")
    bad = data.draw(st.sampled_from([num_blocks, num_blocks + 7, 2**31 - 1, -1, -(2**31)]))
    pages[k] = bad
    _rejects(entry, x, arrays, f"page_indices[{k}] = {bad} " + (f">= num_blocks {num_blocks}" if bad > 0 else "< 0"))

    # tree_token_layout reads the block-table columns a request uses; they become int32 page ids.
    ((entry, arrays),) = _with(ENTRIES, "block_table", x)
    b = data.draw(st.integers(0, x.meta.num_reqs - 1), label="request")
    used = int(x.meta.paged_kv_indptr[b + 1] - x.meta.paged_kv_indptr[b])
    col = data.draw(st.integers(0, used - 1), label="column")
    bad = data.draw(st.sampled_from([-1, -(2**40), INT32_LIMIT, 2**62]))
    arrays["block_table"][b, col] = bad
    _rejects(entry, x, arrays, f"block_table[{b}, {col}] = {bad} " + (">= the int32 limit" if bad > 0 else "< 0"))


@PER_EXAMPLE
@given(spec=small_batches, data=st.data())
def test_wrong_dtype_or_layout_is_rejected(spec, data):
    x = make_inputs(spec)
    for entry in ENTRIES:
        arrays = entry.arrays(x)
        name = data.draw(st.sampled_from(sorted(arrays)), label=f"{entry.name} array")
        t = arrays[name]
        # The validator copies, so any strides do; a single element is contiguous whatever its stride.
        kinds = ["dtype", "dims"] + (["strided"] if entry.native and t.numel() > 1 else [])
        kind = data.draw(st.sampled_from(kinds), label="kind")
        if kind == "dtype":
            t = t.to(data.draw(st.sampled_from([d for d in (torch.int32, torch.int64, torch.float32) if d != t.dtype])))
        elif kind == "dims":
            t = t.unsqueeze(0)
        else:
            t = torch.stack([t, t], dim=-1)[..., 0]  # same values, stride 2
        arrays[name] = t
        _rejects(entry, x, arrays, f"{name} must be a")


@pytest.mark.skipif(cuda_ops.cuda_library() is None, reason="CUDA helpers not built (no nvcc)")
@PER_EXAMPLE
@given(spec=small_batches, data=st.data())
def test_cuda_wrappers_validate_before_any_launch(spec, data):
    """The wrappers run the validator on the metadata before touching the device: with no GPU
    (or with one) a corrupt parent or inconsistent lengths raise here, and nothing launches."""
    meta = make_inputs(spec).meta
    qo = meta.qo_indptr.tolist()
    b = data.draw(st.integers(0, meta.num_reqs - 1), label="request")
    i = data.draw(st.integers(0, qo[b + 1] - qo[b] - 1), label="node")
    parents = meta.parents.clone()
    parents[qo[b] + i] = i  # a self-parent (at the root: not -1)
    bad_tree = dataclasses.replace(meta, parents=parents)
    bad_kv = dataclasses.replace(meta, kv_lens=meta.kv_lens + 1)  # custom masks sized for another context
    for function, name in (
        (cuda_ops.tree_mask, "tree_pruned_tree_mask"),
        (cuda_ops.custom_mask, "tree_pruned_custom_mask"),
        (cuda_ops.packed_custom_mask, "tree_pruned_packed_custom_mask"),
    ):
        with pytest.raises(RuntimeError, match=re.escape(f"{name}: request {b}: parents[{i}] = {i} (must")):
            bounded(lambda: function(bad_tree, "cuda"), name)  # noqa: B023 (called before the loop moves on)
        if name != "tree_pruned_tree_mask":
            with pytest.raises(RuntimeError, match=re.escape(f"{name}: mask_indptr[1] = ")):
                bounded(lambda: function(bad_kv, "cuda"), name)  # noqa: B023 (called before the loop moves on)


@pytest.mark.parametrize(
    ("logits", "k", "message"),
    [
        (torch.zeros(2, 8, dtype=torch.float64), 2, "logits must be a 2-D float32 CPU tensor, got Double [2, 8]"),
        (torch.zeros(8), 2, "logits must be a 2-D float32 CPU tensor, got Float [8]"),
        (torch.zeros(8, 2).t(), 2, "logits rows must be contiguous, got strides [1, 2]"),
        (torch.zeros(2, 8), 0, "k = 0 (must be in [1, min(8 columns, 64)])"),
        (torch.zeros(2, 8), 9, "k = 9 (must be in [1, min(8 columns, 64)])"),
        (torch.zeros(2, 100), 65, "k = 65 (must be in [1, min(100 columns, 64)])"),
    ],
)
def test_top_k_probs_rejects_bad_logits_and_k(logits, k, message):
    """The recycle table's op reads rows by stride and writes k entries per row."""
    with pytest.raises(RuntimeError, match=re.escape(f"top_k_probs: {message}")):
        native_op("top_k_probs")(logits, k)


def test_packed_linear_rejects_inputs_that_do_not_fit_the_packed_weight():
    """The linear op reads K features per row and out_features columns of the packed blocks."""
    pack, product = native_op("pack_linear_weight"), native_op("packed_linear")
    packed = pack(torch.ones(20, 6), False)  # 20 outputs of 6 features
    pairs, _, _, lanes = packed.shape  # float32: [pairs, 2 blocks, K, lanes]
    not_bfloat16 = torch.ones(4, 6)
    not_bfloat16[2, 3] = 1.0 + 2**-10  # needs more than bfloat16's 8 significant bits
    cases = [
        (pack, (torch.ones(4, 6, dtype=torch.float64), False), "pack_linear_weight: weight must be a 2-D float32"),
        (pack, (torch.ones(0, 6), True), "pack_linear_weight: weight must not be empty, got [0, 6]"),
        (
            pack,
            (not_bfloat16, True),
            "pack_linear_weight: weight[2, 3] = 1.00098 is not a bfloat16 value; pack it as float32",
        ),
        (product, (torch.ones(2, 6), packed.half(), None, 20), "packed_linear: packed must be"),
        (product, (torch.ones(2, 6, dtype=torch.float64), packed, None, 20), "packed_linear: x must be a 2-D float32"),
        (product, (torch.ones(2, 5), packed, None, 20), "packed_linear: x has 5 features, the packed weight 6"),
        (product, (torch.ones(2, 6), packed.transpose(2, 3), None, 20), "packed_linear: packed must be"),
        (
            product,
            (torch.ones(2, 6), packed, None, pairs * 2 * lanes + 1),
            f"packed_linear: out_features = {pairs * 2 * lanes + 1} does not match the packed weight's {pairs} pairs",
        ),
        (product, (torch.ones(2, 6), packed, torch.ones(19), 20), "packed_linear: bias must be a contiguous float32"),
    ]
    for op, args, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            op(*args)

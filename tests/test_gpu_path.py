"""The parts of the GPU verify path that run without a GPU: the step split, sub-batch
metadata, the torch compaction oracle, argument checks, the nvcc build of the CUDA helpers
(a required check wherever nvcc exists) and the kernel benchmark's CPU grid."""

import ctypes
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz.strategies import request_parents
from metadata import StepBatch, build_tree_attention_metadata
from tree_attn_backend import cli
from tree_attn_backend.attention.gpu import cuda_ops
from tree_attn_backend.attention.gpu.flashinfer_attention import FlashInferTreeAttention, split_step
from tree_attn_backend.attention.kv_layout import NHD_LAYOUT
from tree_attn_backend.ops import csrc_build


def _batch(contexts, trees, block_size=4):
    q = [len(t) for t in trees]
    width = max(-(-(c + n) // block_size) for c, n in zip(contexts, q))
    table = np.arange(len(q) * width).reshape(len(q), width)[:, ::-1].copy()
    return StepBatch.from_requests(contexts, q, [np.array(t) for t in trees], table, block_size)


def test_split_step_routes_every_request_once():
    trees = [[-1], [-1, 0, 1, 2], [-1, 0, 0], [-1, 0, 0, 1], [-1]]
    meta = build_tree_attention_metadata(_batch([5, 9, 0, 12, 0], trees))
    cascade = split_step(meta, "cascade")
    assert cascade.decode.tolist() == [0, 4]
    assert cascade.causal.tolist() == [1]  # a chain draft is plain causal
    assert cascade.full_mask.tolist() == [2]  # a tree with no context has nothing to cascade over
    assert cascade.cascade.tolist() == [3]
    full = split_step(meta, "full_mask")
    assert full.full_mask.tolist() == [2, 3] and full.cascade.numel() == 0
    with pytest.raises(ValueError, match="'dense'"):
        split_step(meta, "dense")


@given(st.lists(request_parents(max_chunk=40), min_size=1, max_size=6), st.data())
def test_select_equals_the_sub_batch(trees, data):
    """Metadata of a subset of requests equals the builder's metadata of that sub-batch."""
    contexts = data.draw(st.lists(st.integers(0, 50), min_size=len(trees), max_size=len(trees)))
    batch = _batch(contexts, trees)
    chosen = data.draw(st.lists(st.integers(0, len(trees) - 1), unique=True))
    sub = build_tree_attention_metadata(batch).select(torch.tensor(chosen, dtype=torch.int64))
    want = (
        build_tree_attention_metadata(
            StepBatch(
                batch.context_lens[chosen],
                batch.query_lens[chosen],
                np.concatenate([np.array(trees[i], dtype=np.int32) for i in chosen] or [np.zeros(0, np.int32)]),
                batch.block_table[chosen],
                batch.block_size,
            )
        )
        if chosen
        else None
    )
    if want is None:
        assert sub.num_reqs == 0 and sub.num_tokens == 0
        return
    for name in (
        "qo_indptr",
        "context_lens",
        "kv_lens",
        "parents",
        "depths",
        "positions",
        "slot_mapping",
        "is_chain",
        "paged_kv_indptr",
        "paged_kv_indices",
        "paged_kv_last_page_len",
        "prefix_kv_indptr",
        "prefix_kv_indices",
        "prefix_kv_last_page_len",
    ):
        got, expected = getattr(sub, name), getattr(want, name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
    assert torch.equal(sub.custom_mask, want.custom_mask)


def test_copy_slots_reads_every_source_before_writing():
    """The accepted path [0, 2, 3] moves slot 2 -> 1 and 3 -> 2: slot 2 is both a destination
    and a source, so a copy in place would smear slot 3 into slot 1."""
    cache = torch.arange(2 * 2 * 4 * 1 * 2, dtype=torch.float32).view(2, 2, 4, 1, 2)
    every_slot = torch.arange(8)
    keys, values = NHD_LAYOUT.read_kv(cache, every_slot)
    cuda_ops.compact_kv([cache], torch.tensor([2, 3]), torch.tensor([1, 2]))  # CPU: the torch version
    new_keys, new_values = NHD_LAYOUT.read_kv(cache, every_slot)
    assert torch.equal(new_keys[1], keys[2]) and torch.equal(new_keys[2], keys[3])
    assert torch.equal(new_values[1], values[2]) and torch.equal(new_values[2], values[3])
    assert torch.equal(new_keys[[0, 3, 4, 5, 6, 7]], keys[[0, 3, 4, 5, 6, 7]])


def test_compaction_and_attention_reject_bad_arguments():
    cache = torch.zeros(2, 2, 4, 1, 2)
    with pytest.raises(ValueError, match=r"slots \[8\] must lie in \[0, 8\)"):
        cuda_ops.compact_kv([cache], torch.tensor([8]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"kv_caches\[1\]"):
        cuda_ops.compact_kv([cache, torch.zeros(3, 2, 4, 1, 2)], torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="expected"):
        cuda_ops.compact_kv([torch.zeros(2, 4, 1, 2)], torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="'sparse'"):
        FlashInferTreeAttention("cpu", "sparse")
    with pytest.raises(ValueError, match="device = cpu"):
        FlashInferTreeAttention("cpu")


def test_gencode_flags():
    assert csrc_build.gencode_flags("90a") == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert csrc_build.gencode_flags("80,90a")[0] == "-gencode=arch=compute_80,code=sm_80"
    with pytest.raises(ValueError, match="'sm90'"):
        csrc_build.gencode_flags("sm90")


@pytest.mark.skipif(csrc_build.find_nvcc() is None, reason="no nvcc on this machine")
def test_cuda_helpers_are_built_for_sm90a():
    """make setup compiles csrc/*.cu wherever nvcc exists; the library must hold sm_90a code,
    load without a GPU (static CUDA runtime, no torch) and export every entry point."""
    path = cuda_ops.CUDA_LIBRARY_PATH
    assert path.exists(), f"{path} missing: make setup should have built it"
    assert b"-arch sm_90a" in path.read_bytes()
    library = ctypes.CDLL(str(path))
    for name in (*cuda_ops._SIGNATURES, "tree_pruned_error_string"):
        assert hasattr(library, name), name


def test_bench_kernels_cpu_grid(capsys):
    assert (
        cli.main(
            ["bench", "kernels", "--json", "--device", "cpu", "--batches", "2", "--tree-nodes", "8", "--contexts", "40"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    (row,) = report["rows"]
    assert (row["device"], row["batch"], row["tree_nodes"], row["context"]) == ("cpu", 2, 8, 40)
    assert min(row["full_mask_us"], row["cascade_us"], row["causal_us"], row["plan_us"]) > 0
    assert row["cascade_vs_causal"] == pytest.approx(row["cascade_us"] / row["causal_us"])
    assert row["max_mode_diff"] < 3e-2  # both CPU modes are exact up to bf16 rounding
    assert report["targets"][0].startswith("[n/a]")

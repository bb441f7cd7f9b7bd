"""The builder's input errors name the bad value; the native library is built by set-up."""

import numpy as np
import pytest

from metadata import StepBatch, build_tree_attention_metadata
from tree_attn_backend.ops.native import native_op


def batch(**overrides):
    args = dict(
        context_lens=np.array([10, 0]),
        query_lens=np.array([3, 2]),
        parents=np.array([-1, 0, 0, -1, 0]),
        block_table=np.arange(8).reshape(2, 4),
        block_size=16,
    )
    args.update(overrides)
    return StepBatch(**args)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"context_lens": np.array([70, 0])},
            "block_table is too short for request 0: context 70 \\+ 3 new tokens need 5 blocks",
        ),
        ({"context_lens": np.array([10, -1])}, r"context_lens\[1\] = -1 is negative"),
        ({"query_lens": np.array([3, 0]), "parents": np.array([-1, 0, 0])}, r"query_lens\[1\] = 0"),
        ({"query_lens": np.array([2, 2])}, r"parents has shape \(5,\), expected \(4,\)"),
        ({"block_size": 24}, "block_size = 24 is not supported"),
        ({"block_size": 0}, "block_size = 0 is not supported"),
        ({"block_table": np.array([[0, 1, 2, 3], [-5, 1, 2, 3]])}, r"block_table\[1, 0\] = -5"),
        ({"block_table": np.arange(4)}, "block_table has shape"),
        ({"parents": np.array([-1, 0, 0, -1, 1.0])}, "parents must hold integers"),
        ({"parents": np.array([-1, 0, 0, 0, 0])}, r"request 1: parents\[0\] = 0"),
    ],
)
def test_bad_batches(overrides, message):
    with pytest.raises(ValueError, match=message):
        batch(**overrides)


def test_tree_size_must_match_query_length():
    with pytest.raises(ValueError, match=r"request 1: tree has 3 nodes but query_lens\[1\] = 2"):
        StepBatch.from_requests([10, 0], [3, 2], [None, np.array([-1, 0, 0])], np.arange(8).reshape(2, 4), 16)


def test_from_requests_treats_none_as_a_linear_chunk():
    b = StepBatch.from_requests([10, 0], [3, 2], [None, np.array([-1, 0])], np.arange(8).reshape(2, 4), 16)
    meta = build_tree_attention_metadata(b)
    assert meta.positions.tolist() == [10, 11, 12, 0, 1]
    assert meta.is_chain.tolist() == [True, True]


def test_native_library_is_built():
    assert native_op("build_tree_masks") is not None, "make setup builds csrc/ into tree_attn_backend/_C"

"""The paged KV layouts: the CPU one is what vLLM's CPU backend writes; both layouts behave
the same through the interface."""

import pytest
import torch

from tree_attn_backend.attention.kv_layout import CPU_LAYOUT, NHD_LAYOUT, PagedKVLayout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size, head_size", [(32, 64), (64, 128)])
def test_cpu_write_kv_matches_vllm_cpu_reshape_and_cache(dtype, block_size, head_size):
    ops = pytest.importorskip("vllm._custom_ops")
    gen = torch.Generator().manual_seed(0)
    blocks, heads, n = 5, 2, 70
    key = torch.randn(n, heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, heads, head_size, generator=gen).to(dtype)
    slots = torch.randperm(blocks * block_size, generator=gen)[:n]
    ours = CPU_LAYOUT.allocate(blocks, block_size, heads, head_size, dtype)
    CPU_LAYOUT.write_kv(ours, key, value, slots)
    theirs = CPU_LAYOUT.allocate(blocks, block_size, heads, head_size, dtype)
    k_cache, v_cache = theirs.view(blocks, heads, 2 * block_size, head_size).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, slots, "vec")
    assert torch.equal(ours, theirs)
    k, v = CPU_LAYOUT.read_kv(ours, slots)
    assert torch.equal(k, key) and torch.equal(v, value)


@pytest.mark.parametrize("layout", [CPU_LAYOUT, NHD_LAYOUT], ids=["cpu", "nhd"])
def test_layout_reads_blocks_and_copies_slots(layout: PagedKVLayout):
    heads, block_size, dim = 2, 16, 8
    cache = layout.allocate(4, block_size, heads, dim, torch.float32)
    key = torch.randn(64, heads, dim)
    layout.write_kv(cache, key, -key, torch.arange(64))
    k, v = layout.read_blocks(cache, torch.tensor([[2, 0], [1, 3]]))
    assert k.shape == (2, heads, 2 * block_size, dim)
    assert torch.equal(k[0], torch.cat([key[32:48], key[0:16]]).transpose(0, 1))
    assert torch.equal(k[1], torch.cat([key[16:32], key[48:64]]).transpose(0, 1))
    assert torch.equal(v, -k)
    layout.copy_slots(cache, torch.tensor([5, 6]), torch.tensor([4, 5]))  # overlapping moves
    assert torch.equal(layout.read_kv(cache, torch.tensor([4, 5, 6]))[0], key[[5, 6, 6]])
    with pytest.raises(ValueError, match="kv_cache has shape"):
        layout.write_kv(torch.zeros(3, 3), key, key, torch.arange(64))
    with pytest.raises(ValueError, match="do not fit cache"):
        layout.write_kv(cache, key[:, :1], key[:, :1], torch.arange(64))


def test_cpu_scores_view_is_the_transposed_key():
    cache = CPU_LAYOUT.allocate(3, 16, 2, 8, torch.float32)
    CPU_LAYOUT.write_kv(cache, torch.randn(48, 2, 8), torch.randn(48, 2, 8), torch.arange(48))
    blocks = torch.tensor([[2, 1]])
    key_t, value_t = CPU_LAYOUT.read_blocks_for_scores(cache, blocks)
    key, value = CPU_LAYOUT.read_blocks(cache, blocks)
    assert torch.equal(key_t.transpose(-1, -2), key) and torch.equal(value_t, value)

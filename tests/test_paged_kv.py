"""Our paged-cache layout is the one vLLM's CPU backend writes."""

import pytest
import torch

from tree_attn_backend.attention.paged_kv import allocate_kv_cache, copy_slots, read_blocks, read_kv, write_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size, head_size", [(32, 64), (64, 128)])
def test_write_kv_matches_vllm_cpu_reshape_and_cache(dtype, block_size, head_size):
    ops = pytest.importorskip("vllm._custom_ops")
    gen = torch.Generator().manual_seed(0)
    blocks, heads, n = 5, 2, 70
    key = torch.randn(n, heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n, heads, head_size, generator=gen).to(dtype)
    slots = torch.randperm(blocks * block_size, generator=gen)[:n]
    ours = allocate_kv_cache(blocks, heads, block_size, head_size, dtype)
    write_kv(ours, key, value, slots)
    theirs = allocate_kv_cache(blocks, heads, block_size, head_size, dtype)
    k_cache, v_cache = theirs.view(blocks, heads, 2 * block_size, head_size).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, slots, "vec")
    assert torch.equal(ours, theirs)
    k, v = read_kv(ours, slots)
    assert torch.equal(k, key) and torch.equal(v, value)


def test_read_blocks_and_copy_slots():
    cache = allocate_kv_cache(4, 1, 16, 64, torch.float32)
    key = torch.randn(64, 1, 64)
    write_kv(cache, key, -key, torch.arange(64))
    k, v = read_blocks(cache, torch.tensor([[2, 0]]))
    assert torch.equal(k[0, 0], torch.cat([key[32:48], key[0:16]])[:, 0])
    assert torch.equal(v[0, 0], -k[0, 0])
    copy_slots(cache, torch.tensor([5, 6]), torch.tensor([4, 5]))  # overlapping moves
    assert torch.equal(read_kv(cache, torch.tensor([4, 5]))[0], key[[5, 6]])
    with pytest.raises(ValueError, match="kv_cache has shape"):
        write_kv(torch.zeros(3, 3), key, key, torch.arange(64))

"""KV compaction moves exactly the accepted path into place and touches nothing else."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from tree_attn_backend.attention.kv_layout import CPU_LAYOUT
from tree_attn_backend.verification.kv_compaction import apply_compaction, compaction_moves

from .harness import make_attention_case
from .strategies import batch_specs


@given(spec=batch_specs(max_context=400, max_chunk=40), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_compaction_puts_path_in_order_and_preserves_everything_else(spec, seed, data):
    case = make_attention_case(spec, torch.float32, seed)
    # An accepted path per request: a random root-to-node path of its tree.
    paths = []
    for parents in spec.parents:
        node = data.draw(st.integers(0, len(parents) - 1))
        path = [node]
        while parents[path[-1]] != -1:
            path.append(parents[path[-1]])
        paths.append(path[::-1])
    width = max(len(p) for p in paths)
    accepted = torch.full((len(paths), width), -1, dtype=torch.int64)
    for b, path in enumerate(paths):
        accepted[b, : len(path)] = torch.tensor(path)
    table = torch.from_numpy(case.batch.block_table)
    src, dst = compaction_moves(accepted, case.meta.slot_mapping, case.meta.qo_indptr[:-1])

    caches = [case.kv_cache.clone(), case.kv_cache.clone()]
    before = case.kv_cache.clone()
    apply_compaction(caches, CPU_LAYOUT, src, dst)
    bs = spec.block_size
    for cache in caches:
        # Every slot that is not a destination keeps its bytes.
        changed = torch.zeros(before.shape[0] * bs, dtype=torch.bool)
        changed[dst] = True
        untouched = torch.nonzero(~changed).flatten()
        k0, v0 = CPU_LAYOUT.read_kv(before, untouched)
        k1, v1 = CPU_LAYOUT.read_kv(cache, untouched)
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
        # Path step k now holds node path[k]'s K/V at linear position ctx + k.
        for b, path in enumerate(paths):
            pos = torch.arange(len(path)) + spec.context_lens[b]
            slots = table[b, pos // bs] * bs + pos % bs
            qo = int(case.meta.qo_indptr[b])
            k, v = CPU_LAYOUT.read_kv(cache, slots)
            assert torch.equal(k, case.key[qo + torch.tensor(path)])
            assert torch.equal(v, case.value[qo + torch.tensor(path)])
    # Only nodes that really move appear.
    assert len(src) == sum(sum(1 for k, n in enumerate(p) if n != k) for p in paths)

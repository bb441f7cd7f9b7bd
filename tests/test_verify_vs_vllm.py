"""On chains, greedy tree verification gives exactly what vLLM's chain rejection sampler gives."""

import numpy as np
import pytest
import torch

from tree_attn_backend.drafting.tree import DraftTree, FlatTrees
from tree_attn_backend.verification.verify import verify_greedy


@pytest.fixture(scope="module")
def vllm_rejection_sample():
    from types import SimpleNamespace

    from vllm.platforms import current_platform
    from vllm.v1.sample.rejection_sampler import rejection_sample

    # In a vLLM worker this swaps the sampler's Triton kernels for their CPU ops.
    current_platform.register_triton_kernel_overrides()
    greedy = SimpleNamespace(all_greedy=True, all_random=False, temperature=None, generators={})

    def run(drafts: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        """``logits``: per request, rows for the root and every draft node (1 + D each)."""
        counts = [len(d) for d in drafts]
        rows = np.concatenate([[0], np.cumsum([c + 1 for c in counts])])
        target = torch.cat([logits[rows[i] : rows[i + 1] - 1] for i in range(len(drafts))])
        bonus = torch.stack([logits[rows[i + 1] - 1].argmax() for i in range(len(drafts))])[:, None]
        return rejection_sample(
            torch.tensor([t for d in drafts for t in d], dtype=torch.int64),
            counts,
            max(counts),
            torch.tensor(np.cumsum(counts), dtype=torch.int32),
            None,
            target,
            bonus,
            greedy,
        )

    return run


@pytest.mark.parametrize("seed", range(5))
def test_chain_greedy_equals_vllm_rejection_sampler(vllm_rejection_sample, seed):
    rng = np.random.default_rng(seed)
    vocab = 6  # small, so drafts often match the target's argmax
    drafts = [rng.integers(vocab, size=rng.integers(1, 8)).tolist() for _ in range(6)]
    trees = [DraftTree.chain([0] + d) for d in drafts]
    logits = torch.from_numpy(rng.normal(size=(sum(t.num_nodes for t in trees), vocab))).float()
    ours = verify_greedy(FlatTrees.from_trees(trees), logits).output_tokens
    theirs = vllm_rejection_sample(drafts, logits)
    for b in range(len(drafts)):
        got = ours[b][ours[b] >= 0].tolist()
        want = theirs[b][theirs[b] >= 0].tolist()
        assert got == want

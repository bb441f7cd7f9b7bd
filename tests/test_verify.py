"""Tree verification: a known answer, input errors, and statistical losslessness."""

import numpy as np
import pytest
import torch

from tree_attn_backend.drafting.tree import DraftTree, FlatTrees
from tree_attn_backend.verification.verify import verify_greedy, verify_sampling


def test_greedy_known_answer():
    # root 5 -> children 1 (node 1), 2 (node 2); node 1 -> child 3 (node 3)
    trees = FlatTrees.from_trees([DraftTree(np.array([-1, 0, 0, 1]), np.array([5, 1, 2, 3]), np.ones(4))])
    logits = torch.full((4, 8), -1.0)
    logits[0, 1] = logits[1, 3] = logits[3, 6] = logits[2, 0] = 1.0  # target says 1, 3, 6
    r = verify_greedy(trees, logits)
    assert r.accepted_nodes.tolist() == [[0, 1, 3]]
    assert r.num_accepted.tolist() == [2]
    assert r.bonus_tokens.tolist() == [6]
    assert r.output_tokens.tolist() == [[1, 3, 6]]


def test_bad_shapes_are_rejected():
    trees = FlatTrees.from_trees([DraftTree.chain([1, 2])])
    with pytest.raises(ValueError, match=r"target_logits has shape \(3, 8\), expected \[2, vocab\]"):
        verify_greedy(trees, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="token id 2 is outside the vocabulary"):
        verify_greedy(trees, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"uniforms has shape"):
        verify_sampling(trees, torch.ones(2, 8) / 8, uniforms=torch.zeros(3, 2))


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_tree_sampling_preserves_the_target_distribution(with_draft_probs):
    """Chi-square: the first two emitted tokens follow the target's joint distribution.

    Each trial's tree: two children of the root, one grandchild under each. With draft
    probabilities the children are drawn from the draft (without replacement), as recursive
    rejection sampling requires; without, they are fixed candidates (target-only mode).
    """
    vocab, trials = 4, 20000
    rng = np.random.default_rng(0)
    p0 = np.array([0.5, 0.1, 0.3, 0.1])  # target at the root
    p1 = rng.dirichlet(np.ones(vocab), size=vocab)  # target after first token x
    q0 = np.array([0.3, 0.2, 0.4, 0.1])
    q1 = rng.dirichlet(np.ones(vocab), size=vocab)
    if with_draft_probs:
        kids = np.array([rng.choice(vocab, 2, replace=False, p=q0) for _ in range(trials)])
        grandkids = np.array([[rng.choice(vocab, p=q1[k]) for k in row] for row in kids])
    else:
        kids = np.tile([0, 2], (trials, 1))
        grandkids = np.tile([1, 3], (trials, 1))
    tokens = np.concatenate([np.zeros((trials, 1), dtype=np.int64), kids, grandkids], axis=1)  # [trials, 5]
    flat = FlatTrees(
        qo_indptr=torch.arange(0, 5 * trials + 1, 5),
        parents=torch.tensor([-1, 0, 0, 1, 2]).repeat(trials),
        tokens=torch.from_numpy(tokens.ravel()),
    )
    # Node i's distributions: root p0/q0; children p1/q1 of their own token; grandchildren
    # are leaves (their draft distribution is never used).
    target = np.stack(
        [np.tile(p0, (trials, 1)), p1[kids[:, 0]], p1[kids[:, 1]], p1[grandkids[:, 0]], p1[grandkids[:, 1]]], 1
    )
    draft = np.stack(
        [np.tile(q0, (trials, 1)), q1[kids[:, 0]], q1[kids[:, 1]], q1[grandkids[:, 0]], q1[grandkids[:, 1]]], 1
    )
    r = verify_sampling(
        flat,
        torch.from_numpy(target.reshape(-1, vocab)),
        torch.from_numpy(draft.reshape(-1, vocab)) if with_draft_probs else None,
        generator=torch.Generator().manual_seed(1),
    )
    out = r.output_tokens.numpy()
    first, second = out[:, 0], out[:, 1]
    assert chi_square(np.bincount(first, minlength=vocab), p0 * trials) < CHI2_3DOF_P001
    # The second token, when the first came from the tree, must follow p1[first].
    for a in range(vocab):
        sel = second >= 0
        sel &= first == a
        if sel.sum() > 500:
            counts = np.bincount(second[sel], minlength=vocab)
            assert chi_square(counts, p1[a] * sel.sum()) < CHI2_3DOF_P001


CHI2_3DOF_P001 = 16.27  # chi-square critical value, 3 degrees of freedom, p = 0.001


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())

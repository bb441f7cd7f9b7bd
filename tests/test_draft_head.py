"""The draft head: its children against a torch oracle, saving, fitting, the training examples
of an answer, and the proposer putting its children under the hybrid drafter's roots."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tree_attn_backend.drafting.draft_head import (
    BUNDLED_HEADS_DIR,
    PROBE_TOKENS,
    DraftHead,
    HeadRootDrafter,
    bundled_head_for,
    fit_draft_head,
)


def _random_head(hidden: int = 8, vocab: int = 20, seed: int = 0) -> DraftHead:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(100, generator=g)[:vocab]
    return DraftHead(
        torch.randn(hidden, 2 * hidden, generator=g),
        torch.randn(hidden, generator=g),
        torch.randn(vocab, hidden, generator=g),
        ids,
        torch.randn(PROBE_TOKENS, hidden, generator=g),
    )


def test_children_are_the_softmax_top_k_most_likely_first():
    head = _random_head()
    hidden, roots = torch.randn(5, 8), torch.randn(5, 8)
    tokens, probs = head.top_children(hidden, roots, 4)
    # Oracle: the formula in float64 with torch's own ops.
    h, e = hidden.double(), roots.double()
    z = h + torch.nn.functional.silu(torch.cat([h, e], -1) @ head.fc_weight.double().T + head.fc_bias.double())
    expected = torch.softmax(z @ head.out_weight.double().T, -1)
    top_probs, top = expected.topk(4, -1)
    assert (tokens == head.vocab[top].numpy()).all()
    np.testing.assert_allclose(probs, top_probs.numpy(), rtol=1e-4, atol=1e-6)
    assert (np.diff(probs, axis=1) <= 0).all()
    assert head.top_children(hidden, roots, 80)[0].shape == (5, 20)  # above the native op's k: torch
    assert head.top_children(hidden, roots, 50)[0].shape == (5, 20)  # at most the head's vocabulary


def test_a_saved_head_loads_and_a_bad_one_is_named(tmp_path):
    head = _random_head()
    head.save(tmp_path / "head.safetensors")
    loaded = DraftHead.load(tmp_path / "head.safetensors")
    # Stored in bfloat16 (the layer and the output rows), loaded as float32.
    assert loaded.fc_weight.dtype == torch.float32
    torch.testing.assert_close(loaded.out_weight, head.out_weight.to(torch.bfloat16).to(torch.float32))
    assert (loaded.vocab == head.vocab).all() and (loaded.model_probe == head.model_probe).all()
    from safetensors.torch import save_file

    save_file({"fc_weight": head.fc_weight}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other.safetensors: not a draft head \(no tensor"):
        DraftHead.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="fc_weight \\[D, 2D\\]"):
        DraftHead(head.fc_weight[:, :8], head.fc_bias, head.out_weight, head.vocab, head.model_probe)
    with pytest.raises(ValueError, match="model_probe \\[P, D\\]"):
        DraftHead(head.fc_weight, head.fc_bias, head.out_weight, head.vocab, head.model_probe[:, :4])
    with pytest.raises(ValueError, match="token id twice"):
        DraftHead(head.fc_weight, head.fc_bias, head.out_weight[:2], torch.tensor([3, 3]), head.model_probe)


def test_fitting_learns_the_token_after_the_root():
    # The next token is a function of the root (here root + 1): the head must read the root's
    # embedding, which the untrained head (the output embedding alone) cannot.
    g = torch.Generator().manual_seed(0)
    vocab, hidden = 30, 16
    embedding = torch.randn(vocab, hidden, generator=g)
    roots = torch.randint(0, vocab - 1, (3000,), generator=g)
    states = 0.1 * torch.randn(3000, hidden, generator=g)  # the root, not the state, decides here
    head = fit_draft_head(
        states, embedding[roots], roots + 1, embedding, embedding, vocab_size=vocab, epochs=20, seed=0
    )
    test_roots = torch.randint(0, vocab - 1, (200,), generator=g)
    tokens, _ = head.top_children(0.1 * torch.randn(200, hidden, generator=g), embedding[test_roots], 1)
    assert (torch.from_numpy(tokens[:, 0]) == test_roots + 1).float().mean() > 0.9
    assert head.vocab.numel() == vocab - 1  # the tokens that ever came next, most frequent first
    assert head.fits(lambda ids: embedding[ids], hidden) and not head.fits(lambda ids: embedding[ids + 1], hidden)
    assert not head.fits(lambda ids: embedding[ids], hidden + 1)
    with pytest.raises(ValueError, match="do not match"):
        fit_draft_head(states, embedding[roots][:10], roots + 1, embedding, embedding)


def test_head_children_are_proposed_at_the_root_only():
    drafter = HeadRootDrafter(3, [7, 8, 9], [0.5, 0.2, 0.0])
    assert drafter.propose_children([1, 2, 3], 3) == [(7, 0.5), (8, 0.2)]  # a zero is no candidate
    assert drafter.propose_children([1, 2, 3], 1) == [(7, 0.5)]
    assert drafter.propose_children([1, 2, 3, 7], 3) == []


def test_examples_of_an_answer_pair_each_state_with_the_token_after_its_root():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tree_attn_backend.train_head import head_examples

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    target = LlamaForCausalLM(config).eval()
    prompt, answer = [1, 2, 3, 4], [5, 6, 7, 8, 9]
    examples = head_examples(target, prompt, answer)
    # Positions 3..6 (the prompt's last token up to the answer's third-last): root x[t+1], next x[t+2].
    assert examples.next_tokens.tolist() == [6, 7, 8, 9]
    with torch.no_grad():
        full = target(torch.tensor([prompt + answer]), output_hidden_states=True)
        expected_roots = target.get_input_embeddings()(torch.tensor([5, 6, 7, 8]))
    torch.testing.assert_close(examples.hidden, full.hidden_states[-1][0, 3:7])
    torch.testing.assert_close(examples.root_embedding, expected_roots)


def test_the_proposer_grows_the_heads_children_under_every_hybrid_root(tmp_path):
    from tree_attn_backend.vllm_plugin.verification_kind import Verification

    embedding = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    # A confident head: its out rows are the embedding of tokens 20..29, scaled, so the head's
    # favourite after a root is the token whose row best matches the root's state.
    head = DraftHead(
        torch.zeros(8, 16), torch.zeros(8), 20.0 * embedding[20:30], torch.arange(20, 30), embedding[:PROBE_TOKENS]
    )
    head.save(tmp_path / "head.safetensors")
    proposer = _tiny_proposer({"draft_head": str(tmp_path / "head.safetensors"), "batch_budget": False})
    proposer.attach_model(lambda ids: embedding[ids], 8)
    drafting = proposer.drafting_for(proposer.config, Verification.TREE)
    hidden = torch.randn(2, 8, generator=torch.Generator().manual_seed(2))
    proposer.bind_batch(["a", "b"], [drafting, drafting], [2, 2], leaf_hidden=hidden)
    tokens = np.array([[1, 2, 3], [4, 5, 6]])
    proposer.propose([[3], [6]], np.array([3, 3]), tokens)
    expected, _ = head.top_children(hidden, embedding[torch.tensor([3, 6])], 1)
    for req, best in zip(("a", "b"), expected[:, 0]):
        tree = proposer.trees[req]
        assert int(best) in tree.tokens[tree.parents == 0].tolist()
    # Without the runner's hidden states the head is silent (the other sources still draft).
    proposer.bind_batch(["a"], [drafting], [2])
    proposer.propose([[3]], np.array([3]), tokens[:1])
    assert proposer.trees.get("a") is None or not set(proposer.trees["a"].tokens[1:].tolist()) & set(range(20, 30))


def _tiny_proposer(options: dict):
    """A proposer for a model of 32 tokens."""
    from tree_attn_backend.vllm_plugin.proposer import TreeProposer

    return TreeProposer(
        SimpleNamespace(
            additional_config={"tree_pruned": options},
            speculative_config=SimpleNamespace(num_speculative_tokens=8),
            model_config=SimpleNamespace(get_vocab_size=lambda: 32),
        )
    )


def test_a_missing_head_file_or_a_head_for_another_model_is_named(tmp_path):
    from tree_attn_backend.vllm_plugin.config import TreePrunedConfig

    with pytest.raises(ValueError, match="draft_head = '/no/such/head.safetensors': must be \"auto\", the path of"):
        TreePrunedConfig(draft_head="/no/such/head.safetensors")
    _random_head().save(tmp_path / "head.safetensors")
    proposer = _tiny_proposer({"draft_head": str(tmp_path / "head.safetensors")})
    with pytest.raises(ValueError, match="head.safetensors'.*trained for another model"):
        proposer.attach_model(lambda ids: torch.randn(len(ids), 8), 8)
    # "auto" finds no shipped head for this model, and serves without one.
    proposer = _tiny_proposer({})
    proposer.attach_model(lambda ids: torch.randn(len(ids), 8), 8)
    assert proposer.head is None


def test_the_shipped_head_fits_the_default_model_only():
    from safetensors import safe_open

    from tree_attn_backend.default_model import default_model_dir

    (weights,) = sorted(default_model_dir().glob("*.safetensors"))
    with safe_open(str(weights), "pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
    found = bundled_head_for(lambda ids: embedding[ids], embedding.shape[1])
    assert found is not None and found[0].parent == BUNDLED_HEADS_DIR
    assert bundled_head_for(lambda ids: embedding[ids + 1], embedding.shape[1]) is None


def test_train_head_fits_the_default_model_and_scores_held_out_answers(tmp_path):
    from tree_attn_backend.bench.e2e import DEFAULT_PROMPTS, load_prompts
    from tree_attn_backend.default_model import default_model_dir
    from tree_attn_backend.train_head import train_head

    prompts = load_prompts(DEFAULT_PROMPTS)[:4]
    # Answers given (the engine's greedy answers come from the e2e runner, tested there).
    answers = [[504, 2365, 314, 253, 1345, 30], [21, 2], [9], [1070, 282, 260, 1230]]
    report = train_head(
        str(default_model_dir()),
        prompts,
        tmp_path / "head.safetensors",
        vocab_size=8,
        epochs=2,
        holdout=2,
        answers=answers,
    )
    # Prompts 0 and 2 are held out; 2's single token gives no example (none has two tokens after it).
    assert report == {
        "train_examples": 1 + 3,
        "vocab": 4,
        "held_out_examples": 5,
        **{k: report[k] for k in ("top1", "top3")},
    }
    assert 0.0 <= report["top1"] <= report["top3"] <= 1.0
    head = DraftHead.load(tmp_path / "head.safetensors")
    assert head.hidden_size == 576 and sorted(head.vocab.tolist()) == sorted({2, 282, 260, 1230})
    with pytest.raises(ValueError, match="3 answers for 4 prompts"):
        train_head(str(default_model_dir()), prompts, tmp_path / "x.safetensors", answers=answers[:3])

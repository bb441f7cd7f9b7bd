"""``tree-pruned train-head``: a draft head fitted to the target model's own greedy answers.

1. The target answers every prompt greedily (stock vLLM, the e2e benchmark's engine runner,
   ``max_tokens`` each).
2. transformers reads prompt + answer once in float32 and gives the final hidden state ``h_t``
   (the LM head's input) at every position; checked against the model's own logits.
3. Every answer position ``t`` is an example: ``(h_t, e(x_{t+1})) -> x_{t+2}``, where ``x_{t+1}``
   is the target's greedy choice at ``t`` (the next tree's root) and ``e`` its input embedding
   (:func:`~tree_attn_backend.drafting.draft_head.fit_draft_head`).

Every ``holdout``-th prompt is kept out of the fit and scored: how often the head's best (and
best three) children of the root hold the target's next token. The head serves with
``--additional-config '{"tree_pruned": {"draft_head": "FILE"}}'``; train it on prompts like
the ones it will serve, and measure it on others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tree_attn_backend.drafting.draft_head import DraftHead, fit_draft_head


@dataclass(frozen=True)
class HeadExamples:
    """``N`` training examples: float32 ``[N, D]`` hidden states and root embeddings, int64
    ``[N]`` the token after each root."""

    hidden: torch.Tensor
    root_embedding: torch.Tensor
    next_tokens: torch.Tensor

    @classmethod
    def concat(cls, parts: Sequence[HeadExamples]) -> HeadExamples:
        return cls(
            *(torch.cat([getattr(p, name) for p in parts]) for name in ("hidden", "root_embedding", "next_tokens"))
        )


def greedy_answers(model: str, prompts: list[dict], max_tokens: int) -> list[list[int]]:
    """The stock engine's greedy answer (token ids) to every prompt's first turn, in order."""
    from tree_attn_backend.bench import e2e

    config = e2e.E2EConfig(
        model=model, prompts=tuple(prompts), modes=("none",), concurrency=(16,), max_tokens=max_tokens
    )
    (run,) = e2e.run_engines(config, e2e.tokenize_prompts(config))
    answers = {r["index"]: r["tokens"] for r in run["requests"] if r["turn"] == 1}
    return [answers[i] for i in range(len(prompts))]


def head_examples(target: Any, prompt: list[int], answer: list[int]) -> HeadExamples:
    """The examples of one answer: positions ``len(prompt) - 1`` to ``len(prompt) + len(answer) - 3``
    (each needs the two tokens after it). ``target``: a transformers causal LM in float32."""
    tokens = torch.tensor(prompt + answer, dtype=torch.int64)
    with torch.no_grad():
        out = target(tokens[None], output_hidden_states=True)
        hidden = out.hidden_states[-1][0]
        # The head reads what the LM head reads; a model whose last hidden state is not that
        # (a final norm outside the returned states) would train a head on the wrong input.
        if not torch.allclose(target.get_output_embeddings()(hidden[-1:]), out.logits[0, -1:], atol=1e-3, rtol=1e-3):
            raise RuntimeError("the model's last hidden state is not its LM head's input: cannot train a head on it")
        start, end = len(prompt) - 1, len(tokens) - 2
        roots = tokens[start + 1 : end + 1]
        return HeadExamples(
            hidden[start:end].clone(),
            target.get_input_embeddings()(roots).to(torch.float32),
            tokens[start + 2 : end + 2].clone(),
        )


def top_k_hits(head: DraftHead, examples: HeadExamples, ks: Sequence[int] = (1, 3)) -> dict[str, float]:
    """Per ``k``, the share of examples whose next token is among the head's ``k`` best children."""
    tokens, _ = head.top_children(examples.hidden, examples.root_embedding, max(ks))
    hits = torch.from_numpy(tokens) == examples.next_tokens[:, None]
    return {f"top{k}": round(float(hits[:, :k].any(dim=1).float().mean()), 4) for k in ks}


def train_head(
    model: str,
    prompts: list[dict],
    out: str | Path,
    max_tokens: int = 256,
    vocab_size: int = 4096,
    epochs: int = 3,
    holdout: int = 6,
    answers: list[list[int]] | None = None,
) -> dict:
    """Fit a head to ``model``'s greedy answers to ``prompts`` (``answers``: given instead of
    generated) and save it to ``out``; returns the examples counted and the held-out hit rates
    (every ``holdout``-th prompt; 0: none held out)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tree_attn_backend.bench.e2e import chat_token_ids

    if holdout < 0 or holdout == 1:
        raise ValueError(f"holdout = {holdout}: must be 0 (none) or >= 2")
    if answers is None:
        answers = greedy_answers(model, prompts, max_tokens)
    if len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    tokenizer = AutoTokenizer.from_pretrained(model)
    target = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    train: list[HeadExamples] = []
    held: list[HeadExamples] = []
    for i, (prompt, answer) in enumerate(tqdm(list(zip(prompts, answers)), desc="hidden states", unit="answer")):
        if len(answer) < 2:
            continue  # no position with two tokens after it
        examples = head_examples(target, chat_token_ids(tokenizer, prompt["messages"]), list(answer))
        (held if holdout and i % holdout == 0 else train).append(examples)
    if not train:
        raise ValueError("no answer of two or more tokens to train on")
    data = HeadExamples.concat(train)
    head = fit_draft_head(
        data.hidden,
        data.root_embedding,
        data.next_tokens,
        target.get_output_embeddings().weight.detach(),
        target.get_input_embeddings().weight.detach(),
        vocab_size=vocab_size,
        epochs=epochs,
    )
    head.save(out)
    report: dict = {"train_examples": int(data.next_tokens.numel()), "vocab": int(head.vocab.numel())}
    if held:
        held_data = HeadExamples.concat(held)
        report |= {"held_out_examples": int(held_data.next_tokens.numel()), **top_k_hits(head, held_data)}
    return report

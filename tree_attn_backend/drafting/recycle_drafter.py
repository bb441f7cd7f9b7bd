"""Token Recycling: the target's own next-token candidates, kept from earlier verify passes.

Every verify pass computes the target's next-token distribution at every tree node (and at
the last token of every decoding request). :class:`RecycleTable` keeps, per token id, the
``k`` most likely next tokens and their probabilities from the latest pass in which that token
was a node: an adjacency list of the target's recent beliefs, shared by all requests (Luo et
al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models with Token
Recycling", 2024). As a drafter it proposes a node's children from the node's own token alone;
the probabilities are the target's, taken in another context, so they are calibrated against
what the target accepts like any drafter's.

Memory is bounded and allocated once: ``vocab_size x k`` int32 token ids and float32
probabilities (3 MiB for a 49,152-token vocabulary and ``k = 8``), whatever the number of
requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tree_attn_backend.drafting.drafter import as_sub_distribution
from tree_attn_backend.ops.top_k import top_k_softmax


class RecycleTable:
    """The latest top-``k`` next tokens of every token id (empty rows: never seen)."""

    def __init__(self, vocab_size: int, k: int = 8) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size = {vocab_size!r}: must be an integer >= 1")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(64, vocab_size):
            raise ValueError(f"k = {k!r}: must be an integer in [1, min(64, vocab_size = {vocab_size})]")
        self.vocab_size, self.k = vocab_size, k
        self.next_tokens = np.zeros((vocab_size, k), dtype=np.int32)
        self.next_probs = np.zeros((vocab_size, k), dtype=np.float32)  # 0: no candidate

    def reset(self) -> None:
        """Forget every recorded distribution."""
        self.next_probs.fill(0.0)

    def record(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Remember the target's next-token distribution after each of ``tokens``.

        Args:
            tokens: int ``[N]`` the token at each position.
            logits: float ``[N, V]`` the target's logits at those positions (``V >= k``;
                columns at or above ``vocab_size``, padding, are never proposed).
        """
        if logits.dim() != 2 or tokens.shape != (logits.shape[0],):
            raise ValueError(f"tokens {tuple(tokens.shape)} and logits {tuple(logits.shape)} do not match")
        if tokens.numel() == 0:
            return
        logits = logits[:, : self.vocab_size].to(torch.float32)
        # Every step records (a stock decode step included): the native top-k costs about what
        # logsumexp alone does, a few times less than torch.topk + logsumexp on a 49k vocabulary.
        probs, top_ids = top_k_softmax(logits, self.k)
        rows = tokens.to(torch.int64).numpy()
        keep = (rows >= 0) & (rows < self.vocab_size)
        # With a token at several positions, numpy keeps one of them: any is a recent belief.
        self.next_tokens[rows[keep]] = top_ids.numpy()[keep]
        self.next_probs[rows[keep]] = probs.numpy()[keep]

    def propose_children(self, context: Sequence[int], num_children: int) -> list[tuple[int, float]]:
        """The recorded candidates after the context's last token, most likely first."""
        token = int(context[-1])
        if not 0 <= token < self.vocab_size:
            return []
        # Stored as float32 (half the table): a peaked row's sum can round a few ulps above 1.
        probs = as_sub_distribution(self.next_probs[token, :num_children])
        seen = int(np.count_nonzero(probs))
        return [(int(t), float(p)) for t, p in zip(self.next_tokens[token, :seen], probs[:seen])]

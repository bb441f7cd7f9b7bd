"""A lookup drafter: continuation statistics of the request's own prompt and output.

For every n-gram length ``min_n..max_n`` the index counts which token followed each n-gram
so far. A node's children are the continuations of the longest suffix of its context that
was seen before, most frequent first, with probability ``count / (total + s_n)``. The
smoothing ``s_n = smoothing / 2 ** (n - 1)`` halves with every token of the matched context,
because a longer match predicts better: with the default 2, a continuation seen once after one
matching token gets 1/3, after four matching tokens 0.8. (Replayed over the tuning prompts'
greedy continuations, this ranks drafts better than one smoothing for every length: 5-9% more
accepted tokens for the same number of drafts.) Repetitive text
(summaries, RAG answers quoting their input) gives confident, deep drafts; varied text gives
wider, shallower ones; an unseen context gives no draft at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


class LookupIndex:
    """The n-gram continuation counts of one request's token sequence (grown incrementally)."""

    def __init__(self, min_n: int = 1, max_n: int = 4, smoothing: float = 2.0) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram lengths min_n = {min_n}, max_n = {max_n} need 1 <= min_n <= max_n")
        if smoothing < 0:
            raise ValueError(f"smoothing = {smoothing} must be >= 0")
        self.min_n, self.max_n, self.smoothing = min_n, max_n, smoothing
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], Counter[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens, counting each one as the continuation of the n-grams before it."""
        for token in tokens:
            token = int(token)
            end = len(self.tokens)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                key = tuple(self.tokens[end - n : end])
                self._next.setdefault(key, Counter())[token] += 1
            self.tokens.append(token)

    def propose_children(self, context: Sequence[int], num_children: int) -> list[tuple[int, float]]:
        """Top continuations of the longest suffix of ``context`` seen in the index."""
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            counts = self._next.get(tuple(context[len(context) - n :]))
            if counts:
                total = sum(counts.values()) + self.smoothing / 2 ** (n - 1)
                return [(token, count / total) for token, count in counts.most_common(num_children)]
        return []

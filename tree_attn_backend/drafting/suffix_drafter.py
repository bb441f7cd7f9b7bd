"""SuffixDecoding trees as a drafter (the ``arctic-inference`` package's ``SuffixDecodingCache``).

SuffixDecoding (Oliaro et al., 2024) keeps a suffix tree per active request over its prompt and
output, and one global suffix tree over the outputs of earlier requests. Asked for a draft, it
matches the longest suffix of the request's tokens in both and returns its best tree (token
ids, parents, and each node's path probability from continuation counts). vLLM's
``method: "suffix"`` verifies only that tree's best path; here the tree itself is verified.

:class:`SuffixCache` owns the engine-wide cache and follows each request's tokens;
:meth:`SuffixCache.tree_drafter` asks it once per draft tree and answers the expansion's child
queries from that tree, with each child's probability conditional on its parent.

Unlike vLLM's, the global tree holds each output after the last ``max_depth`` tokens of its
prompt, so a request whose prompt ends as an earlier one's did (a regeneration, a retried agent
step) drafts that earlier answer from its first token instead of from a few matched tokens of
it; and a node's probability weighs SuffixDecoding's frequency by how long the match behind it
is (:class:`SuffixTreeDrafter`).

Memory: each active request's suffix tree is linear in its tokens (at most ``max_depth`` nodes
per token) and freed when the request leaves; the global tree holds the outputs of at most
``max_cached_requests`` requests (the oldest evicted first), each with ``max_depth`` prompt
tokens before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The smoothing of a SuffixDecoding frequency after a one-token match, halved with every
# further matched token (the lookup drafter's default, ``drafter_smoothing``).
MATCH_SMOOTHING = 2.0


class SuffixCache:
    """The engine's SuffixDecoding cache and how far it has seen each request's tokens."""

    def __init__(self, max_cached_requests: int, max_depth: int = 24, max_spec_factor: float = 1.0) -> None:
        """``max_depth``: suffix-tree depth (the longest match and draft); ``max_spec_factor``:
        a draft is at most this times the matched length (short matches guess little).
        Defaults are vLLM's for ``method: "suffix"``."""
        if isinstance(max_cached_requests, bool) or not isinstance(max_cached_requests, int):
            raise ValueError(f"max_cached_requests = {max_cached_requests!r}: must be an integer >= 0")
        if max_cached_requests < 0:
            raise ValueError(f"max_cached_requests = {max_cached_requests}: must be >= 0")
        if not isinstance(max_depth, int) or not 1 <= max_depth <= 64:
            raise ValueError(f"max_depth = {max_depth!r}: must be an integer in [1, 64]")
        if not max_spec_factor > 0.0:
            raise ValueError(f"max_spec_factor = {max_spec_factor!r}: must be > 0")
        self.max_cached_requests, self.max_depth, self.max_spec_factor = max_cached_requests, max_depth, max_spec_factor
        self.reset()

    def reset(self) -> None:
        """Forget every request and every cached output (requests still running start over
        on their next :meth:`follow`)."""
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        self.cache = SuffixDecodingCache(self.max_depth, self.max_cached_requests)
        self.seen: dict[str, int] = {}  # tokens of each active request in the cache

    def follow(self, req_id: str, tokens: np.ndarray, prompt_length: int) -> None:
        """Bring the cache up to ``tokens`` (int ``[n]``, the request's prompt then output):
        the first call starts the request with its prompt, every call adds the new output."""
        seen = self.seen.get(req_id)
        if seen is not None and seen > len(tokens):  # the request was rolled back: start over
            self.stop(req_id)
            seen = None
        if seen is None:
            seen = min(max(prompt_length, 1), len(tokens))
            # The prompt's last max_depth tokens go in as the start of the "response": the
            # local tree still holds the whole prompt, and the global tree holds each output
            # after the end of its prompt, so a request whose prompt ends as an earlier one's
            # did (a regeneration, a retried agent step) matches it in full from its first
            # token and drafts that output at once.
            tail = min(self.max_depth, seen)
            self.cache.start_request(req_id, np.ascontiguousarray(tokens[: seen - tail], dtype=np.int32))
            self.cache.add_active_response(req_id, np.ascontiguousarray(tokens[seen - tail : seen], dtype=np.int32))
        if len(tokens) > seen:
            self.cache.add_active_response(req_id, np.ascontiguousarray(tokens[seen:], dtype=np.int32))
        self.seen[req_id] = len(tokens)

    def stop(self, req_id: str) -> None:
        """The request left: free its own tree (its output stays in the global cache)."""
        if self.seen.pop(req_id, None) is not None:
            self.cache.stop_request(req_id)

    def tree_drafter(self, req_id: str, context: np.ndarray, max_nodes: int) -> SuffixTreeDrafter:
        """A drafter over the cache's best tree of at most ``max_nodes`` nodes after
        ``context`` (the request's tokens, followed up to here)."""
        draft = self.cache.speculate(
            req_id,
            np.ascontiguousarray(context[-self.max_depth :], dtype=np.int32),
            max_spec_tokens=max_nodes,
            max_spec_factor=self.max_spec_factor,
            min_token_prob=0.0,  # pruning is the policy's job
            use_tree_spec=True,
        )
        return SuffixTreeDrafter(len(context), draft.token_ids, draft.parents, draft.probs, draft.match_len)


class SuffixTreeDrafter:
    """One SuffixDecoding tree, answering :class:`~tree_attn_backend.drafting.drafter.Drafter`
    queries: the children of the node reached by the tokens after the first ``root_length``
    of the context, most likely first, each with its probability given its parent.

    A child's probability is its continuation frequency (SuffixDecoding's) shrunk by how
    little context it was counted after: ``f / (1 + MATCH_SMOOTHING * 2 ** (1 - m))``, ``m``
    the matched suffix plus the draft tokens above the child. SuffixDecoding returns
    frequencies, not counts, so this is the lookup drafter's smoothing taken at a total count
    of one, the most it can shrink. One continuation seen after a one-token match says little
    (1/3), after eight matching tokens it nearly settles it (0.98); a regenerated answer,
    matched in full, keeps its path values near its frequencies.
    """

    def __init__(
        self,
        root_length: int,
        token_ids: Sequence[int],
        parents: Sequence[int],
        path_probs: Sequence[float],
        match_length: int,
    ) -> None:
        """``token_ids``, ``parents`` (index into the same lists; -1: a child of the root) and
        ``path_probs`` per node, parents before children, as SuffixDecoding returns them, with
        ``match_length``, the context suffix they continue."""
        if match_length < 0:
            raise ValueError(f"match_length = {match_length}: must be >= 0")
        self.root_length = root_length
        self.children: dict[tuple[int, ...], list[tuple[int, float]]] = {}
        paths: list[tuple[int, ...]] = []
        for i, (token, parent) in enumerate(zip(token_ids, parents)):
            if not -1 <= parent < i:
                raise ValueError(f"node {i}: parent {parent} must come before it (or be -1)")
            parent_path, parent_prob = ((), 1.0) if parent < 0 else (paths[parent], float(path_probs[parent]))
            paths.append((*parent_path, int(token)))
            frequency = min(1.0, float(path_probs[i]) / parent_prob) if parent_prob > 0.0 else 0.0
            matched = match_length + len(parent_path)
            weight = 1.0 / (1.0 + MATCH_SMOOTHING * 2.0 ** (1 - matched)) if matched > 0 else 0.0
            self.children.setdefault(parent_path, []).append((int(token), frequency * weight))
        for options in self.children.values():
            options.sort(key=lambda item: -item[1])

    def propose_children(self, context: Sequence[int], num_children: int) -> list[tuple[int, float]]:
        path = tuple(int(t) for t in context[self.root_length :])
        return [(token, prob) for token, prob in self.children.get(path, [])[:num_children] if prob > 0.0]

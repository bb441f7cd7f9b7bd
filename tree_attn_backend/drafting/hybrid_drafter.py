"""Several drafters' candidates merged into one trie, with calibrated probabilities.

For a node, every source proposes ``(token, probability)`` children; the hybrid merges them by
token. A source's probability ``p_s`` is first calibrated by that source's
:class:`~tree_attn_backend.drafting.calibration.IsotonicCalibration` ``c_s`` (fit on the tested
nodes it proposed: nodes whose parent the target accepted), then the sources are combined as
independent evidence that the target picks the token (noisy-OR):

    p = 1 - prod_s (1 - c_s(p_s))

A token both sources propose is thus more likely than either alone says. The target accepts at
most one child, so the children's probabilities may not sum above 1: taken most likely first,
each keeps its value up to the mass its elder siblings left. A confident child thus keeps its
value and its unlikely siblings give way (scaling all children down together would instead cut
the confident child's whole subtree, which is what a long repeated answer looks like). After each
verification, :meth:`HybridDrafter.observe` feeds every tested node back to the factors of the
sources that proposed it, so the combination is fit online from what the target accepted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tree_attn_backend.drafting.calibration import IsotonicCalibration
from tree_attn_backend.drafting.drafter import Drafter
from tree_attn_backend.drafting.tree import DraftTree


class HybridDrafter:
    """One request's merged drafter over named ``sources`` (a source may be shared by every
    request, like the recycle table), with factors in ``calibration`` by source name (shared
    too, so every request's verifications fit them)."""

    def __init__(self, sources: Mapping[str, Drafter], calibration: Mapping[str, IsotonicCalibration]) -> None:
        missing = sorted(set(sources) - set(calibration))
        if missing:
            raise ValueError(f"no calibration for source(s) {missing}")
        self.sources = dict(sources)
        self.calibration = calibration
        # Per proposed child, by its draft path (the tokens after the root): each source's
        # own probability. Reset when a new tree is grown.
        self._proposed: dict[tuple[int, ...], dict[str, float]] = {}
        self._root_length = 0

    def start_tree(self, context: Sequence[int]) -> None:
        """Forget the last tree's children: a new one grows from ``context`` (root last)."""
        self._proposed.clear()
        self._root_length = len(context)

    def propose_children(self, context: Sequence[int], num_children: int) -> list[tuple[int, float]]:
        path = tuple(int(t) for t in context[self._root_length :])
        by_token: dict[int, dict[str, float]] = {}
        for name, source in self.sources.items():
            for token, prob in source.propose_children(context, num_children):
                by_token.setdefault(int(token), {})[name] = float(prob)
        if not by_token:
            return []
        combined = {}
        for token, probs in by_token.items():
            miss = 1.0
            for name, prob in probs.items():
                miss *= 1.0 - float(self.calibration[name].calibrate(prob))
            combined[token] = 1.0 - miss
            self._proposed[(*path, token)] = probs
        children = []
        left = 1.0  # probability mass the elder siblings left
        for token, prob in sorted(combined.items(), key=lambda item: -item[1])[:num_children]:
            prob = min(prob, left)
            if prob <= 0.0:
                break
            children.append((token, prob))
            left -= prob
        return children

    def observe(self, tree: DraftTree, num_verified: int, accepted_nodes: np.ndarray) -> None:
        """After verification of ``tree``'s first ``num_verified`` draft nodes, with
        ``accepted_nodes`` (int, root first, the accepted path's nodes; ``-1`` padding allowed):
        every tested verified node updates its sources' factors."""
        accepted = {int(n) for n in accepted_nodes if n >= 0}
        probs: dict[str, list[float]] = {}
        hits: dict[str, list[bool]] = {}
        for node in range(1, num_verified + 1):
            if int(tree.parents[node]) not in accepted:
                continue  # its parent was rejected: the target never tested it
            path = tuple(int(t) for t in tree.tokens[tree.path_to(node)[1:]])
            for name, prob in self._proposed.get(path, {}).items():
                probs.setdefault(name, []).append(prob)
                hits.setdefault(name, []).append(node in accepted)
        for name, source_probs in probs.items():
            self.calibration[name].update(np.array(source_probs), np.array(hits[name]))

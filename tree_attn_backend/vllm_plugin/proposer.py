"""The ``custom_class`` proposer: a pruned draft tree per request from the lookup drafter.

vLLM's custom_class contract returns token ids only; the tree behind them stays here, keyed
by request id, and the tree model runner reads it back when the drafts are scheduled.
Node lists are in best-first topological order, so the scheduler truncating a request's
drafts keeps the most valuable subtree.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..lookup_drafter import LookupIndex
from ..pruning import expand_and_prune
from ..tree import DraftTree
from ..tree_shape import TreeShape
from .config import TreePrunedConfig


class TreeProposer:
    """``--speculative-config '{"method": "custom_class", "model":
    "tree_attn_backend.vllm_plugin.proposer.TreeProposer", "num_speculative_tokens": K}'``"""

    def __init__(self, vllm_config) -> None:  # noqa: ANN001 (vllm.config.VllmConfig)
        self.config = TreePrunedConfig.from_additional_config(vllm_config.additional_config)
        num_spec = vllm_config.speculative_config.num_speculative_tokens
        self.policy = self.config.policy(num_spec)
        self.shape = self.config.shape
        self.chain_shape = TreeShape.chain(self.shape.max_depth)
        self.indexes: dict[str, LookupIndex] = {}
        self.trees: dict[str, DraftTree] = {}
        self._req_ids: "list[str] | None" = None
        self._eligible: list[bool] = []

    def load_model(self, *args: object, **kwargs: object) -> None:
        """Nothing to load: the drafter reads the requests' own tokens."""

    def bind_batch(self, req_ids: Sequence[str], tree_eligible: Sequence[bool]) -> None:
        """Called by the tree model runner before each ``propose``: the batch order and which
        requests may get branching trees (the others get the best chain)."""
        self._req_ids = list(req_ids)
        self._eligible = list(tree_eligible)

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: object = None,
    ) -> list[list[int]]:
        if self._req_ids is None:
            raise RuntimeError(
                "TreeProposer runs only with the TREE_PRUNED model runner: start vLLM with "
                "VLLM_ATTENTION_BACKEND=TREE_PRUNED"
            )
        req_ids, self._req_ids = self._req_ids, None
        drafts: list[list[int]] = []
        for row, req_id in enumerate(req_ids):
            if not sampled_token_ids[row]:  # prefill chunk in progress, or discarded
                self.trees.pop(req_id, None)
                drafts.append([])
                continue
            num_tokens = int(num_tokens_no_spec[row])
            index = self.indexes.get(req_id)
            if index is None or len(index) > num_tokens:
                index = self.indexes[req_id] = LookupIndex(
                    self.config.drafter_min_ngram, self.config.drafter_max_ngram, self.config.drafter_smoothing
                )
            index.extend(token_ids_cpu[row, len(index) : num_tokens].tolist())
            shape = self.shape if self._eligible[row] else self.chain_shape
            tree, _ = expand_and_prune(shape, index, index.tokens, self.policy)
            self.trees[req_id] = tree
            drafts.append(tree.tokens[1:].tolist())
        return drafts

    def tree_for(self, req_id: str, scheduled: Sequence[int]) -> "DraftTree | None":
        """The tree behind a request's scheduled drafts (a prefix of its node list), or
        ``None`` when they are not ours (e.g. cleared and re-proposed elsewhere)."""
        tree = self.trees.get(req_id)
        if tree is None or len(scheduled) + 1 > tree.num_nodes:
            return None
        if tree.tokens[1 : len(scheduled) + 1].tolist() != list(scheduled):
            return None
        return tree

    def forget(self, req_id: str) -> None:
        self.indexes.pop(req_id, None)
        self.trees.pop(req_id, None)

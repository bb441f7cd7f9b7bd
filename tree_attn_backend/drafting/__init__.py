"""Stage 1, drafting: draft trees, their shapes, the drafters that fill them, pruning, and the
batch-wide verify budget. Output: one :class:`DraftTree` per request (best-first node order)."""

from tree_attn_backend.drafting.drafter import Drafter, SyntheticDrafter
from tree_attn_backend.drafting.lookup_drafter import LookupIndex
from tree_attn_backend.drafting.pruning import PruningPolicy, expand_and_prune
from tree_attn_backend.drafting.tree import DraftTree, FlatTrees
from tree_attn_backend.drafting.tree_shape import TreeShape
from tree_attn_backend.drafting.verify_budget import OnlineCostFit, VerifyCostModel, allocate_verify_budget

__all__ = [
    "DraftTree",
    "Drafter",
    "FlatTrees",
    "LookupIndex",
    "OnlineCostFit",
    "PruningPolicy",
    "SyntheticDrafter",
    "TreeShape",
    "VerifyCostModel",
    "allocate_verify_budget",
    "expand_and_prune",
]

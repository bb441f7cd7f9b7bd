"""Metadata builder: pruned trees + batch layout in, kernel-ready metadata out (no vLLM)."""

from .batch import SUPPORTED_BLOCK_SIZES, StepBatch
from .builder import build_tree_attention_metadata
from .tree_metadata import MaskWorkspace, TreeAttentionMetadata

__all__ = [
    "SUPPORTED_BLOCK_SIZES",
    "MaskWorkspace",
    "StepBatch",
    "TreeAttentionMetadata",
    "build_tree_attention_metadata",
]

"""KV compaction: move the accepted branch's K/V to the first slots after the context.

During verification node ``i`` of a request's tree was written at linear cache position
``context + i`` (node order). vLLM then keeps ``context + 1 + num_accepted`` tokens and
assumes they sit at consecutive positions, so the node at path step ``k`` must move from
``context + accepted_nodes[k]`` to ``context + k``. Its K was rotated with position
``context + depth = context + k``, exactly right for the new place: no re-rotation.

Moves only go to lower positions and ``accepted_nodes`` is increasing, so no destination
is the source of a later move; gathering every source before writing is safe regardless.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tree_attn_backend.attention.kv_layout import PagedKVLayout


def compaction_moves(
    accepted_nodes: torch.Tensor, node_slots: torch.Tensor, tree_starts: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot moves that compact every tree's accepted path.

    Args:
        accepted_nodes: int ``[R, D+1]`` local nodes of each tree's accepted path, root first,
            ``-1`` padded (``VerifyResult.accepted_nodes``).
        node_slots: int64 ``[N]`` the cache slot each query token of the step was written to
            (the step's slot mapping: node ``i`` of a tree at linear position ``context + i``).
        tree_starts: int ``[R]`` index in ``node_slots`` of each tree's root.
    Returns:
        ``(src, dst)`` int64 ``[M]`` cache slots, only for nodes that actually move. Path step
        ``k`` lands in node ``k``'s slot: position ``context + k``.
    """
    if accepted_nodes.dim() != 2 or accepted_nodes.shape[0] != len(tree_starts):
        raise ValueError(f"accepted_nodes {tuple(accepted_nodes.shape)} does not match {len(tree_starts)} trees")
    steps = torch.arange(accepted_nodes.shape[1])[None, :].expand_as(accepted_nodes)
    moving = (accepted_nodes >= 0) & (accepted_nodes != steps)
    tree, step = torch.nonzero(moving, as_tuple=True)
    root = torch.as_tensor(tree_starts, dtype=torch.int64)[tree]
    src = root + accepted_nodes[tree, step].to(torch.int64)
    if src.numel() and int(src.max()) >= node_slots.shape[0]:
        raise ValueError(f"accepted node at query token {int(src.max())} is beyond the step's {node_slots.shape[0]}")
    slots = node_slots.to(torch.int64)
    return slots[src], slots[root + step]


def apply_compaction(
    kv_caches: Sequence[torch.Tensor], layout: PagedKVLayout, src: torch.Tensor, dst: torch.Tensor
) -> None:
    """Apply the moves to every layer's cache (``layout``) in place; no other slot is touched."""
    for cache in kv_caches:
        layout.copy_slots(cache, src, dst)

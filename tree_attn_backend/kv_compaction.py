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

import torch

from .paged_kv import copy_slots


def compaction_moves(
    accepted_nodes: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot moves that compact every request's accepted path.

    Args:
        accepted_nodes: int ``[B, D+1]`` local nodes of the accepted path, root first,
            ``-1`` padded (``VerifyResult.accepted_nodes``).
        context_lens: int ``[B]`` committed tokens before the verify step.
        block_table: int ``[B, max_blocks]``.
    Returns:
        ``(src, dst)`` int64 ``[M]`` cache slots, only for nodes that actually move.
    """
    if accepted_nodes.dim() != 2 or accepted_nodes.shape[0] != context_lens.shape[0]:
        raise ValueError(
            f"accepted_nodes {tuple(accepted_nodes.shape)} does not match {context_lens.shape[0]} requests"
        )
    steps = torch.arange(accepted_nodes.shape[1])[None, :].expand_as(accepted_nodes)
    moving = (accepted_nodes >= 0) & (accepted_nodes != steps)
    req, step = torch.nonzero(moving, as_tuple=True)
    if req.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    ctx = context_lens.to(torch.int64)[req]
    src_pos = ctx + accepted_nodes[req, step].to(torch.int64)
    dst_pos = ctx + step
    blocks = block_table.to(torch.int64)
    if int(src_pos.max()) >= blocks.shape[1] * block_size:
        raise ValueError(f"accepted node at position {int(src_pos.max())} is outside the block table")

    def slot(pos: torch.Tensor) -> torch.Tensor:
        return blocks[req, pos // block_size] * block_size + pos % block_size

    return slot(src_pos), slot(dst_pos)


def apply_compaction(kv_caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Apply the moves to every layer's cache in place; no other slot is touched."""
    if src.shape != dst.shape:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ in shape")
    for cache in kv_caches:
        copy_slots(cache, src, dst)

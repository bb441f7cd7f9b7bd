"""A learned draft head: the target's next-but-one token, predicted from its own hidden state.

Every verify pass computes the target's final hidden state ``h`` (the input of its LM head) at
every node; at the accepted leaf, ``h`` gave the next tree's root ``r`` (the bonus token). The
head predicts the token after the root from ``h`` and the root's input embedding ``e(r)``, one
residual layer in the spirit of Medusa (Cai et al., 2024) with EAGLE's idea of feeding the
sampled token (Li et al., 2024):

    z = h + SiLU(W [h; e(r)] + b)        logits = z U^T   over the head's own vocabulary

``U`` holds one row per token the head may emit (the ``Vh`` tokens most frequent in its
training text, ids in ``vocab``). Only the root's children come from the head; deeper nodes come
from the other sources of the hybrid drafter. Trained on the target's own greedy outputs, so no
other model is needed; its probabilities are calibrated online like every source's.

Shapes: ``D`` the target's hidden size; ``W`` float32 ``[D, 2D]``, ``b`` ``[D]``, ``U``
``[Vh, D]``, ``vocab`` int64 ``[Vh]`` (distinct ids), and ``model_probe`` float32 ``[P, D]``:
the target's input embeddings of token ids ``0 .. P-1``, which tell the model a head was
trained for. Stored as safetensors, ``W`` and ``U`` in bfloat16 (half the file; only draft
choices depend on them).

Heads for the embedded default model ship in ``tree_attn_backend/data/heads/``; the option
``draft_head: "auto"`` (the default) serves the one whose probe matches the served model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tree_attn_backend.drafting.drafter import as_sub_distribution
from tree_attn_backend.ops.packed_linear import DEFAULT_MAX_ROWS, LinearFn, SmallBatchLinear, packed_linear_available
from tree_attn_backend.ops.top_k import top_k_softmax

BUNDLED_HEADS_DIR = Path(__file__).resolve().parents[1] / "data" / "heads"
PROBE_TOKENS = 8  # rows of the model probe: the input embeddings of token ids 0 .. 7


@dataclass(frozen=True, eq=False)
class DraftHead:
    """The head's weights (see the module docstring for the formula and shapes)."""

    fc_weight: torch.Tensor
    fc_bias: torch.Tensor
    out_weight: torch.Tensor
    vocab: torch.Tensor
    model_probe: torch.Tensor
    _fc: LinearFn = field(init=False, repr=False)
    _out: LinearFn = field(init=False, repr=False)

    def __post_init__(self) -> None:
        d = self.fc_bias.shape[0] if self.fc_bias.dim() == 1 else -1
        shapes = {name: tuple(getattr(self, name).shape) for name in _TENSORS}
        ok = (
            d > 0
            and shapes["fc_weight"] == (d, 2 * d)
            and self.out_weight.dim() == 2
            and self.out_weight.shape[1] == d
            and shapes["vocab"] == (self.out_weight.shape[0],)
            and self.out_weight.shape[0] >= 1
            and self.model_probe.dim() == 2
            and self.model_probe.shape[0] >= 1
            and self.model_probe.shape[1] == d
        )
        if not ok:
            raise ValueError(
                f"draft head shapes {shapes}: need fc_weight [D, 2D], fc_bias [D], out_weight [Vh, D], vocab [Vh], "
                "model_probe [P, D]"
            )
        if self.vocab.dtype != torch.int64 or int(self.vocab.min()) < 0:
            raise ValueError(f"draft head vocab: must be int64 token ids >= 0, got {self.vocab.dtype}")
        if torch.unique(self.vocab).numel() != self.vocab.numel():
            raise ValueError("draft head vocab holds a token id twice")
        # A few rows per step: the packed product where it is built (about 4x faster than
        # torch's for one row in the engine); torch's otherwise. Only draft choices depend on it.
        for name, weight in (("_fc", self.fc_weight), ("_out", self.out_weight)):
            weight = weight.to(torch.float32).contiguous()
            product: LinearFn = (
                SmallBatchLinear(weight, F.linear, DEFAULT_MAX_ROWS) if packed_linear_available() else F.linear
            )
            object.__setattr__(self, name, product)

    @property
    def hidden_size(self) -> int:
        return int(self.fc_bias.shape[0])

    def fits(self, embed: Callable[[torch.Tensor], torch.Tensor], hidden_size: int) -> bool:
        """Whether the head was trained for the model of hidden size ``hidden_size`` whose input
        embedding is ``embed`` (int64 ``[n]`` -> ``[n, D]``): same size, and the same embeddings
        of the probe's token ids to bfloat16 precision."""
        if self.hidden_size != hidden_size:
            return False
        with torch.no_grad():
            rows = embed(torch.arange(self.model_probe.shape[0], dtype=torch.int64)).to(torch.float32).cpu()
        probe = self.model_probe.to(torch.float32)
        return rows.shape == probe.shape and torch.allclose(rows, probe, rtol=1e-2, atol=1e-3)

    def logits(self, hidden: torch.Tensor, root_embedding: torch.Tensor) -> torch.Tensor:
        """float32 ``[B, Vh]`` from ``hidden`` and ``root_embedding`` (``[B, D]``, any float)."""
        h = hidden.to(torch.float32)
        x = torch.cat([h, root_embedding.to(torch.float32)], dim=-1)
        z = h + F.silu(self._fc(x, self.fc_weight, self.fc_bias))
        return self._out(z, self.out_weight, None)

    def top_children(self, hidden: torch.Tensor, root_embedding: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most likely tokens after each root: int64 ``[B, k']`` token ids and float64
        ``[B, k']`` their softmax probabilities over the head's vocabulary, most likely first
        (``k' = min(k, Vh)``)."""
        with torch.no_grad():
            probs, columns = top_k_softmax(self.logits(hidden, root_embedding), min(k, self.vocab.numel()))
        return self.vocab.numpy()[columns.numpy()], as_sub_distribution(probs.numpy())

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        stored = {name: getattr(self, name).contiguous() for name in _TENSORS}
        for name in _BFLOAT16_TENSORS:
            stored[name] = stored[name].to(torch.bfloat16)
        save_file(stored, str(path))

    @classmethod
    def load(cls, path: str | Path) -> DraftHead:
        """A head saved by :meth:`save` (or :func:`fit_draft_head`'s caller); the error names
        the file when it is not one."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        missing = sorted(set(_TENSORS) - set(tensors))
        if missing:
            raise ValueError(f"{path}: not a draft head (no tensor(s) {missing}; tree-pruned train-head makes one)")
        return cls(**{name: tensors[name] if name == "vocab" else tensors[name].to(torch.float32) for name in _TENSORS})


_TENSORS = ("fc_weight", "fc_bias", "out_weight", "vocab", "model_probe")
_BFLOAT16_TENSORS = ("fc_weight", "out_weight")


def bundled_head_for(embed: Callable[[torch.Tensor], torch.Tensor], hidden_size: int) -> tuple[Path, DraftHead] | None:
    """The shipped head (``BUNDLED_HEADS_DIR``) trained for the model whose input embedding is
    ``embed`` and hidden size ``hidden_size``, and its file, if there is one."""
    for path in sorted(BUNDLED_HEADS_DIR.glob("*.safetensors")):
        head = DraftHead.load(path)
        if head.fits(embed, hidden_size):
            return path, head
    return None


def fit_draft_head(
    hidden: torch.Tensor,
    root_embedding: torch.Tensor,
    next_tokens: torch.Tensor,
    output_embedding: torch.Tensor,
    input_embedding: torch.Tensor,
    vocab_size: int = 4096,
    epochs: int = 3,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> DraftHead:
    """Fit a head on ``N`` examples: float ``[N, D]`` hidden states and root embeddings, int64
    ``[N]`` the token after each root (the target's greedy choice).

    ``output_embedding`` (float ``[V, D]``, the target's LM head) gives ``U``'s starting rows;
    ``W`` and ``b`` start at zero, so the untrained head is the target's own LM head over the
    head's vocabulary. ``input_embedding`` (float ``[V, D]``) gives the model probe (its first
    :data:`PROBE_TOKENS` rows). The vocabulary is the ``vocab_size`` most frequent ``next_tokens``;
    examples whose next token is outside it do not train the head. Adam on cross-entropy,
    ``epochs`` passes in a ``seed``-shuffled order.
    """
    n, d = hidden.shape
    if root_embedding.shape != (n, d) or next_tokens.shape != (n,):
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, root_embedding {tuple(root_embedding.shape)} and next_tokens "
            f"{tuple(next_tokens.shape)} do not match"
        )
    if n == 0:
        raise ValueError("no training examples")
    counts = torch.bincount(next_tokens, minlength=output_embedding.shape[0])
    vocab = counts.argsort(descending=True, stable=True)[: min(vocab_size, int((counts > 0).sum()))]
    column = torch.full((output_embedding.shape[0],), -1, dtype=torch.int64)
    column[vocab] = torch.arange(vocab.numel())
    labels = column[next_tokens]
    keep = labels >= 0
    h, e, labels = hidden[keep].to(torch.float32), root_embedding[keep].to(torch.float32), labels[keep]
    fc = torch.nn.Linear(2 * d, d)
    torch.nn.init.zeros_(fc.weight)
    torch.nn.init.zeros_(fc.bias)
    out = torch.nn.Parameter(output_embedding[vocab].to(torch.float32).clone())
    optimizer = torch.optim.Adam([*fc.parameters(), out], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(labels.numel(), generator=generator)
        for start in range(0, labels.numel(), batch_size):
            batch = order[start : start + batch_size]
            z = h[batch] + F.silu(fc(torch.cat([h[batch], e[batch]], dim=-1)))
            loss = F.cross_entropy(z @ out.T, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return DraftHead(
        fc.weight.detach().clone(),
        fc.bias.detach().clone(),
        out.detach().clone(),
        vocab.clone(),
        input_embedding[:PROBE_TOKENS].detach().to(torch.float32).clone(),
    )


class HeadRootDrafter:
    """The head's children of one tree's root as a
    :class:`~tree_attn_backend.drafting.drafter.Drafter`: proposed at the root (a context of
    ``root_length`` tokens), nothing below it."""

    def __init__(self, root_length: int, tokens: list[int], probs: list[float]) -> None:
        self.root_length = root_length
        self.children = [(int(t), float(p)) for t, p in zip(tokens, probs) if p > 0.0]

    def propose_children(self, context: Sequence[int], num_children: int) -> list[tuple[int, float]]:
        return self.children[:num_children] if len(context) == self.root_length else []

"""The target's token at every tree node, drawn the way vLLM's CPU sampler draws it.

A tree request is greedy or plain sampling (temperature, top-k, top-p, optional seed; see
``verification_kind``). vLLM 0.32's CPU sampler emits, per request and step,
``greedy_argmax(logits)`` or ``fused_gumbel_argmax(top_k_top_p(logits / T), seed)`` with
``seed`` one ``randint(0, 2**31)`` drawn from the request's generator (the global one when
unseeded). Here every node at depth ``d`` of a request's tree uses that request's ``d``-th seed
of this step. The token emitted at depth ``d`` is then exactly what plain decoding emits at that
step (the same ops on the same logits with the same seed), and after verification a seeded
request's generator is left where plain decoding would leave it: advanced by one draw per
emitted token. Greedy and seeded requests therefore emit exactly the tokens of decoding
without speculation; unseeded ones the same distribution (nodes of one depth share a seed, and
at most one of them is on the accepted path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

_GREEDY_EPS = 1e-5  # vLLM's sampler treats a temperature below this as greedy
_SEED_BOUND = 2**31  # vLLM's CPU sampler draws seeds in [0, 2**31)


@dataclass
class SeededGenerators:
    """The seeded tree requests' generators and their states after each seed drawn this step.

    ``states[row][k]`` is the generator state of batch row ``row`` after ``k`` draws.
    """

    generators: dict[int, torch.Generator]
    states: dict[int, list[torch.Tensor]]

    def settle(self, rows: list[int], num_emitted: torch.Tensor) -> None:
        """Leave each seeded generator advanced by one draw per emitted token (``rows``: batch
        rows of the verified trees, ``num_emitted`` int ``[len(rows)]``), as plain decoding
        would; this also undoes draws vLLM's chain sampler made for these rows."""
        for i, row in enumerate(rows):
            if row in self.generators:
                self.generators[row].set_state(self.states[row][int(num_emitted[i])])


def _depth_seeds(
    row: int, num_depths: int, generators: dict[int, torch.Generator], states: dict[int, list[torch.Tensor]]
) -> torch.Tensor:
    """int64 ``[num_depths]``: the seeds of one request for depths ``0..num_depths-1``."""
    generator = generators.get(row)
    if generator is None:
        return torch.randint(0, _SEED_BOUND, (num_depths,), dtype=torch.long)
    # One draw at a time, as vLLM draws one per step, recording the state after each.
    seeds, states[row] = [], [generator.get_state()]
    for _ in range(num_depths):
        seeds.append(int(torch.randint(0, _SEED_BOUND, (1,), generator=generator, dtype=torch.long)))
        states[row].append(generator.get_state())
    return torch.tensor(seeds, dtype=torch.long)


def sample_tree_nodes(
    logits: torch.Tensor,
    rows: list[int],
    counts: torch.Tensor,
    depths: torch.Tensor,
    metadata: SamplingMetadata,
) -> tuple[torch.Tensor, SeededGenerators]:
    """The target's token at every node of the tree requests.

    Args:
        logits: float32 ``[N, V]``: target logits at every node, request after request.
        rows: the batch row of each tree request (``R`` of them), ascending.
        counts: int64 ``[R]``: nodes per request (they sum to ``N``).
        depths: int64 ``[N]``: each node's depth in its tree.
        metadata: vLLM's sampling metadata of the batch.

    Returns:
        ``(tokens, seeded)``: int64 ``[N]`` and the seeded generators to settle after
        verification (:meth:`SeededGenerators.settle`).
    """
    seeded = SeededGenerators(metadata.generators, {})
    if metadata.all_greedy:
        return torch.ops._C.greedy_argmax(logits).to(torch.int64), seeded
    node_row = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), counts)
    temperature = metadata.temperature[node_row]
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    greedy = temperature < _GREEDY_EPS
    if bool(greedy.any()):
        tokens[greedy] = torch.ops._C.greedy_argmax(logits[greedy]).to(torch.int64)
    random = ~greedy
    if bool(random.any()):
        starts = torch.cumsum(counts, 0) - counts
        seeds = torch.empty(logits.shape[0], dtype=torch.long)
        for i, row in enumerate(rows):
            nodes = slice(int(starts[i]), int(starts[i] + counts[i]))
            if metadata.temperature[row] >= _GREEDY_EPS:
                seeds[nodes] = _depth_seeds(row, int(depths[nodes].max()) + 1, metadata.generators, seeded.states)[
                    depths[nodes]
                ]
        random_rows = node_row[random]
        scaled = logits[random] / temperature[random].unsqueeze(1)  # vLLM's apply_temperature
        scaled = apply_top_k_top_p(
            scaled,
            None if metadata.top_k is None else metadata.top_k[random_rows],
            None if metadata.top_p is None else metadata.top_p[random_rows],
        )
        tokens[random] = torch.ops._C.fused_gumbel_argmax(scaled, seeds[random]).to(torch.int64)
    return tokens, seeded

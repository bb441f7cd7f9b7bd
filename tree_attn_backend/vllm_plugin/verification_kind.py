"""Which verifier a request gets, from its sampling parameters.

Tree verification here reproduces vLLM's sampler for plain requests only (greedy, or
temperature / top-k / top-p with or without a seed); every option that reshapes logits with the
generated context or returns per-token logprobs is left to vLLM's own sampler, untouched, so
every request gets exactly what the same engine gives without speculation.
"""

from __future__ import annotations

import enum
from typing import Any


class Verification(enum.Enum):
    """How a request's drafts are verified.

    * ``TREE``: branching trees, verified by :mod:`tree_attn_backend.verification.verify` with vLLM's sampling
      primitives at every node.
    * ``CHAIN``: chain drafts verified by vLLM's rejection sampler (penalties, ``min_tokens``,
      bad words, allowed token ids, structured output, logprobs, thinking budgets: it applies
      them at every draft position).
    * ``NONE``: no drafts; vLLM's sampler (``min_p`` and ``logit_bias``, which vLLM's rejection
      sampler cannot apply to draft positions).
    """

    TREE = "tree"
    CHAIN = "chain"
    NONE = "none"


def verification_for(params: Any) -> Verification:
    """The verification of a request with these ``vllm.SamplingParams`` (``None``: a request
    without sampling parameters, e.g. pooling, gets no drafts)."""
    if params is None or params.min_p > 0.0 or params.logit_bias:
        return Verification.NONE
    plain = (
        params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.repetition_penalty == 1.0
        and params.min_tokens == 0
        and not params.bad_words
        and params.allowed_token_ids is None
        and params.structured_outputs is None
        and params.logprobs is None
        and params.logprob_token_ids is None
        and params.thinking_token_budget is None
    )
    return Verification.TREE if plain else Verification.CHAIN

"""Stage 4, verification: which draft path the target accepts (greedy or lossless sampling),
and the KV compaction that moves the accepted path's entries into place."""

from tree_attn_backend.verification.kv_compaction import apply_compaction, compaction_moves
from tree_attn_backend.verification.verify import VerifyResult, verify_greedy, verify_sampling, verify_target_tokens

__all__ = [
    "VerifyResult",
    "apply_compaction",
    "compaction_moves",
    "verify_greedy",
    "verify_sampling",
    "verify_target_tokens",
]

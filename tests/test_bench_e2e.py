"""``tree-pruned bench e2e`` through real engines (all five modes, a small grid), its rows'
arithmetic, and its argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tree_attn_backend.bench.e2e import METRICS, MODES, E2EConfig, _engine_processes, load_prompts, summarize
from tree_attn_backend.bench.e2e_report import calibration_totals, check_targets, format_table
from tree_attn_backend.bench.replay import ReplaySetting, replay, replay_settings
from tree_attn_backend.cli import main
from tree_attn_backend.drafting.tree_shape import TreeShape


def _cli_json(*args: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "tree_attn_backend.cli", "bench", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout)["rows"]


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory) -> tuple[list[dict], object]:
    plots = tmp_path_factory.mktemp("plots")
    return _cli_json(
        # SuffixDecoding's trees: replay (below) replays them without the target at one request
        "e2e",
        "--quick",
        "--repeat",
        "1",
        "--concurrency",
        "1,2",
        "--max-tokens",
        "8",
        "--plot",
        str(plots),
        "--drafter",
        "suffix",
    ), plots


@pytest.mark.engine
def test_bench_e2e_all_modes_through_real_engines(e2e_run):
    rows, plots = e2e_run
    overall = {r["mode"]: r for r in rows if r["category"] == "all" and r["concurrency"] == 2}
    assert sorted(overall) == sorted(MODES)
    categories = {r["category"] for r in rows} - {"all"}
    assert {"summarization", "rag", "translation", "writing"} <= categories
    for r in rows:
        assert set(r) == {"mode", "concurrency", "category", "requests", "repeats", "spread", *METRICS}
        assert r["concurrency"] in (1, 2) and r["tokens_per_s"] > 0 and r["repeats"] == 1
        low, high = r["spread"]["tokens_per_s"]
        assert low <= r["tokens_per_s"] <= high
        assert r["identical_to_baseline"] is True, r  # greedy speculation never changes tokens
    assert overall["none"]["draft_tokens_per_step"] == 0 and overall["none"]["accepted_tokens_per_step"] == 0
    for mode in ("chain", "static_tree", "pruned_tree"):
        assert overall[mode]["draft_tokens_per_step"] > 0, mode
    for mode in ("static_tree", "pruned_tree"):
        assert overall[mode]["expected_accepted_per_step"] > 0, mode
    assert overall["chain"]["expected_accepted_per_step"] is None
    # The same SuffixDecoding chains, verified by the TREE_PRUNED engine's kernels.
    for key in ("draft_tokens_per_step", "accepted_tokens_per_step"):
        assert overall["suffix_packed"][key] == overall["suffix"][key], key
    assert sorted(p.name for p in plots.iterdir()) == [
        "draft_vs_accepted.png",
        "reliability.png",
        "tokens_per_s.png",
        "tpot_cdf.png",
    ]


@pytest.mark.engine
def test_replay_reproduces_the_engines_draft_and_accepted_counts(e2e_run):
    """Offline replay on the stock engine's greedy outputs gives exactly the tree engine's
    per-step draft and accepted tokens at one request (same prompts, same drafter and pruning,
    SuffixDecoding's cache carried from request to request)."""
    rows, _ = e2e_run
    engine = {r["mode"]: r for r in rows if r["category"] == "all" and r["concurrency"] == 1}
    replayed = {
        r["setting"]: r
        for r in _cli_json(
            "replay", "--per-category", "1", "--max-tokens", "8", "--path-probs", "0.1", "--drafter", "suffix"
        )
    }
    assert engine["pruned_tree"]["draft_tokens_per_step"] > 0
    for setting, mode in (("static_tree", "static_tree"), ("defaults", "pruned_tree")):
        assert replayed[setting]["drafter"] == "suffix"
        for key in ("draft_tokens_per_step", "accepted_tokens_per_step"):
            assert replayed[setting][key] == engine[mode][key], (setting, key)


def _request(i: int, category: str, tokens: list[int], steps: int, t0: float) -> dict:
    return {
        "request_id": f"run0-req{i}",
        "index": i,
        "turn": 1,
        "category": category,
        "tokens": tokens,
        "steps": steps,
        "arrival": t0,
        "first_token": t0 + 0.1,
        "last_token": t0 + 0.1 + 0.01 * (len(tokens) - 1),
    }


def test_summarize_rows_by_hand():
    base = [_request(0, "qa", [1, 2, 3, 4], 4, 0.0), _request(1, "rag", [5, 6, 7, 8, 9], 5, 0.0)]
    spec = [_request(0, "qa", [1, 2, 3, 4], 2, 0.0), _request(1, "rag", [5, 6, 7, 8, 0], 3, 0.0)]
    runs = [
        {"mode": "none", "concurrency": 2, "wall_s": 1.0, "counters": {}, "requests": base},
        {"mode": "chain", "concurrency": 2, "wall_s": 0.5, "counters": {"num_draft_tokens": 6}, "requests": spec},
    ]
    rows = summarize(runs)
    chain = next(r for r in rows if r["mode"] == "chain" and r["category"] == "all")
    # 9 tokens in 0.5 s; decode steps (2-1)+(3-1) = 3; accepted (4-2)+(5-3) = 4.
    assert chain["tokens_per_s"] == 18.0 and chain["draft_tokens_per_step"] == 2.0
    assert chain["accepted_tokens_per_step"] == 1.333 and chain["acceptance_rate"] == 0.667
    assert chain["tpot_ms_p50"] == 10.0 and chain["ttft_ms_p50"] == 100.0
    assert chain["identical_to_baseline"] is False
    qa = next(r for r in rows if r["mode"] == "chain" and r["category"] == "qa")
    assert qa["identical_to_baseline"] is True and qa["tokens_per_s"] == 8.0 and qa["draft_tokens_per_step"] is None
    assert ("every greedy row identical_to_baseline", False) in check_targets(rows)
    assert "NO" in format_table(rows)
    assert chain["expected_accepted_per_step"] is None


def test_expected_accepted_per_step_and_its_target_come_from_the_drafters_counts():
    base = [_request(0, "qa", [1, 2, 3, 4, 5], 5, 0.0)]
    tree = [_request(0, "qa", [1, 2, 3, 4, 5], 2, 0.0)]  # 1 decode step, 3 accepted tokens
    counts = {"nodes": [0, 0, 2], "predicted": [0, 0, 2.5], "accepted": [0, 0, 1], "expected": 2.5, "num_accepted": 3}
    runs = [
        {"mode": "none", "concurrency": 1, "wall_s": 1.0, "counters": {}, "requests": base},
        {
            "mode": "pruned_budget",
            "concurrency": 1,
            "wall_s": 0.5,
            "counters": {"num_draft_tokens": 4},
            "calibration": {"lookup": counts},
            "requests": tree,
        },
    ]
    rows = {(r["mode"], r["category"]): r for r in summarize(runs)}
    assert rows[("pruned_budget", "all")]["expected_accepted_per_step"] == 2.5
    assert rows[("pruned_budget", "qa")]["expected_accepted_per_step"] is None
    # Over the run, per drafter: summed over every tree run.
    second = dict(runs[1], calibration={"lookup": dict(counts, expected=3.6, num_accepted=3)})
    totals = calibration_totals([*runs, second])
    assert totals == {"lookup": {"expected": 6.1, "accepted": 6}}
    target = "lookup drafter over the run: expected 6.1 accepted tokens for 6 accepted (1.7%), target <= 10%"
    assert (target, True) in check_targets(list(rows.values()), totals)
    target = "lookup drafter over the run: expected 2.5 accepted tokens for 3 accepted (16.7%), target <= 10%"
    assert (target, False) in check_targets(list(rows.values()), calibration_totals(runs))


def test_targets_against_vllms_peers_and_on_reused_workloads():
    def row(mode: str, concurrency: int, tokens_per_s: float, accepted: float) -> dict:
        return {
            "mode": mode,
            "concurrency": concurrency,
            "category": "all",
            "tokens_per_s": tokens_per_s,
            "accepted_tokens_per_step": accepted,
            "identical_to_baseline": None if mode == "none" else True,
        }

    rows = [
        row("none", 1, 30.0, 0.0),
        row("chain", 1, 32.0, 0.2),
        row("suffix", 1, 34.0, 0.3),
        row("pruned_budget", 1, 37.5, 0.31),
        row("none", 4, 80.0, 0.0),
        row("pruned_budget", 4, 84.0, 0.2),
    ]
    checks = dict(check_targets(rows))
    assert checks["c=1: pruned_budget tokens/s 1.103 x the best of none/chain/suffix (suffix 34.0), target >= 1.10"]
    assert not checks["c=4: pruned_budget tokens/s 1.050 x the best of none (none 80.0), target >= 1.10"]
    assert checks["c=1: pruned_budget accepts 0.31 tokens per step, 1.55 x chain's 0.2, target >= 1.5"]
    assert not checks["c=1: pruned_budget accepts 0.31 tokens per step, 1.03 x suffix's 0.3, target >= 1.2"]
    assert not any("turns" in statement for statement in checks)
    workload = {"prompts": 26, "turns": 2, "repeat_prompts": 1}
    checks = dict(check_targets(rows, workload=workload))
    assert checks["c=1, turns 2: pruned_budget tokens/s 1.103 x suffix, target >= 1.10"]


def test_summarize_takes_medians_over_repetitions():
    base = [_request(0, "qa", [1, 2, 3, 4], 4, 0.0)]
    runs = [
        {"mode": mode, "concurrency": 1, "wall_s": wall, "counters": {}, "requests": requests, "repetition": rep}
        for rep, wall in enumerate((1.0, 2.0, 4.0))
        for mode, requests in (
            ("none", base),
            ("chain", base if rep < 2 else [_request(0, "qa", [1, 2, 3, 5], 2, 0.0)]),
        )
    ]
    rows = {(r["mode"], r["category"]): r for r in summarize(runs)}
    none = rows[("none", "all")]
    assert none["repeats"] == 3 and none["tokens_per_s"] == 2.0 and none["spread"]["tokens_per_s"] == [1.0, 4.0]
    assert rows[("chain", "all")]["identical_to_baseline"] is False  # differs in one repetition of three
    assert "tokens_per_s_range" in format_table(list(rows.values())) and "1.0-4.0" in format_table(list(rows.values()))


def test_bench_e2e_argument_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--modes", "none,tree"])
    with pytest.raises(SystemExit, match="--per-category 0: must be >= 1"):
        main(["bench", "e2e", "--per-category", "0"])
    with pytest.raises(ValueError, match="repeat = 0: must be >= 1"):
        E2EConfig(model="m", prompts=({"category": "qa", "messages": []},), repeat=0)
    with pytest.raises(ValueError, match="must include 'none'"):
        E2EConfig(model="m", prompts=({"category": "qa", "messages": []},), modes=("chain",))
    with pytest.raises(ValueError, match="turns = 3: must be 1 or 2"):
        E2EConfig(model="m", prompts=({"category": "qa", "messages": []},), turns=3)
    with pytest.raises(ValueError, match="repeat_prompts = 0: must be >= 1"):
        E2EConfig(model="m", prompts=({"category": "qa", "messages": []},), repeat_prompts=0)
    bad = tmp_path / "bad.jsonl"
    for line, message in (
        ('{"turns": []}', "not a Spec-Bench record"),
        ('{"category": "qa", "turns": []}', "turns is empty"),
        ('{"category": "qa", "turns": ["hi", 7]}', "turns\\[1\\] must be a non-empty string, got 7"),
    ):
        bad.write_text('{"category": "qa", "turns": ["hi"]}\n' + line + "\n")
        with pytest.raises(ValueError, match=rf"bad.jsonl:2: {message}"):
            load_prompts(bad)


def test_prompts_keep_their_next_turns_and_the_workload_sizes_the_runs(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"category": "qa", "turns": ["hi"]}\n{"category": "math", "turns": ["a", "b"]}\n')
    prompts = load_prompts(path)
    assert [p["next_turns"] for p in prompts] == [[], ["b"]]
    assert prompts[1]["messages"] == [{"role": "user", "content": "a"}]
    config = E2EConfig(model="m", prompts=tuple(prompts), turns=2, repeat_prompts=3)
    assert config.num_requests(1) == 6 and config.num_requests(16) == 16
    assert config.workload == {"prompts": 2, "turns": 2, "repeat_prompts": 3}


def test_suffix_packed_is_vllms_suffix_decoding_on_the_tree_pruned_engine():
    prompts = ({"category": "qa", "messages": [{"role": "user", "content": "hi"}], "next_turns": []},)
    config = E2EConfig(model="m", prompts=prompts, modes=("none", "suffix", "suffix_packed", "pruned_budget"))
    processes = {name: (env, engines) for name, env, engines in _engine_processes(config)}
    assert sorted(processes) == ["none", "suffix", "suffix_packed", "tree"]
    assert processes["suffix"][0] == {} and processes["none"][0] == {}
    assert processes["suffix_packed"][0] == processes["tree"][0] == {"VLLM_ATTENTION_BACKEND": "TREE_PRUNED"}
    for name in ("suffix", "suffix_packed"):
        (engine,) = processes[name][1]
        assert engine["engine"]["speculative_config"] == {"method": "suffix"}
        assert [(r["mode"], r["extra_args"]) for r in engine["runs"]] == [(name, None)] * len(config.concurrency)


def test_a_draft_head_goes_to_the_tree_engine_only(tmp_path):
    prompts = ({"category": "qa", "messages": [{"role": "user", "content": "hi"}], "next_turns": []},)
    with pytest.raises(ValueError, match="draft_head '/no/head': no such file"):
        E2EConfig(model="m", prompts=prompts, draft_head="/no/head")
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"")
    config = E2EConfig(model="m", prompts=prompts, modes=("none", "pruned_budget"), draft_head=str(head))
    engines = {name: engines[0]["engine"] for name, _, engines in _engine_processes(config)}
    assert engines["tree"]["additional_config"]["tree_pruned"]["draft_head"] == str(head.resolve())
    assert "additional_config" not in engines["none"]
    for option in ("auto", None):  # the shipped head for the model (the default), or none
        config = E2EConfig(model="m", prompts=prompts, modes=("none", "pruned_budget"), draft_head=option)
        (tree,) = [engines[0]["engine"] for name, _, engines in _engine_processes(config) if name == "tree"]
        assert tree["additional_config"]["tree_pruned"]["draft_head"] == option


def test_replay_by_hand():
    # Prompt "1 2 3 1 2", greedy output "3 1 2 3 9": after "3" the drafter has seen 3 -> 1 -> 2 -> 3,
    # so a depth-3 chain drafts "1 2 3", all accepted, and 9 is the bonus token: one step.
    chain = {"speculative_token_tree": TreeShape.chain(3).to_text(), "prune_min_prob": 0.0, "prune_path_prob": 0.0}
    setting = ReplaySetting("chain", {**chain, "drafter": "lookup", "drafter_smoothing": 0.5})
    assert replay(setting, [[1, 2, 3, 1, 2]], [[3, 1, 2, 3, 9]]) == (3.0, 3.0)
    # Output "3 7 7 7": "1 2 3" fails (3 drafted); after "7" nothing was ever seen (0 drafted); after
    # "7 7" the drafter guesses "7 7 7" (3 drafted), whose first token matches but the output ends
    # there, so nothing is kept: 3 steps, 6 drafts, 0 accepted.
    assert replay(setting, [[1, 2, 3, 1, 2]], [[3, 7, 7, 7]]) == (2.0, 0.0)
    # With max_tokens 3 the request stops after "3 1 2": after "3" two tokens are left, so the
    # chain stops at "1 2" (2 drafted, 1 kept: "2" is the last token the request emits).
    assert replay(setting, [[1, 2, 3, 1, 2]], [[3, 1, 2]], max_tokens=3) == (2.0, 1.0)


def test_replay_carries_the_suffix_cache_from_request_to_request():
    prompt, output = [5, 6, 7, 8], [10, 11, 12, 13, 14, 15, 16, 17]
    unpruned = {"prune_min_prob": 0.0, "prune_path_prob": 0.0}
    suffix = ReplaySetting("suffix", {**unpruned, "drafter": "suffix"})
    # Alone, nothing in the output repeats: 7 decode steps without a draft.
    assert replay(suffix, [prompt], [output]) == (0.0, 0.0)
    # Sent again, it matches the first answer after its first token ("5 6 7 8 10", 5 tokens):
    # 5 drafts, all accepted, and 16 as the bonus; then "17", the last token, is drafted with no
    # room left to keep it. 7 + 2 steps, 6 drafts, 5 accepted.
    assert replay(suffix, [prompt, prompt], [output, output]) == (6 / 9, 5 / 9)
    # The lookup drafter sees each request's own tokens only.
    assert replay(ReplaySetting("lookup", {**unpruned, "drafter": "lookup"}), [prompt] * 2, [output] * 2) == (0, 0)


@pytest.mark.parametrize(
    ("drafters", "message"),
    [(["hybrid"], "drafter 'hybrid' cannot be replayed"), (["lookups"], "drafter = 'lookups'")],
)
def test_replay_names_a_drafter_it_cannot_replay(drafters, message):
    with pytest.raises(ValueError, match=message):
        replay_settings([0.1], drafters)
    with pytest.raises(SystemExit, match=message):  # before any engine starts
        main(["bench", "replay", "--drafter", ",".join(["lookup", *drafters])])


def test_replay_argument_errors():
    with pytest.raises(ValueError, match=r"prune_path_prob = 2\.0"):
        replay_settings([2.0])
    with pytest.raises(SystemExit, match="--path-probs '0.1,x'"):
        main(["bench", "replay", "--path-probs", "0.1,x"])

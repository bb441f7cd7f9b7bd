"""Tables, target checks and plots of ``tree-pruned bench e2e`` rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tree_attn_backend.bench.e2e import MODES, tpot_ms


def _all_rows(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["mode"], r["concurrency"]): r for r in rows if r["category"] == "all"}


def check_targets(
    rows: list[dict], calibration: dict[str, dict] | None = None, workload: dict | None = None
) -> list[tuple[str, bool]]:
    """The targets, as ``(statement with the measured figures, met)``: pruning (pruned_tree
    against static_tree), the budget against vLLM's peers (not slower than none / chain; 1.10x
    the best of none / chain / suffix at 1 and 4 requests; accepted tokens per step 1.5x chain's
    and 1.2x suffix's at 1 request; with a ``workload`` of several turns or repeated prompts,
    1.10x suffix's tokens/s at 1 request), every drafter's ``calibration`` over the whole run
    (:func:`calibration_totals`) within 10%, and identical greedy tokens. Only targets whose
    modes were run are checked."""
    by = _all_rows(rows)
    checks: list[tuple[str, bool]] = []
    reused = _workload_name(workload) if workload else ""  # "turns 2": earlier outputs come back
    for c in sorted({c for _, c in by}):
        none, static, pruned, budget, chain, suffix = (
            by.get((m, c)) for m in ("none", "static_tree", "pruned_tree", "pruned_budget", "chain", "suffix")
        )
        if static and pruned:
            d_s, d_p = static["draft_tokens_per_step"], pruned["draft_tokens_per_step"]
            a_s, a_p = static["accepted_tokens_per_step"], pruned["accepted_tokens_per_step"]
            fewer = 1 - d_p / d_s if d_s else 0.0
            checks.append(
                (
                    f"c={c}: pruned_tree drafts {fewer:.0%} fewer tokens per step than static_tree ({d_p} vs {d_s}), "
                    f"target >= 30%",
                    fewer >= 0.30,
                )
            )
            lost = 1 - a_p / a_s if a_s else 0.0
            checks.append(
                (
                    f"c={c}: pruned_tree accepts {lost:.1%} fewer tokens per step ({a_p} vs {a_s}), target <= 5%",
                    lost <= 0.05,
                )
            )
            checks.append(
                (
                    f"c={c}: pruned_tree tokens/s {pruned['tokens_per_s']} vs static_tree {static['tokens_per_s']}, "
                    "target not lower",
                    pruned["tokens_per_s"] >= static["tokens_per_s"],
                )
            )
        if budget and none:
            if c <= 4:  # few requests: speculation must pay, against vLLM's own chain too
                best = max((r for r in (none, chain) if r), key=lambda r: r["tokens_per_s"])
                checks.append(
                    (
                        f"c={c}: pruned_budget tokens/s {budget['tokens_per_s']} vs the best of none/chain "
                        f"({best['mode']} {best['tokens_per_s']}), target not lower",
                        budget["tokens_per_s"] >= best["tokens_per_s"],
                    )
                )
                peers = [r for r in (none, chain, suffix) if r]
                best = max(peers, key=lambda r: r["tokens_per_s"])
                ratio = budget["tokens_per_s"] / best["tokens_per_s"]
                checks.append(
                    (
                        f"c={c}: pruned_budget tokens/s {ratio:.3f} x the best of "
                        f"{'/'.join(r['mode'] for r in peers)} ({best['mode']} {best['tokens_per_s']}), target >= 1.10",
                        ratio >= 1.10,
                    )
                )
            else:  # a full batch: drafts rarely pay, the budget must not cost
                ratio = budget["tokens_per_s"] / none["tokens_per_s"]
                checks.append((f"c={c}: pruned_budget tokens/s {ratio:.3f} x none, target >= 0.98", ratio >= 0.98))
        for peer, factor in ((chain, 1.5), (suffix, 1.2)):
            if budget and peer and c == 1:
                ratio = budget["accepted_tokens_per_step"] / max(peer["accepted_tokens_per_step"], 1e-9)
                checks.append(
                    (
                        f"c=1: pruned_budget accepts {budget['accepted_tokens_per_step']} tokens per step, "
                        f"{ratio:.2f} x {peer['mode']}'s {peer['accepted_tokens_per_step']}, target >= {factor}",
                        ratio >= factor,
                    )
                )
        if reused and budget and suffix and c == 1:
            ratio = budget["tokens_per_s"] / suffix["tokens_per_s"]
            checks.append(
                (
                    f"c=1, {reused}: pruned_budget tokens/s {ratio:.3f} x suffix, target >= 1.10",
                    ratio >= 1.10,
                )
            )
    for drafter, total in (calibration or {}).items():
        if total["accepted"]:
            error = abs(total["expected"] - total["accepted"]) / total["accepted"]
            checks.append(
                (
                    f"{drafter} drafter over the run: expected {total['expected']} accepted tokens for "
                    f"{total['accepted']} accepted ({error:.1%}), target <= 10%",
                    error <= 0.10,
                )
            )
    for r in rows:
        if r["category"] == "all" and r["mode"] != "none" and r["identical_to_baseline"] is not None:
            if not r["identical_to_baseline"]:
                checks.append((f"c={r['concurrency']}: {r['mode']} greedy tokens differ from none", False))
    if any(r["identical_to_baseline"] is not None for r in rows):
        checks.append(
            ("every greedy row identical_to_baseline", all(r["identical_to_baseline"] is not False for r in rows))
        )
    return checks


def format_table(rows: list[dict], categories: bool = False) -> str:
    """A fixed-width table of the ``all`` rows (every row with ``categories``); medians, with
    tokens/s's min-max over repetitions in ``tokens_per_s_range``."""
    shown = [r for r in rows if categories or r["category"] == "all"]
    if not shown:
        return "(no rows)"
    keys = [k for k in shown[0] if (categories or k != "category") and k != "spread"]
    cell = lambda v: "-" if v is None else ("yes" if v is True else "NO" if v is False else str(v))  # noqa: E731
    if any(r.get("repeats", 1) > 1 for r in shown):
        shown = [dict(r, tokens_per_s_range="{}-{}".format(*r["spread"]["tokens_per_s"])) for r in shown]
        keys.insert(keys.index("tokens_per_s") + 1, "tokens_per_s_range")
    widths = [max(len(k), *(len(cell(r[k])) for r in shown)) for k in keys]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(cell(r[k]).rjust(w) for k, w in zip(keys, widths)) for r in shown]
    return "\n".join(lines)


def plot(rows: list[dict], runs: list[dict], out_dir: str | Path) -> list[Path]:
    """Write ``tokens_per_s.png``, ``draft_vs_accepted.png``, ``tpot_cdf.png`` and, when tree
    modes ran, ``reliability.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by = _all_rows(rows)
    modes = [m for m in MODES if any(k[0] == m for k in by)]
    levels = sorted({c for _, c in by})
    x = np.arange(len(levels))
    colors = dict(zip(MODES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    paths = []

    def bars_by_concurrency(name: str, shown: list[str], draw, ylabel: str, title: str) -> None:  # noqa: ANN001
        """One bar group per concurrency level, one bar per mode; ``draw(ax, mode, x, width)``."""
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(len(shown), 1)
        for i, mode in enumerate(shown):
            draw(ax, mode, x + i * width, width)
        ax.set_xticks(x + width * (len(shown) - 1) / 2, [str(c) for c in levels])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    def metric(mode: str, key: str) -> list[float]:
        return [(by[(mode, c)][key] or 0) if (mode, c) in by else 0 for c in levels]

    def throughput(ax, mode: str, xs, width: float) -> None:  # noqa: ANN001
        medians = metric(mode, "tokens_per_s")
        spreads = [
            by[(mode, c)]["spread"].get("tokens_per_s", [m, m]) if (mode, c) in by else [m, m]
            for c, m in zip(levels, medians)
        ]
        low_high = np.abs(np.array(spreads).T - np.array(medians))  # error bars: min and max over repetitions
        ax.bar(xs, medians, width, label=mode, color=colors[mode], yerr=low_high, capsize=2)

    def drafted_and_accepted(ax, mode: str, xs, width: float) -> None:  # noqa: ANN001
        ax.bar(xs, metric(mode, "draft_tokens_per_step"), width, color=colors[mode], alpha=0.35)
        ax.bar(xs, metric(mode, "accepted_tokens_per_step"), width, color=colors[mode], label=mode)

    bars_by_concurrency(
        "tokens_per_s.png",
        modes,
        throughput,
        "generated tokens / s",
        "Throughput by mode (median, bars: min-max over repetitions)",
    )
    bars_by_concurrency(
        "draft_vs_accepted.png",
        [m for m in modes if m != "none"],
        drafted_and_accepted,
        "tokens per request-step",
        "Draft tokens verified (light) vs accepted (dark) per step",
    )

    fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 3.6), squeeze=False)
    for ax, c in zip(axes[0], levels):
        for mode in modes:  # every repetition's requests together
            tpot = np.sort(
                [t for run in runs if run["concurrency"] == c and run["mode"] == mode for t in tpot_ms(run["requests"])]
            )
            if tpot.size:
                ax.step(tpot, np.arange(1, tpot.size + 1) / tpot.size, where="post", label=mode, color=colors[mode])
        ax.set_title(f"concurrency {c}")
        ax.set_xlabel("time per output token (ms)")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Latency CDF (TPOT per request)")
    fig.tight_layout()
    paths.append(out / "tpot_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    reliability = reliability_by_drafter(runs)
    if reliability:
        fig, axes = plt.subplots(1, len(reliability), figsize=(max(6.5, 4.2 * len(reliability)), 4.2), squeeze=False)
        for ax, (drafter, by_mode) in zip(axes[0], reliability.items()):
            ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", label="calibrated")
            for mode, counts in by_mode.items():
                nodes = np.array(counts["nodes"])
                seen = nodes > 0
                predicted = np.array(counts["predicted"])[seen] / nodes[seen]
                realised = np.array(counts["accepted"])[seen] / nodes[seen]
                ax.plot(predicted, realised, marker="o", color=colors[mode], label=f"{mode} ({nodes.sum()} nodes)")
            ax.set_title(f"drafter {drafter}")
            ax.set_xlabel("predicted acceptance (calibrated path value)")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("accepted fraction of verified nodes")
        fig.suptitle("Reliability of the drafters' path values (all runs)")
        fig.tight_layout()
        paths.append(out / "reliability.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _workload_name(workload: dict) -> str:
    """The workload's reuse of earlier outputs, e.g. ``"turns 2"`` (empty: every prompt once)."""
    return ", ".join(f"{key} {workload[key]}" for key in ("turns", "repeat_prompts") if workload.get(key, 1) != 1)


def calibration_totals(runs: list[dict]) -> dict[str, dict]:
    """Per drafter, over every tree run (all modes, concurrencies and repetitions): the sum of
    the calibrated predictions of its verified draft nodes (``expected``, accepted tokens the
    calibration promised) and how many the target accepted: ``{drafter: {"expected",
    "accepted"}}``."""
    totals: dict[str, dict] = {}
    for run in runs:
        for drafter, counts in (run.get("calibration") or {}).items():
            total = totals.setdefault(drafter, {"expected": 0.0, "accepted": 0})
            total["expected"] += counts["expected"]
            total["accepted"] += counts["num_accepted"]
    return {name: dict(total, expected=round(total["expected"], 3)) for name, total in totals.items()}


def reliability_by_drafter(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """Every tree run's reliability counts summed per drafter and mode:
    ``{drafter: {mode: {"nodes", "predicted", "accepted"}}}`` (per-bucket lists)."""
    total: dict[str, dict[str, dict]] = {}
    for run in runs:
        for drafter, counts in (run.get("calibration") or {}).items():
            into = total.setdefault(drafter, {}).setdefault(
                run["mode"], {key: [0] * len(counts["nodes"]) for key in ("nodes", "predicted", "accepted")}
            )
            for key in into:
                into[key] = [a + b for a, b in zip(into[key], counts[key])]
    return total

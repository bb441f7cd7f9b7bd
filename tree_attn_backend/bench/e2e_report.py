"""Tables, target checks and plots of ``tree-pruned bench e2e`` rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .e2e import MODES


def _all_rows(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["mode"], r["concurrency"]): r for r in rows if r["category"] == "all"}


def check_targets(rows: list[dict]) -> list[tuple[str, bool]]:
    """The issue's targets, as ``(statement with the measured figures, met)`` per concurrency.
    Only targets whose modes were run are checked."""
    by = _all_rows(rows)
    checks: list[tuple[str, bool]] = []
    for c in sorted({c for _, c in by}):
        none, static, pruned, budget, chain = (by.get((m, c)) for m in ("none", "static_tree", "pruned_tree", "pruned_budget", "chain"))
        if static and pruned:
            d_s, d_p = static["draft_tokens_per_step"], pruned["draft_tokens_per_step"]
            a_s, a_p = static["accepted_tokens_per_step"], pruned["accepted_tokens_per_step"]
            fewer = 1 - d_p / d_s if d_s else 0.0
            checks.append((f"c={c}: pruned_tree drafts {fewer:.0%} fewer tokens per step than static_tree ({d_p} vs {d_s}), "
                           f"target >= 30%", fewer >= 0.30))
            lost = 1 - a_p / a_s if a_s else 0.0
            checks.append((f"c={c}: pruned_tree accepts {lost:.1%} fewer tokens per step ({a_p} vs {a_s}), target <= 5%",
                           lost <= 0.05))
            checks.append((f"c={c}: pruned_tree tokens/s {pruned['tokens_per_s']} vs static_tree {static['tokens_per_s']}, "
                           "target not lower", pruned["tokens_per_s"] >= static["tokens_per_s"]))
        if budget and none:
            ratio = budget["tokens_per_s"] / none["tokens_per_s"]
            checks.append((f"c={c}: pruned_budget tokens/s {ratio:.3f} x none, target >= 0.97", ratio >= 0.97))
            for other in (static, chain):
                if other and other["tokens_per_s"] < none["tokens_per_s"]:
                    checks.append((f"c={c}: {other['mode']} is below none; pruned_budget {budget['tokens_per_s']} vs "
                                   f"{other['mode']} {other['tokens_per_s']}, target above",
                                   budget["tokens_per_s"] > other["tokens_per_s"]))
    for r in rows:
        if r["category"] == "all" and r["mode"] != "none" and r["identical_to_baseline"] is not None:
            if not r["identical_to_baseline"]:
                checks.append((f"c={r['concurrency']}: {r['mode']} greedy tokens differ from none", False))
    if any(r["identical_to_baseline"] is not None for r in rows):
        checks.append(("every greedy row identical_to_baseline",
                       all(r["identical_to_baseline"] is not False for r in rows)))
    return checks


def format_table(rows: list[dict], categories: bool = False) -> str:
    """A fixed-width table of the ``all`` rows (every row with ``categories``)."""
    shown = [r for r in rows if categories or r["category"] == "all"]
    if not shown:
        return "(no rows)"
    keys = [k for k in shown[0] if categories or k != "category"]
    cell = lambda v: "-" if v is None else ("yes" if v is True else "NO" if v is False else str(v))  # noqa: E731
    widths = [max(len(k), *(len(cell(r[k])) for r in shown)) for k in keys]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(cell(r[k]).rjust(w) for k, w in zip(keys, widths)) for r in shown]
    return "\n".join(lines)


def plot(rows: list[dict], runs: list[dict], out_dir: "str | Path") -> list[Path]:
    """Write ``tokens_per_s.png``, ``draft_vs_accepted.png`` and ``tpot_cdf.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by = _all_rows(rows)
    modes = [m for m in MODES if any(k[0] == m for k in by)]
    levels = sorted({c for _, c in by})
    x = np.arange(len(levels))
    width = 0.8 / len(modes)
    colors = dict(zip(MODES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, mode in enumerate(modes):
        ax.bar(x + i * width, [by[(mode, c)]["tokens_per_s"] if (mode, c) in by else 0 for c in levels], width,
               label=mode, color=colors[mode])
    ax.set_xticks(x + width * (len(modes) - 1) / 2, [str(c) for c in levels])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Throughput by mode")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "tokens_per_s.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    spec_modes = [m for m in modes if m != "none"]
    w = 0.8 / max(len(spec_modes), 1)
    for i, mode in enumerate(spec_modes):
        drafted = [by[(mode, c)]["draft_tokens_per_step"] or 0 if (mode, c) in by else 0 for c in levels]
        accepted = [by[(mode, c)]["accepted_tokens_per_step"] if (mode, c) in by else 0 for c in levels]
        ax.bar(x + i * w, drafted, w, color=colors[mode], alpha=0.35)
        ax.bar(x + i * w, accepted, w, color=colors[mode], label=mode)
    ax.set_xticks(x + w * (len(spec_modes) - 1) / 2, [str(c) for c in levels])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("tokens per request-step")
    ax.set_title("Draft tokens verified (light) vs accepted (dark) per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "draft_vs_accepted.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 3.6), squeeze=False)
    for ax, c in zip(axes[0], levels):
        for run in runs:
            if run["concurrency"] != c:
                continue
            tpot = np.sort([(r["last_token"] - r["first_token"]) / (len(r["tokens"]) - 1) * 1e3
                            for r in run["requests"] if len(r["tokens"]) > 1])
            if tpot.size:
                ax.step(tpot, np.arange(1, tpot.size + 1) / tpot.size, where="post", label=run["mode"], color=colors[run["mode"]])
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
    return paths

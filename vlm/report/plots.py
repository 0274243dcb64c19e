"""Matplotlib figures of a grid report; each function saves one PNG and returns its path (or None when the
grid has nothing to draw for it). Scores live on [0, 1] and are drawn on fixed [0, 1] axes, so two reports
compare by eye; error bars are ±2 standard errors over eval items."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vlm.report.collect import Collected  # noqa: E402
from vlm.report.effects import AxisEffect, Estimate  # noqa: E402

# the gap colour scale is symmetric and never narrower than this, so equal scores do not fill the scale with noise
MIN_GAP_SPAN = 0.1


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter_fine_vs_general(data: Collected, summaries: dict[str, dict[str, Estimate]], path: Path) -> Path | None:
    """Fine-grained vs general score per run on [0, 1]², ±2 SE bars; the diagonal marks gap = 0 and the colour
    the gap. Runs are numbered on the plot and named in a key beside it (ids are long and overlap)."""
    ok = [r for r in data.rows if r.id in summaries and {"general", "fine_grained"} <= set(summaries[r.id])]
    if not ok:
        return None
    fig, (ax, key) = plt.subplots(1, 2, figsize=(11, 6), gridspec_kw={"width_ratios": [3, 2]})
    est = [(summaries[r.id]["general"], summaries[r.id]["fine_grained"]) for r in ok]
    gaps = [y.value - x.value for x, y in est]
    span = max(MIN_GAP_SPAN, *(abs(g) for g in gaps))
    ax.errorbar([x.value for x, _ in est], [y.value for _, y in est], xerr=[2 * x.se for x, _ in est],
                yerr=[2 * y.se for _, y in est], fmt="none", ecolor="grey", elinewidth=0.8, zorder=1)
    sc = ax.scatter([x.value for x, _ in est], [y.value for _, y in est], c=gaps, cmap="coolwarm", vmin=-span,
                    vmax=span, s=70, edgecolors="black", zorder=2)
    fig.colorbar(sc, ax=ax, label="gap = fine-grained − general")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="fine-grained = general")
    for i, (x, y) in enumerate(est, 1):
        ax.annotate(str(i), (x.value, y.value), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("general score (mean headline of general tasks)")
    ax.set_ylabel("fine-grained score (mean headline of fine-grained tasks)")
    missing = len(data.rows) - len(ok)
    ax.set_title(f"{data.name}: {len(ok)} runs" + (f", {missing} missing or failed" if missing else ""))
    ax.legend(loc="upper left", fontsize=8)
    key.axis("off")
    lines = [f"{i:>2}  {r.id}" for i, r in enumerate(ok, 1)]
    key.text(0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=max(5, 9 - len(ok) // 12),
             transform=key.transAxes)
    return _save(fig, path)


def axis_effects(effects: list[AxisEffect], path: Path) -> Path | None:
    """Per axis level: its paired effect on fine-grained next to its effect on general, ±2 SE over items."""
    rows = list(dict.fromkeys((e.axis, e.level, e.reference) for e in effects if e.metric in ("fine_grained", "general")))
    if not rows:
        return None
    get = {(e.axis, e.level, e.metric): e for e in effects}
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows) + 2), 4.8))
    w = 0.38
    for j, (metric, label) in enumerate((("fine_grained", "Δ fine-grained"), ("general", "Δ general"))):
        xs, ys, errs = [], [], []
        for i, (axis, level, _) in enumerate(rows):
            e = get.get((axis, level, metric))
            if e is not None:
                xs.append(i + (j - 0.5) * w)
                ys.append(e.effect.value)
                errs.append(2 * e.effect.se)
        ax.bar(xs, ys, w, yerr=errs, capsize=3, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)))
    pairs = {(e.axis, e.level): e.pairs for e in effects}
    ax.set_xticklabels([f"{a}\n{lv} vs {ref}\n({pairs[(a, lv)]} pairs)" for a, lv, ref in rows], fontsize=7)
    ax.set_ylabel("mean paired change in score")
    ax.set_title("axis effects: fine-grained vs general (bars ±2 SE)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def probe_ceiling(pairs: list[dict[str, Any]], path: Path) -> Path | None:
    """Linear-probe accuracy of the vision features next to the VLM's accuracy on the same dataset."""
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(pairs) + 2), 4.5))
    idx = range(len(pairs))
    w = 0.38
    ax.bar([i - w / 2 for i in idx], [p["probe"] or 0.0 for p in pairs], w, label="linear probe (ceiling)", color="grey")
    ax.bar([i + w / 2 for i in idx], [p["vlm"] if p["vlm"] is not None else 0.0 for p in pairs], w, label="VLM")
    ax.set_xticks(list(idx))
    ax.set_xticklabels([f"{p['run']}\n{p['dataset']}" for p in pairs], fontsize=6, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("what the encoder sees vs what the VLM says")
    ax.legend(fontsize=8)
    return _save(fig, path)


def dynamics(data: Collected, path: Path) -> Path | None:
    """Periodic eval scores over training steps: one panel per stage and task, one line per run."""
    runs = [r for r in data.rows if r.dynamics]
    if not runs:
        return None
    metrics = list(dict.fromkeys(k for r in runs for rec in r.dynamics for k in rec if k not in ("step", "stage")))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.8 * len(metrics)), squeeze=False)
    for ax, m in zip(axes[:, 0], metrics):
        for r in runs:
            pts = sorted((rec["step"], rec[m]) for rec in r.dynamics if m in rec)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=r.id)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("headline score")
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=6, loc="best")
    return _save(fig, path)

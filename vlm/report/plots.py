"""Matplotlib figures of a grid report; each function saves one PNG and returns its path (or None when the
grid has nothing to draw for it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlm.report.collect import Collected  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter_fine_vs_general(data: Collected, path: Path) -> Path | None:
    """Fine-grained vs general score per run; the diagonal marks gap = 0, colour encodes the gap."""
    ok = [r for r in data.rows if r.ok and "general" in r.metrics]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(7, 6))
    xs = [r.metrics["general"] for r in ok]
    ys = [r.metrics["fine_grained"] for r in ok]
    gaps = [r.metrics.get("gap", y - x) for r, x, y in zip(ok, xs, ys)]
    span = max(abs(min(gaps)), abs(max(gaps)), 1e-6)  # white = no gap, blue = worse at fine-grained
    sc = ax.scatter(xs, ys, c=gaps, cmap="coolwarm", vmin=-span, vmax=span, s=60, edgecolors="black")
    fig.colorbar(sc, ax=ax, label="gap")
    lo, hi = min(xs + ys), max(xs + ys)
    pad = (hi - lo) * 0.1 or 0.05
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="fine-grained = general")
    for r, x, y in zip(ok, xs, ys):
        ax.annotate(r.id, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    missing = len(data.rows) - len(ok)
    ax.set_xlabel("general score")
    ax.set_ylabel("fine-grained score")
    ax.set_title(f"{data.name}: fine-grained vs general ({len(ok)} runs" + (f", {missing} missing)" if missing else ")"))
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def axis_effects(effects: list[dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars: mean paired change in fine-grained and general score per axis level vs its reference."""
    rows = [e for e in effects if e["fine_grained"] is not None or e["general"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4.5))
    idx = range(len(rows))
    w = 0.38
    fg = [e["fine_grained"] or 0.0 for e in rows]
    gen = [e["general"] or 0.0 for e in rows]
    ax.bar([i - w / 2 for i in idx], fg, w, label="Δ fine-grained")
    ax.bar([i + w / 2 for i in idx], gen, w, label="Δ general")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(idx))
    ax.set_xticklabels([f"{e['axis']}\n{e['level']} vs {e['reference']}\n(n={e['fine_grained_pairs']})" for e in rows],
                       fontsize=7)
    ax.set_ylabel("mean paired change")
    ax.set_title("effect of each axis (other axes held fixed, averaged over them)")
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
    ax.set_ylabel("accuracy")
    ax.set_title("what the encoder sees vs what the VLM says")
    ax.legend(fontsize=8)
    return _save(fig, path)


def dynamics(data: Collected, path: Path) -> Path | None:
    """Periodic eval metrics over training steps, one line per run and metric."""
    runs = [r for r in data.rows if r.dynamics]
    if not runs:
        return None
    metrics = sorted({k for r in runs for rec in r.dynamics for k in rec if k not in ("step", "stage")})
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.6 * len(metrics)), squeeze=False)
    for ax, m in zip(axes[:, 0], metrics):
        for r in runs:
            pts = [(rec["step"], rec[m]) for rec in r.dynamics if m in rec]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=r.id)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=6)
    return _save(fig, path)

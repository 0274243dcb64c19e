"""Axis effects of a grid: paired differences between runs that differ in one factor only."""
from __future__ import annotations

from typing import Any

from vlm.report.collect import Collected, Row


def factor_level(row: Row, factor: list[str]) -> str:
    return "+".join(row.labels[a] for a in factor)


def axis_effects(data: Collected, metrics: tuple[str, ...] = ("fine_grained", "general")) -> list[dict[str, Any]]:
    """For every factor (an axis, or a zipped group of axes) and every non-reference level: the mean paired
    difference level − reference over pairs of finished runs that differ in this factor only."""
    effects = []
    for factor in data.factors:
        levels = list(dict.fromkeys(factor_level(r, factor) for r in data.rows))
        ref = levels[0]
        others = [f for f in data.factors if f is not factor]
        by_context: dict[tuple, dict[str, Row]] = {}
        for r in data.rows:
            ctx = tuple(factor_level(r, f) for f in others)
            by_context.setdefault(ctx, {})[factor_level(r, factor)] = r
        for level in levels[1:]:
            entry: dict[str, Any] = {"axis": "+".join(factor), "level": level, "reference": ref}
            for m in metrics:
                diffs = [pair[level].metrics[m] - pair[ref].metrics[m] for pair in by_context.values()
                         if level in pair and ref in pair and pair[level].ok and pair[ref].ok
                         and m in pair[level].metrics and m in pair[ref].metrics]
                entry[m] = sum(diffs) / len(diffs) if diffs else None
                entry[f"{m}_pairs"] = len(diffs)
            effects.append(entry)
    return effects

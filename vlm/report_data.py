"""Gather a grid dir into rows (one per planned point, whatever its state) and compute axis effects."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.grid import load_plan, point_state
from vlm.grid_exec import read_record
from vlm.io import read_json, read_jsonl

HEADLINE = ("fine_grained", "general", "gap")


@dataclass
class Row:
    id: str
    labels: dict[str, str]
    state: str
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # flat: "fine_grained", "<task>.<metric>", ...
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {dataset, protocol, metric, value}
    dynamics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records holding eval metrics

    @property
    def ok(self) -> bool:
        return self.state == "done" and "fine_grained" in self.metrics


@dataclass
class Collected:
    grid_dir: Path
    name: str
    axes: list[str]
    factors: list[list[str]]
    rows: list[Row]


def flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts as dotted keys (bools and NaN-free numbers only)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix[:-1]] = float(obj)
    return out


def _primary(res: dict[str, Any]) -> tuple[str | None, float | None]:
    """A task's headline metric: its declared `primary_metric`, else the first accuracy-like number."""
    metrics = res.get("metrics", res)
    name = res.get("primary_metric") or res.get("primary")
    if name is None:
        name = next((k for k in ("accuracy", "acc", "top1", "vqa_accuracy", "exact_match", "f1")
                     if isinstance(metrics.get(k), (int, float))), None)
    if name is None:
        name = next((k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
    value = metrics.get(name) if name else None
    return name, (float(value) if isinstance(value, (int, float)) else None)


def _tasks(run_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    eval_dir = run_dir / "eval"
    if not eval_dir.is_dir():
        return out
    for res_path in sorted(eval_dir.glob("*/results.json")):
        res = read_json(res_path)
        task = res_path.parent.name
        metric, value = _primary(res)
        out[task] = {"dataset": res.get("dataset") or task, "protocol": res.get("protocol") or "-",
                     "category": res.get("category") or res.get("group") or "-", "metric": metric, "value": value}
    return out


def _dynamics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records that carry periodic eval results (keys under `eval`)."""
    out = []
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        ev = {k[len("eval/"):]: v for k, v in flatten(rec).items() if k.startswith(("eval/", "eval."))}
        ev = {k.replace("/", "."): v for k, v in ev.items()}
        if ev and "step" in rec:
            out.append({"step": rec["step"], "stage": rec.get("stage"), **ev})
    return out


def collect(grid_dir: str | Path) -> Collected:
    grid_dir = Path(grid_dir)
    plan = load_plan(grid_dir)
    rows = []
    for p in plan["points"]:
        run_dir = grid_dir / p["id"]
        rec = read_record(grid_dir, p["id"])
        row = Row(id=p["id"], labels=p["labels"], state=point_state(grid_dir, p["id"]), error=rec.get("error"))
        if (run_dir / "results.json").exists():
            res = read_json(run_dir / "results.json")
            row.metrics = {k[len("tasks."):] if k.startswith("tasks.") else k: v for k, v in flatten(res).items()}
        row.tasks = _tasks(run_dir)
        row.dynamics = _dynamics(run_dir)
        rows.append(row)
    return Collected(grid_dir=grid_dir, name=plan["name"], axes=plan["axes"], factors=plan["groups"], rows=rows)


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

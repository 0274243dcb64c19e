"""Gather a grid dir into rows: one per planned point, whatever its state, with its metrics and eval tasks."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eval.runner import resolve_task
from vlm.errors import UserError
from vlm.grid.executors import read_record
from vlm.grid.points import load_plan, point_state
from vlm.io import read_json, read_jsonl

HEADLINE = ("fine_grained", "general", "gap")


@dataclass
class Row:
    id: str
    labels: dict[str, str]
    state: str
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # flat: "fine_grained", "<task>.<metric>", ...
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # see `_tasks`
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


# classification metrics per protocol (eval/classification.py): the protocol tables compare these
PROTOCOL_METRICS = {"mc": "mc_acc", "mc_generate": "mc_gen_acc", "open": "open_acc",
                    "likelihood_sum": "likelihood_sum_top1", "likelihood_mean": "likelihood_mean_top1"}


def _task_sources(run_dir: Path) -> dict[str, str]:
    """Task name -> its data source (hf id or path), from the run's recipe, to pair probes with VLM tasks."""
    recipe = run_dir / "recipe.yaml"
    if not recipe.exists():
        return {}
    specs = ((yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("eval") or {}).get("tasks") or []
    out = {}
    for spec in specs:
        try:
            cfg = resolve_task(spec)
        except UserError:
            continue
        out[cfg["name"]] = str(cfg.get("hf") or cfg.get("path") or cfg["name"])
    return out


def _tasks(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Task -> {family, type, headline, score, source, protocols: {protocol: value}} from eval/<task>/results.json."""
    out = {}
    sources = _task_sources(run_dir)
    for res_path in sorted((run_dir / "eval").glob("*/results.json")):
        res = read_json(res_path)
        name = res.get("task") or res_path.parent.name
        metrics = res.get("metrics") or {}
        protocols = {p: float(metrics[m]) for p, m in PROTOCOL_METRICS.items()
                     if isinstance(metrics.get(m), (int, float))} if res.get("family") == "fine_grained" else {}
        out[name] = {"family": res.get("family", "-"), "type": res.get("type", "-"), "headline": res.get("headline"),
                     "score": res.get("score"), "source": sources.get(name, name), "protocols": protocols}
    return out


def _dynamics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records that carry periodic eval results (`{"stage", "step", "eval": {task: score}}`)."""
    out = []
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        ev = {k[len("eval."):]: v for k, v in flatten(rec).items() if k.startswith("eval.")}
        if ev and "step" in rec:
            stage = rec.get("stage") or "-"
            out.append({"step": rec["step"], "stage": stage, **{f"{stage}: {k}": v for k, v in ev.items()}})
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
            row.metrics = {k.removeprefix("tasks.").replace(".metrics.", "."): v for k, v in flatten(res).items()}
        row.tasks = _tasks(run_dir)
        row.dynamics = _dynamics(run_dir)
        rows.append(row)
    return Collected(grid_dir=grid_dir, name=plan["name"], axes=plan["axes"], factors=plan["groups"], rows=rows)

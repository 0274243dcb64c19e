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
from vlm.report.effects import PointScores, TaskScores
from vlm.report.findings import axis_role, stage1_trained_levels

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
    scores: PointScores | None = None  # every task's per-item scores (eval/<task>/item_scores.json)

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
    roles: dict[str, str | None] = field(default_factory=dict)  # factor ("+"-joined axes) -> what it varies
    trained_levels: dict[str, set[str]] = field(default_factory=dict)  # stage1_llm factor -> levels training the LLM
    seed_axis: str | None = None

    @property
    def finished(self) -> list[PointScores]:
        return [r.scores for r in self.rows if r.ok and r.scores is not None]


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
    """Task name -> its data source (hf id or path), to pair probes with VLM tasks: from the config each task
    saved beside its predictions (`eval/<task>/task.json`; a survey point has no recipe), then the run's recipe."""
    out = {}
    for path in sorted((run_dir / "eval").glob("*/task.json")):
        cfg = read_json(path).get("config") or {}
        if cfg.get("name"):
            out[str(cfg["name"])] = str(cfg.get("hf") or cfg.get("path") or cfg["name"])
    recipe = run_dir / "recipe.yaml"
    if not recipe.exists():
        return out
    specs = ((yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("eval") or {}).get("tasks") or []
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


def _stage_logs(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl of the run, plus the log of every stage it reused from the artifact store (that stage was
    trained by another run; its artifact carries its log)."""
    records = list(read_jsonl(run_dir / "metrics.jsonl"))
    own = {r.get("stage") for r in records}
    for link in sorted((run_dir / "stages").glob("*/artifact.json")):
        stage = link.parent.name
        if stage in own:
            continue
        art = Path(read_json(link).get("path", ""))
        records = [*read_jsonl(art / "metrics.jsonl"), *records] if (art / "metrics.jsonl").exists() else records
    return records


def _dynamics(run_dir: Path) -> list[dict[str, Any]]:
    """Records that carry periodic eval results (`{"stage", "step", "eval": {task: score}}`), stage by stage."""
    out = []
    for rec in _stage_logs(run_dir):
        ev = {k[len("eval."):]: v for k, v in flatten(rec).items() if k.startswith("eval.")}
        if ev and "step" in rec:
            stage = rec.get("stage") or "-"
            out.append({"step": rec["step"], "stage": stage, **{f"{stage}: {k}": v for k, v in ev.items()}})
    return out


def task_scores(run_dir: Path) -> dict[str, TaskScores]:
    """Every evaluated task's per-item scores, as the task wrote them; a task without them is an error."""
    out = {}
    for res_path in sorted((run_dir / "eval").glob("*/results.json")):
        path = res_path.parent / "item_scores.json"
        if not path.exists():
            raise UserError(f"{res_path.parent} has results but no item_scores.json (evaluated by an older version); "
                            f"run `vlm eval {run_dir}` again: it reuses the stored predictions and writes them.")
        doc = read_json(path)
        recorded = res_path.parent / "task.json"  # the config it ran with: which data (effects.check_same_data)
        config = (read_json(recorded).get("config") or {}) if recorded.exists() else {}
        out[doc["task"]] = TaskScores(doc["task"], doc["family"], doc["headline"], doc["scores"], config)
    return out


def _first_stage(grid_dir: Path, points: list[dict[str, Any]]) -> str | None:
    for p in points:
        recipe = grid_dir / p["id"] / "recipe.yaml"
        if recipe.exists():
            stages = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("stages") or {}
            return next(iter(stages), None) if isinstance(stages, dict) else None
    return None


def factor_keys(points: list[dict[str, Any]], factors: list[list[str]], factor: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The override keys whose values differ between points that differ in `factor` only, and per level of the
    factor the value of the first such key (to tell a stage-1 freeze policy's levels apart)."""
    others = [f for f in factors if f != factor]
    by_ctx: dict[tuple, list[dict[str, Any]]] = {}
    for p in points:
        by_ctx.setdefault(tuple("+".join(p["labels"][a] for a in f) for f in others), []).append(p)
    keys: list[str] = []
    for group in by_ctx.values():
        for p in group[1:]:
            for k in sorted(set(p["overrides"]) | set(group[0]["overrides"])):
                if p["overrides"].get(k) != group[0]["overrides"].get(k) and k not in keys:
                    keys.append(k)
    values = {}
    for p in points:
        level = "+".join(p["labels"][a] for a in factor)
        hit = next((k for k in keys if k in p["overrides"]), None)
        values.setdefault(level, p["overrides"].get(hit) if hit else None)
    return keys, values


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
        if row.ok:
            row.scores = PointScores(p["id"], p["labels"], task_scores(run_dir))
        rows.append(row)
    data = Collected(grid_dir=grid_dir, name=plan["name"], axes=plan["axes"], factors=plan["groups"], rows=rows)
    first = _first_stage(grid_dir, plan["points"])
    for factor in data.factors:
        name = "+".join(factor)
        keys, values = factor_keys(plan["points"], data.factors, factor)
        data.roles[name] = axis_role(keys, first)
        if data.roles[name] == "seed" and len(factor) == 1:
            data.seed_axis = factor[0]
        if data.roles[name] == "stage1_llm":
            data.trained_levels[name] = stage1_trained_levels(values)
    return data

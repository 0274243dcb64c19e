"""Grid points: expand a grid file, validate and plan every point, launch them, and read their state
(the library side of `vlm grid`, `vlm status` and `vlm validate GRID`).

The grid file format is documented in `vlm/grid/spec.py` and docs/grids.md; how a point runs (locks, records,
logs) in `vlm/grid/executors.py`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from rich.console import Console
from rich.table import Table

from eval.runner import check_recipe_tasks
from vlm.errors import UserError
from vlm.grid.executors import DONE, EVALUATING, FAILED, QUEUED, RUNNING, bookkeeping, is_locked, read_record, run_local, run_point, write_record
from vlm.grid.slurm import submit, task_names
from vlm.grid.spec import Grid, Point, compose_base, load_grid
from vlm.grid.survey import print_survey_plan, survey_plan, write_tasks
from vlm.io import atomic_write_json, atomic_write_text, read_json
from vlm.recipe.keys import stage_keys
from vlm.recipe.schema import load_recipe

ARTIFACT_KEY = "run.artifact_store"


def _override_strings(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def resolve_point(grid: Grid, point: Point):
    """The point's resolved, validated recipe (a DictConfig; its eval tasks checked too); a bad point raises
    UserError naming it."""
    try:
        cfg = load_recipe(grid.base, _override_strings(point.overrides))
        check_recipe_tasks(cfg)
        return cfg
    except UserError as e:
        raise UserError(f"grid {grid.path}, point {point.id}: {e}") from None


def gpus_of(cfg, grid: Grid) -> int:
    """GPUs one SLURM job gives its run: the recipe's `distributed.num_processes` when the schema has it, else
    the grid's `slurm.gpus_per_node`, else 0 (a plain single process, no `accelerate launch`)."""
    dist = cfg.get("distributed") or {}
    return int(dist.get("num_processes") or grid.slurm.get("gpus_per_node") or 0)


def nodes_of(cfg, grid: Grid, pid: str) -> tuple[int, int]:
    """(nodes, processes per node) of one point: `slurm.nodes` (default 1) and, for several nodes, the recipe's
    `distributed.num_processes` (all nodes together) or else the grid's `slurm.gpus_per_node`."""
    nodes = int(grid.slurm.get("nodes") or 1)
    if nodes == 1:
        return 1, gpus_of(cfg, grid) or 1
    total = int(cfg.distributed.num_processes or nodes * int(grid.slurm.get("gpus_per_node") or 1))
    if total % nodes:
        raise UserError(f"grid {grid.path}, point {pid}: distributed.num_processes = {total} is not divisible by "
                        f"slurm.nodes = {nodes}; give every node the same number of processes")
    return nodes, total // nodes


def plan_grid(grid: Grid, grid_dir: Path | None) -> list[dict[str, Any]]:
    """Expand and validate every point; returns plan entries with the resolved recipe's facts."""
    if grid.survey is not None:
        return survey_plan(grid)
    plan = []
    for point in grid.points():
        overrides = dict(point.overrides)
        if grid_dir is not None and ARTIFACT_KEY not in overrides:
            overrides[ARTIFACT_KEY] = str(Path(grid_dir).resolve() / "artifacts")
        cfg = resolve_point(grid, Point(point.id, point.labels, overrides))
        nodes, per_node = nodes_of(cfg, grid, point.id)
        if nodes > 1:  # the recipe records the processes of all nodes: the artifact keys follow the real count
            overrides["distributed.num_processes"] = nodes * per_node
            cfg = resolve_point(grid, Point(point.id, point.labels, overrides))
        plan.append({"id": point.id, "labels": point.labels, "overrides": overrides,
                     "stage_keys": list(stage_keys(cfg)), "gpus": gpus_of(cfg, grid),
                     "num_processes": int(cfg.distributed.num_processes or 0),
                     "nodes": nodes, "procs_per_node": per_node, "eval_tasks": task_names(cfg)})
    return plan


def print_plan(grid: Grid, plan: list[dict[str, Any]], out=None) -> None:
    if grid.survey is not None:
        return print_survey_plan(grid, plan, out)
    console = Console(file=out or sys.stdout, width=160)
    table = Table(title=f"grid {grid.name}: {len(plan)} points (base {grid.base})")
    table.add_column("#", justify="right")
    table.add_column("run id")
    table.add_column("stage-1 artifact")
    table.add_column("shared with")
    first = {}
    for i, p in enumerate(plan):
        key = p["stage_keys"][0] if p["stage_keys"] else "-"
        first.setdefault(key, []).append(i)
    for i, p in enumerate(plan):
        key = p["stage_keys"][0] if p["stage_keys"] else "-"
        others = [str(j) for j in first[key] if j != i]
        table.add_row(str(i), p["id"], key[:12], ", ".join(others) or "-")
    console.print(table)
    n_keys = len(first)
    console.print(f"stage 1 is trained {n_keys} time(s) for {len(plan)} points")


def validate_grid(path: str | Path) -> None:
    """`vlm validate GRID`: check the grid and every point's recipe, print points and shared stage-1 artifacts."""
    grid = load_grid(path)
    print_plan(grid, plan_grid(grid, None))


def prepare_grid_dir(grid: Grid, grid_dir: Path, plan: list[dict[str, Any]]) -> None:
    """Write grid.yaml and the plan; refuse when an existing point's overrides changed (its run dir would mix)."""
    plan_file = bookkeeping(grid_dir) / "plan.json"
    if plan_file.exists():
        old = {p["id"]: p["overrides"] for p in read_json(plan_file)["points"]}
        for p in plan:
            if p["id"] in old and json.loads(json.dumps(old[p["id"]])) != json.loads(json.dumps(p["overrides"])):
                raise UserError(
                    f"grid dir {grid_dir}: point {p['id']} was launched with different settings than {grid.path} now "
                    "gives it; launch into a new --out, or delete that point's run dir and its _grid/points record")
        kept = [p for p in read_json(plan_file)["points"] if p["id"] not in {q["id"] for q in plan}]
        plan = plan + kept
    copy = dict(grid.raw)
    if grid.survey is None:
        bases = grid.raw["base"] if isinstance(grid.raw["base"], list) else [grid.raw["base"]]
        copy["base"] = [str((grid.path.parent / str(b)).resolve()) for b in bases]
        if len(bases) == 1:
            copy["base"] = copy["base"][0]
    else:  # the points run `vlm eval --tasks-file` on the survey's task list
        tasks_file = write_tasks(grid, bookkeeping(grid_dir) / "survey_tasks.yaml")
        for p in plan:
            p["survey"] = {**p["survey"], "tasks_file": tasks_file}
    atomic_write_text(grid_dir / "grid.yaml", yaml.safe_dump(copy, sort_keys=False))
    atomic_write_json(plan_file, {"name": grid.name, "source": str(grid.path.resolve()),
                                  "base": str(grid.base) if grid.base else None,
                                  "axes": list(grid.axes), "groups": grid.groups, "points": plan})


def launch(grid_path: str | Path, out: str | Path | None = None, *, executor: str = "local", workers: int | None = None,
           cli: Sequence[str] | None = None, slurm_cluster: str = "slurm", echo=print):
    """Run (or submit) every point not yet done. `cli` replaces `python -m vlm` (tests inject stand-ins);
    `slurm_cluster` is submitit's cluster name ("debug"/"local" run jobs on this machine)."""
    grid = load_grid(grid_path)
    grid_dir = Path(out) if out else Path("runs") / grid.name
    grid_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(grid.raw.get("base"), list):  # keep the composed base inside the grid dir, next to grid.yaml
        grid.base = compose_base([(grid.path.parent / str(b)).resolve() for b in grid.raw["base"]], bookkeeping(grid_dir))
    plan = plan_grid(grid, grid_dir)
    prepare_grid_dir(grid, grid_dir, plan)
    todo = [p for p in plan if read_record(grid_dir, p["id"]).get("state") != DONE]
    echo(f"grid {grid.name}: {len(plan)} points, {len(plan) - len(todo)} done, {len(todo)} to run -> {grid_dir}")
    if executor == "local":
        return run_local(grid_dir, [p["id"] for p in todo], workers or grid.workers, cli, echo=echo)
    if executor == "slurm":
        return submit(grid, grid_dir, todo, cli, cluster=slurm_cluster, echo=echo)
    raise UserError(f"unknown executor {executor!r}; use local or slurm")


# ---------------------------------------------------------------- status


def point_state(grid_dir: Path, pid: str) -> str:
    """pending | queued | running | interrupted | evaluating | failed | done."""
    rec = read_record(grid_dir, pid)
    state = rec.get("state")
    if is_locked(grid_dir, pid):
        return RUNNING
    if state in (DONE, FAILED, QUEUED, EVALUATING):
        return state
    if state == RUNNING or (grid_dir / pid / "status.json").exists():
        return "interrupted"
    return "pending"


def load_plan(grid_dir: str | Path) -> dict[str, Any]:
    grid_dir = Path(grid_dir)
    plan_file = bookkeeping(grid_dir) / "plan.json"
    if not plan_file.exists():
        raise UserError(f"{grid_dir} is not a grid dir (no _grid/plan.json); create one with `vlm grid GRID --out {grid_dir}`")
    return read_json(plan_file)

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

import submitit
import yaml
from rich.console import Console
from rich.table import Table

from eval.runner import check_recipe_tasks
from vlm.errors import UserError
from vlm.grid.executors import DONE, FAILED, QUEUED, RUNNING, bookkeeping, is_locked, read_record, run_local, run_point, write_record
from vlm.grid.spec import Grid, Point, compose_base, load_grid
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


def plan_grid(grid: Grid, grid_dir: Path | None) -> list[dict[str, Any]]:
    """Expand and validate every point; returns plan entries with the resolved recipe's facts."""
    plan = []
    for point in grid.points():
        overrides = dict(point.overrides)
        if grid_dir is not None and ARTIFACT_KEY not in overrides:
            overrides[ARTIFACT_KEY] = str(Path(grid_dir).resolve() / "artifacts")
        cfg = resolve_point(grid, Point(point.id, point.labels, overrides))
        plan.append({"id": point.id, "labels": point.labels, "overrides": overrides,
                     "stage_keys": list(stage_keys(cfg)), "gpus": gpus_of(cfg, grid),
                     "num_processes": int(cfg.distributed.num_processes or 0)})
    return plan


def print_plan(grid: Grid, plan: list[dict[str, Any]], out=None) -> None:
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
    bases = grid.raw["base"] if isinstance(grid.raw["base"], list) else [grid.raw["base"]]
    copy = dict(grid.raw, base=[str((grid.path.parent / str(b)).resolve()) for b in bases])
    if len(bases) == 1:
        copy["base"] = copy["base"][0]
    atomic_write_text(grid_dir / "grid.yaml", yaml.safe_dump(copy, sort_keys=False))
    atomic_write_json(plan_file, {"name": grid.name, "source": str(grid.path.resolve()), "base": str(grid.base),
                                  "axes": list(grid.axes), "groups": grid.groups, "points": plan})


def launch(grid_path: str | Path, out: str | Path | None = None, *, executor: str = "local", workers: int | None = None,
           cli: Sequence[str] | None = None, slurm_cluster: str = "slurm", echo=print):
    """Run (or submit) every point not yet done. `cli` replaces `python -m vlm` (tests inject stand-ins);
    `slurm_cluster` is submitit's cluster name ("debug"/"local" run jobs on this machine)."""
    grid = load_grid(grid_path)
    grid_dir = Path(out) if out else Path("runs") / grid.name
    grid_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(grid.raw["base"], list):  # keep the composed base inside the grid dir, next to grid.yaml
        grid.base = compose_base([(grid.path.parent / str(b)).resolve() for b in grid.raw["base"]], bookkeeping(grid_dir))
    plan = plan_grid(grid, grid_dir)
    prepare_grid_dir(grid, grid_dir, plan)
    todo = [p for p in plan if read_record(grid_dir, p["id"]).get("state") != DONE]
    echo(f"grid {grid.name}: {len(plan)} points, {len(plan) - len(todo)} done, {len(todo)} to run -> {grid_dir}")
    if executor == "local":
        return run_local(grid_dir, [p["id"] for p in todo], workers or grid.workers, cli, echo=echo)
    if executor == "slurm":
        return submit_slurm(grid, grid_dir, todo, cli, cluster=slurm_cluster, echo=echo)
    raise UserError(f"unknown executor {executor!r}; use local or slurm")


GENERIC_SLURM = {"name", "timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node", "stderr_to_stdout"}


def submit_slurm(grid: Grid, grid_dir: Path, todo: list[dict[str, Any]], cli, *, cluster: str, echo=print) -> list:
    """One submitit job per point; each job runs `run_point` (train under `accelerate launch` with the recipe's
    GPU count, then eval). Points whose job is still pending or running are not submitted again."""
    jobs = []
    folder = bookkeeping(grid_dir) / "slurm" / "%j"
    for p in todo:
        rec = read_record(grid_dir, p["id"])
        if rec.get("state") == QUEUED and cluster == "slurm" and _slurm_alive(folder, rec.get("job_id")):
            echo(f"skip  {p['id']} (job {rec['job_id']} is queued)")
            continue
        if is_locked(grid_dir, p["id"]):
            echo(f"skip  {p['id']} (running elsewhere)")
            continue
        ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
        params = {"name": f"{grid.name}/{p['id']}", "nodes": 1, "tasks_per_node": 1, "gpus_per_node": p["gpus"]}
        for k, v in grid.slurm.items():
            params[k if k in GENERIC_SLURM or k.startswith("slurm_") else f"slurm_{k}"] = v
        ex.update_parameters(**params)
        job = ex.submit(run_point, str(grid_dir.resolve()), p["id"], list(cli) if cli else None, p["gpus"])
        write_record(grid_dir, p["id"], state=QUEUED, job_id=str(job.job_id))
        echo(f"submitted {p['id']} as job {job.job_id}")
        jobs.append(job)
    return jobs


def _slurm_alive(folder: Path, job_id: str | None) -> bool:
    if not job_id:
        return False
    state = submitit.SlurmJob(folder=folder, job_id=job_id).state
    return state in {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "UNKNOWN"}


# ---------------------------------------------------------------- status


def point_state(grid_dir: Path, pid: str) -> str:
    """pending | queued | running | interrupted | failed | done."""
    rec = read_record(grid_dir, pid)
    state = rec.get("state")
    if is_locked(grid_dir, pid):
        return RUNNING
    if state in (DONE, FAILED, QUEUED):
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

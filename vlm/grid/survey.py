"""Survey grids: existing models (HF VLMs, our run dirs, zoo pairs) evaluated on the same tasks, no training.

```yaml
name: survey
survey:
  tasks: [flowers102, pets, vqav2, pope]     # eval tasks, as in a recipe's eval.tasks
  limit: 500                                 # optional: the first N items of each task
  batch_size: 8                              # optional: items per forward / generate call
axes:
  model:                                     # the one axis (its key is `model`): label -> a load_vlm spec
    values:
      llava-1.5-7b: hf:llava-hf/llava-1.5-7b-hf
      ours-clip: runs/fgk/enc=clip-l336,llm=vicuna-7b,pt=llava558k,s1llm=unfrozen
exclude: [{model: ours-clip}]                # optional, as in any grid
workers: 1                                   # optional, as in any grid; and slurm: {...}
```

A point is `vlm eval --model SPEC --tasks <the tasks> --out GRID_DIR/<id>`; `vlm status` and `vlm report`
treat the grid like any other (the report's fine-grained vs general table, one row per model). A relative
run-dir spec is taken from the directory `vlm grid` runs in and stored absolute in the plan.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from rich.console import Console
from rich.table import Table

from eval.runner import check_tasks
from vlm.config import Positive, check
from vlm.errors import UserError
from vlm.io import atomic_write_text

SURVEY_KEYS: dict[str, Any] = {"tasks": list, "limit": Optional[Positive], "batch_size": Optional[Positive]}
SPEC_PREFIXES = ("hf:", "hf-llava:", "zoo:")
# grid fields that set recipe keys, meaningless without a recipe; slurm_eval splits a trained run's eval tasks
# into jobs of their own (a survey point is one eval job already)
NOT_IN_SURVEY = ("base", "set", "points", "zip", "slurm_eval")


def parse_survey(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The checked `survey:` section of a grid file (and the grid's other fields checked against it)."""
    where = f"grid {path}: survey"
    section = raw.get("survey")
    if not isinstance(section, dict):
        raise UserError(f"{where}: expected a mapping with `tasks` (and optionally `limit`, `batch_size`)")
    try:
        section = check(section, SURVEY_KEYS, "survey")
    except UserError as e:
        raise UserError(f"grid {path}: {e}") from None
    if not section["tasks"]:
        raise UserError(f"{where}.tasks is empty; list the eval tasks every model is evaluated on")
    bad = [k for k in NOT_IN_SURVEY if raw.get(k)]
    if bad:
        raise UserError(f"grid {path}: a survey grid trains nothing and has no recipe, so {bad} do not apply; "
                        "its one axis `model` lists the models")
    axes = raw.get("axes") or {}
    if list(axes) != ["model"] or (axes["model"] or {}).get("key", "model") != "model":
        raise UserError(f"grid {path}: a survey grid has exactly one axis, `model` (label -> model spec), "
                        f"got axes {list(axes)}")
    return {"tasks": list(section["tasks"]), "limit": section.get("limit"), "batch_size": section.get("batch_size")}


def check_model_spec(spec: Any, where: str) -> str:
    """A model spec as `vlm eval --model` takes it; a local path (run dir, recipe) is made absolute."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{where}: a model spec is a string (hf:<hub id or dir>, hf-llava:..., a run dir, a recipe "
                        f"or zoo:<encoder>+zoo:<llm>), got {spec!r}")
    if spec.startswith(SPEC_PREFIXES):
        return spec
    return str(Path(spec).expanduser().resolve())


def model_source(spec: str) -> str:
    """What a spec names, for the plan table (a run dir not there yet is listed, not an error: it may be training)."""
    if spec.startswith("hf:"):
        return "HF image-text-to-text" + (" (local)" if Path(spec[3:]).is_dir() else " (hub id)")
    if spec.startswith("hf-llava:"):
        return "HF LLaVA as our VLM"
    if spec.startswith("zoo:"):
        return "zoo pair (untrained connector)"
    path = Path(spec)
    if path.is_dir():
        return "run dir" if (path / "recipe.yaml").exists() else "dir without recipe.yaml"
    if path.is_file():
        return "recipe (untrained connector)"
    return "not found yet"


def eval_command(cli: list[str], point: dict[str, Any], run_dir: Path) -> list[str]:
    """`vlm eval --model SPEC --tasks-file FILE --out RUN_DIR` for a survey point of the plan."""
    survey = point["survey"]
    cmd = [*cli, "eval", "--model", point["overrides"]["model"], "--tasks-file", survey["tasks_file"],
           "--out", str(run_dir)]
    if survey.get("limit"):
        cmd += ["--limit", str(survey["limit"])]
    if survey.get("batch_size"):
        cmd += ["--batch-size", str(survey["batch_size"])]
    return cmd


def survey_plan(grid: Any) -> list[dict[str, Any]]:
    """Plan entries of a survey grid's points: tasks checked (no data read), model specs checked; no training."""
    check_tasks(grid.survey["tasks"], "survey.tasks")
    gpus = int(grid.slurm.get("gpus_per_node") or 0)
    plan = []
    for point in grid.points():
        spec = check_model_spec(point.overrides["model"], f"grid {grid.path}: axes.model.values.{point.labels['model']}")
        plan.append({"id": point.id, "labels": point.labels, "overrides": {"model": spec}, "stage_keys": [],
                     "gpus": gpus, "num_processes": 0, "nodes": 1, "procs_per_node": gpus,
                     "eval_tasks": [], "survey": {k: v for k, v in grid.survey.items() if k != "tasks"}})
    return plan


def print_survey_plan(grid: Any, plan: list[dict[str, Any]], out: Any = None) -> None:
    console = Console(file=out or sys.stdout, width=160)
    table = Table(title=f"survey {grid.name}: {len(plan)} models, {len(grid.survey['tasks'])} tasks, no training")
    for col in ("#", "run id", "model", "what it is"):
        table.add_column(col)
    for i, p in enumerate(plan):
        spec = p["overrides"]["model"]
        table.add_row(str(i), p["id"], spec, model_source(spec))
    console.print(table)


def write_tasks(grid: Any, path: Path) -> str:
    """The survey's task specs as one YAML list (`vlm eval --tasks-file`); returns the path."""
    atomic_write_text(path, yaml.safe_dump(list(grid.survey["tasks"]), sort_keys=False))
    return str(path.resolve())

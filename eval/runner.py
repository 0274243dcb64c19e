"""Run eval tasks on a model and gather results (the library side of `vlm eval`, see `vlm.cli.eval`).

    vlm eval RUN_DIR                                   # the tasks of RUN_DIR/recipe.yaml `eval.tasks`
    vlm eval RUN_DIR --tasks flowers102,pope           # other tasks, results into the run dir
    vlm eval --model hf-llava:DIR --tasks pope --out DIR

A task is a dict `{type, name, ...}`, the name of a recipe `recipes/eval/<name>.yaml`, or a dict
`{recipe: <name>, <overrides>}`. Outputs: `OUT/eval/<task>/{predictions.jsonl, results.json}` and
`OUT/results.json` = {tasks: {name: {family, headline, score, metrics}}, fine_grained, general, gap}.
`gap = fine_grained - general` (negative when the model is worse at fine-grained classification
than at general VQA, the usual case).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from eval.base import SINGLE, TASKS, Shard, Task
from vlm.errors import UserError
from vlm.io import atomic_write_json, read_json
from vlm.recipe.schema import plain

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "eval"


def _load_yaml(path: Path) -> Any:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def resolve_task(spec: str | dict[str, Any], _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A task spec → its full config dict (recipe names looked up in recipes/eval/).

    A task file may itself be `{recipe: <name>, <overrides>}` (e.g. `{recipe: pets, hf: /local/dir}`): it is
    resolved like the same dict given inline, the file's keys overriding the recipe's. A spec with another `type`
    than its recipe's takes from the recipe only the keys its own type accepts (a probe on a classification set).
    """
    if isinstance(spec, str):
        spec = {"recipe": spec}
    spec = dict(spec)
    if "recipe" in spec:
        ref = str(spec.pop("recipe"))
        path = Path(ref) if ref.endswith((".yaml", ".yml")) else RECIPE_DIR / f"{ref}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
            raise UserError(f"eval task recipe {ref!r} not found ({path}); known: {', '.join(known)}.")
        key = str(path.resolve())
        if key in _seen:
            raise UserError(f"eval task recipe {path} refers back to itself through `recipe:` ({' -> '.join(_seen)}).")
        base = _load_yaml(path)
        if not isinstance(base, dict):
            raise UserError(f"eval task file {path} must hold one task mapping ({{type: ...}} or {{recipe: ...}}), "
                            f"not a {type(base).__name__}.")
        if "recipe" in base:
            base = resolve_task(base, (*_seen, key))
        base.setdefault("name", path.stem)
        if "type" in spec and spec["type"] != base.get("type"):
            # another task on the recipe's data (`{recipe: flowers102, type: linear_probe}`): the recipe's keys the
            # new type does not take (its protocol settings) stay behind; the spec's own keys are all checked
            schema = getattr(TASKS.get(spec["type"]), "config_schema", None)
            if schema is not None:
                base = {k: v for k, v in base.items() if k in schema()}
        spec = {**base, **spec}
    if "type" not in spec:
        raise UserError(f"eval task {spec!r} has no 'type'; name a recipe or give `type:`.")
    spec.setdefault("name", spec["type"])
    return spec


def build_task(cfg: dict[str, Any], where: str | None = None) -> Task:
    """A task from its config, checked against its task's schema; every module of the `eval` package registers its
    tasks (a new task is one new file). `where`: the config's path, named in error messages."""
    return TASKS.build(cfg, where)


def check_tasks(specs: Sequence[str | dict[str, Any]], where: str = "eval.tasks",
                limit: int | None = None) -> list[Task]:
    """Resolve and build every task spec (no data is read): an unknown task, a misspelt or ill-typed key, or a
    repeated name is a `UserError` naming the spec's path (`eval.tasks[1].protocls`)."""
    tasks = []
    for i, spec in enumerate(specs):
        try:
            cfg = resolve_task(spec)
        except UserError as e:
            raise UserError(f"{where}[{i}]: {e}") from None
        tasks.append(build_task(cfg if limit is None else {**cfg, "limit": limit}, f"{where}[{i}]"))
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{where}: eval task names must be unique; repeated: {dup}. Give each a distinct `name`.")
    return tasks


def check_recipe_tasks(cfg: Mapping[str, Any]) -> None:
    """A recipe's `eval.tasks` and `eval.quick_tasks`, checked before training (`check_tasks`)."""
    for key in ("tasks", "quick_tasks"):
        check_tasks(plain(cfg["eval"][key]), f"eval.{key}")


def summarize(tasks: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Mean headline score of the fine-grained classification tasks and of the general VQA tasks."""
    def mean(family: str) -> float | None:
        vals = [t["score"] for t in tasks.values() if t.get("family") == family]
        return sum(vals) / len(vals) if vals else None

    fg, gen = mean("fine_grained"), mean("general")
    return {"fine_grained": fg, "general": gen, "gap": fg - gen if fg is not None and gen is not None else None}


def evaluate(model: Any, tasks_cfg: Sequence[str | dict[str, Any]], out_dir: str | Path, *, batch_size: int = 8,
             limit: int | None = None, overwrite: bool = False, shard: Shard = SINGLE) -> dict[str, Any]:
    """Evaluate `model` on every task, resuming from predictions already in `out_dir/eval/<task>/`.

    With a `shard` of several processes, every process calls this: each predicts its slice of every task
    (`Task.run`), rank 0 merges, scores and writes `results.json`. A task with its own `run` (the linear probe)
    runs on rank 0 alone while the others wait."""
    out_dir = Path(out_dir)
    tasks = check_tasks(tasks_cfg, limit=limit)
    results_path = out_dir / "results.json"
    results = read_json(results_path) if results_path.exists() else {}
    results.setdefault("tasks", {})
    for task in tasks:
        task_dir = out_dir / "eval" / task.name
        if type(task).run is Task.run:
            res = task.run(model, task_dir, batch_size=batch_size, overwrite=overwrite, shard=shard)
        else:
            if shard.main:
                task.run(model, task_dir, batch_size=batch_size, overwrite=overwrite)
            shard.barrier()
            res = read_json(task_dir / "results.json")
        results["tasks"][task.name] = {k: res[k] for k in ("type", "family", "headline", "score", "num_items", "metrics")}
        results.update(summarize(results["tasks"]))
        if shard.main:
            atomic_write_json(results_path, results)
    return results

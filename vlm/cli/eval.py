"""`vlm eval RUN_DIR [--tasks a,b]` or `vlm eval --model SPEC --tasks a,b --out DIR` (see `eval.runner`).

Under `accelerate launch` or torchrun every process loads the model onto its own device and predicts its own slice
of each task's items (`eval.base.Shard`); rank 0 merges the predictions and writes the results. A relaunch with any
number of processes resumes from what is there.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState

from eval.base import Shard
from eval.runner import evaluate
from vlm.errors import UserError
from vlm.loading import load_vlm


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", help="a run dir (model, eval.tasks of its recipe.yaml, output)")
    parser.add_argument("--model", help="a model spec for load_vlm (hf:<dir or hub id>, hf-llava:<dir>, a recipe, zoo:<name>)")
    parser.add_argument("--tasks", help="comma-separated task recipe names (recipes/eval/*.yaml) or YAML files")
    parser.add_argument("--tasks-file", help="a YAML file holding a list of task specs (as a recipe's eval.tasks)")
    parser.add_argument("--out", help="output dir (default: the run dir)")
    parser.add_argument("--batch-size", type=int, default=8, help="items per forward / generate call, per process")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier predictions of these tasks")


def run(args: argparse.Namespace) -> int:
    if bool(args.run_dir) == bool(args.model):
        raise UserError("give either a RUN_DIR or --model SPEC (not both, not neither): "
                        "`vlm eval RUN_DIR` or `vlm eval --model SPEC --tasks a,b --out DIR`.")
    tasks: list[Any]
    if args.tasks and args.tasks_file:
        raise UserError("give --tasks or --tasks-file, not both.")
    if args.tasks_file:
        path = Path(args.tasks_file)
        tasks = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        if not isinstance(tasks, list) or not tasks:
            raise UserError(f"--tasks-file {path}: expected a YAML file holding a non-empty list of task specs "
                            "(recipe names or mappings, as a recipe's eval.tasks).")
    elif args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    elif args.run_dir:
        recipe = Path(args.run_dir) / "recipe.yaml"
        if not recipe.exists():
            raise UserError(f"{args.run_dir} has no recipe.yaml; is it a run dir? Or pass --tasks.")
        tasks = list(((yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("eval") or {}).get("tasks") or [])
        if not tasks:
            raise UserError(f"{recipe} lists no `eval: {{tasks: [...]}}`; pass --tasks a,b.")
    else:
        raise UserError("--model needs --tasks a,b (task recipe names from recipes/eval/) or --tasks-file FILE.")
    out = args.out or args.run_dir
    if not out:
        raise UserError("--model needs --out DIR for the results.")
    # the process group under accelerate launch / torchrun (gloo on CPU: `cpu=True` is what makes accelerate read
    # torchrun's env there); else one process
    state = PartialState(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise UserError(f"launched as {launched} processes but accelerate formed a group of {state.num_processes}; "
                        "each would evaluate every item. Launch with `accelerate launch` or torchrun.")
    shard = Shard(state.process_index, state.num_processes, state.wait_for_everyone)
    model = load_vlm(args.run_dir or args.model)
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    if isinstance(module, torch.nn.Module):
        module.to(state.device)
    results = evaluate(model, tasks, out, batch_size=args.batch_size, limit=args.limit, overwrite=args.overwrite,
                       shard=shard)
    if not shard.main:
        return 0
    for name, t in results["tasks"].items():
        print(f"{name:24s} {t['headline']:>22s} = {t['score']:.4f}")
    for key in ("fine_grained", "general", "gap"):
        if results.get(key) is not None:
            print(f"{key:24s} {'':>22s}   {results[key]:.4f}")
    return 0

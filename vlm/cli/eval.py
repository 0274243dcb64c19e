"""`vlm eval RUN_DIR [--tasks a,b]` or `vlm eval --model SPEC --tasks a,b --out DIR` (see `eval.runner`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from eval.runner import evaluate
from vlm.errors import UserError
from vlm.loading import load_vlm


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", help="a run dir (model, eval.tasks of its recipe.yaml, output)")
    parser.add_argument("--model", help="a model spec for load_vlm (hf-llava:<dir>, a recipe, zoo:<name>)")
    parser.add_argument("--tasks", help="comma-separated task recipe names (recipes/eval/*.yaml) or YAML files")
    parser.add_argument("--out", help="output dir (default: the run dir)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier predictions of these tasks")


def run(args: argparse.Namespace) -> int:
    if bool(args.run_dir) == bool(args.model):
        raise UserError("give either a RUN_DIR or --model SPEC (not both, not neither): "
                        "`vlm eval RUN_DIR` or `vlm eval --model SPEC --tasks a,b --out DIR`.")
    tasks: list[Any]
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    elif args.run_dir:
        recipe = Path(args.run_dir) / "recipe.yaml"
        if not recipe.exists():
            raise UserError(f"{args.run_dir} has no recipe.yaml; is it a run dir? Or pass --tasks.")
        tasks = list(((yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("eval") or {}).get("tasks") or [])
        if not tasks:
            raise UserError(f"{recipe} lists no `eval: {{tasks: [...]}}`; pass --tasks a,b.")
    else:
        raise UserError("--model needs --tasks a,b (task recipe names from recipes/eval/).")
    out = args.out or args.run_dir
    if not out:
        raise UserError("--model needs --out DIR for the results.")
    model = load_vlm(args.run_dir or args.model)
    results = evaluate(model, tasks, out, batch_size=args.batch_size, limit=args.limit, overwrite=args.overwrite)
    for name, t in results["tasks"].items():
        print(f"{name:24s} {t['headline']:>22s} = {t['score']:.4f}")
    for key in ("fine_grained", "general", "gap"):
        if results.get(key) is not None:
            print(f"{key:24s} {'':>22s}   {results[key]:.4f}")
    return 0

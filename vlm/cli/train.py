"""`vlm train RECIPE [key=value ...] [--out RUN_DIR]`: run a recipe's stages into a run dir (run again to resume)."""
from __future__ import annotations

import argparse
from pathlib import Path

from vlm.recipe.schema import load_recipe
from vlm.train.steps import train


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.seed=1 stages.align.max_steps=10")
    parser.add_argument("--out", help="run dir (default: <run.out_root>/<run.name>); run again to resume")


def run(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    run_dir = Path(args.out) if args.out else Path(cfg.run.out_root) / cfg.run.name
    train(cfg, run_dir)
    print(f"run dir: {run_dir}")
    return 0

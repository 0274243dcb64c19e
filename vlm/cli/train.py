"""`vlm train RECIPE [key=value ...] [--out RUN_DIR]`: run a recipe's stages into a run dir (run again to resume)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm.recipe.schema import load_recipe
from vlm.train import stop
from vlm.train.steps import train


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.seed=1 stages.align.max_steps=10")
    parser.add_argument("--out", help="run dir (default: <run.out_root>/<run.name>); run again to resume")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip the recipe's eval.tasks after training (evaluate later: `vlm eval RUN_DIR`)")


def run(args: argparse.Namespace) -> int:
    stop.install_handler()  # SIGUSR2 (SLURM's warning signal): checkpoint at the next step, exit STOPPED_EXIT_CODE
    cfg = load_recipe(args.recipe, args.overrides)
    run_dir = Path(args.out) if args.out else Path(cfg.run.out_root) / cfg.run.name
    try:
        train(cfg, run_dir, evaluate=not args.no_eval)
    except stop.Stopped as e:
        print(f"{e}; run the same command again to resume", file=sys.stderr)
        return stop.STOPPED_EXIT_CODE
    finally:
        stop.ignore_signal()  # a late signal must not kill the process while it exits
    print(f"run dir: {run_dir}")
    return 0

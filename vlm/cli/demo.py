"""`vlm demo [--quick] [--seeds N] [--out DIR] [--dry-run]`: the README's main job (see `vlm.world.demo`)."""
from __future__ import annotations

import argparse
import sys

from vlm.world.demo import dry_run, make_plan, run_plan


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="fewer training steps and eval items (recipes/demo/quick.yaml): about a third of the time")
    parser.add_argument("--out", help="grid dir (default runs/demo, or runs/demo-quick with --quick); "
                        "run again with the same --out to continue")
    parser.add_argument("--workers", type=int, default=1,
                        help="grid points run at the same time (default 1: on 2 CPU cores more only adds contention)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train every point with seeds 0..N-1 (N x the time) and test each axis effect against "
                             "the seed-to-seed spread as well as the item noise (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and the grid's points; run nothing")


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args.quick, args.out, args.workers, args.seeds)
    if args.dry_run:
        dry_run(plan)
        return 0
    sys.stdout.reconfigure(line_buffering=True)
    return run_plan(plan)

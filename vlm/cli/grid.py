"""`vlm grid GRID [--out GRID_DIR] [--executor local|slurm] [--workers N] [--dry-run]`: run every point of a grid."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm.grid.executors import FAILED
from vlm.grid.points import launch, validate_grid
from vlm.grid.spec import load_grid


def grid_path(arg: str) -> Path:
    p = Path(arg)
    return p / "grid.yaml" if p.is_dir() else p


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", help="grid YAML (or an existing grid dir, to continue it)")
    parser.add_argument("--out", help="grid dir (default runs/<grid name>); run again with the same --out to resume")
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--workers", type=int, default=None,
                        help="local executor: points run at the same time (default: the grid file's `workers:`, else 1)")
    parser.add_argument("--dry-run", action="store_true", help="list the points and shared stage-1 artifacts; run nothing")


def run(args: argparse.Namespace) -> int:
    path = grid_path(args.grid)
    if args.dry_run:
        validate_grid(path)
        return 0
    out = args.out or (Path(args.grid) if Path(args.grid).is_dir() else None)
    result = launch(path, out, executor=args.executor, workers=args.workers)
    if args.executor == "local":
        failed = [k for k, v in result.items() if v == FAILED]
        if failed:
            print(f"{len(failed)} point(s) failed; see `vlm status {out or 'runs/' + load_grid(path).name}`", file=sys.stderr)
        return 1 if failed else 0
    return 0

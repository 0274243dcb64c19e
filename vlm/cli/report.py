"""`vlm report GRID_DIR`: write results.csv, report.md, report.html and plots/*.png into the grid dir."""
from __future__ import annotations

import argparse

from vlm.report.render import build_report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid_dir", help="a grid dir made by `vlm grid`")


def run(args: argparse.Namespace) -> int:
    out = build_report(args.grid_dir)
    for name, path in out.items():
        print(f"{name:>24}: {path}")
    return 0

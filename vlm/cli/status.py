"""`vlm status GRID_DIR`: the state, stage, step and headline scores of every point of a grid dir."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlm.grid.executors import DONE, FAILED, QUEUED, RUNNING, read_record
from vlm.grid.points import load_plan, point_state
from vlm.io import read_json


def _progress(run_dir: Path) -> tuple[str, str]:
    path = run_dir / "status.json"
    if not path.exists():
        return "-", "-"
    st = read_json(path)
    step = st.get("step")
    total = st.get("total_steps") or st.get("max_steps")
    return str(st.get("stage") or "-"), (f"{step}/{total}" if step is not None and total else str(step if step is not None else "-"))


def _headline(run_dir: Path) -> dict[str, float | None]:
    path = run_dir / "results.json"
    res = read_json(path) if path.exists() else {}
    return {k: res.get(k) for k in ("fine_grained", "general", "gap")}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid_dir", help="a grid dir made by `vlm grid`")


def run(args: argparse.Namespace) -> int:
    grid_dir = Path(args.grid_dir)
    plan = load_plan(grid_dir)
    table = Table(title=f"grid {plan['name']} ({grid_dir})")
    for col in ("run id", "state", "stage", "step", "fine-grained", "general", "gap", "note"):
        table.add_column(col)
    colours = {DONE: "green", FAILED: "red", RUNNING: "cyan", "interrupted": "yellow", "evaluating": "blue"}
    counts: dict[str, int] = {}
    for p in plan["points"]:
        state = point_state(grid_dir, p["id"])
        counts[state] = counts.get(state, 0) + 1
        stage, step = _progress(grid_dir / p["id"])
        head = _headline(grid_dir / p["id"])
        rec = read_record(grid_dir, p["id"])
        note = rec.get("error") or rec.get("note") or (f"job {rec['job_id']}" if state == QUEUED else "")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(p["id"], f"[{colours.get(state, 'white')}]{state}[/]", stage, step,
                      fmt(head["fine_grained"]), fmt(head["general"]), fmt(head["gap"]), note or "")
    console = Console(width=200)
    console.print(table)
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0

"""Grid cost: a grid run by `vlm grid` (shared stage-1 artifacts + frozen-encoder feature cache) against the same
points run independently (each point its own artifact store, feature cache off, nothing shared).

Both sides run the same points with the same recipes, one point at a time, as child processes (`vlm train` then,
when training did not evaluate, `vlm eval`), so the comparison is end to end: process start, model loading,
training, eval. Repetitions alternate the order of the two sides. Reported per side: wall time, CPU time of the
whole process tree (RUSAGE_CHILDREN: less disturbed by other jobs on a shared machine), how many stage-1
trainings ran, and the feature cache's hits/misses summed over every stage of every point.

    .venv/bin/python benchmarks/grid_cost.py                                   # benchmarks/grids/grid_cost.yaml
    .venv/bin/python benchmarks/grid_cost.py --grid recipes/grids/demo.yaml --set stages.align.max_steps=8 ...
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GRID = ROOT / "benchmarks" / "grids" / "grid_cost.yaml"


def _cpu_tree() -> float:
    """CPU seconds of this process plus every child (and their waited-for descendants) so far."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def derived_grid(src: Path, dest: Path, extra: dict[str, Any]) -> Path:
    """A copy of grid `src` at `dest` with its base made absolute and `extra` added to `set:`."""
    raw = yaml.safe_load(src.read_text())
    bases = raw["base"] if isinstance(raw["base"], list) else [raw["base"]]
    abs_bases = [str((src.parent / b).resolve()) for b in bases]
    raw["base"] = abs_bases if isinstance(raw["base"], list) else abs_bases[0]
    raw["set"] = {**(raw.get("set") or {}), **extra}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def stage_names(grid_path: Path) -> list[str]:
    from vlm.grid.points import resolve_point
    from vlm.grid.spec import load_grid

    grid = load_grid(grid_path)
    cfg = resolve_point(grid, grid.points()[0])
    return [n for n, st in cfg["stages"].items() if st["enabled"]]


def run_shared(grid_path: Path, work: Path, extra: dict[str, Any]) -> list[Path]:
    """`vlm grid` (one worker): shared artifact store GRID_DIR/artifacts and one feature cache for all points."""
    from vlm.grid.points import launch

    src = derived_grid(grid_path, work / "grid_src.yaml", {**extra, "run.feature_cache_dir": str(work / "features")})
    out = launch(src, work / "grid", workers=1, echo=lambda m: print(f"  [shared] {m}", flush=True))
    failed = [k for k, v in out.items() if v != "done"]
    if failed:
        raise SystemExit(f"shared side: points {failed} did not finish; see {work / 'grid' / '_grid' / 'logs'}")
    return [work / "grid" / pid for pid in out]


def run_independent(grid_path: Path, work: Path, extra: dict[str, Any]) -> list[Path]:
    """Every point as its own `vlm train` (+ `vlm eval`), artifact store inside its run dir, feature cache off."""
    from vlm.grid.executors import default_cli, point_commands
    from vlm.grid.points import plan_grid
    from vlm.grid.spec import load_grid

    off = {f"stages.{n}.feature_cache": False for n in stage_names(grid_path)}
    src = derived_grid(grid_path, work / "grid_src.yaml", {**extra, **off})
    grid = load_grid(src)
    dirs = []
    for p in plan_grid(grid, None):  # no grid dir: no shared run.artifact_store, each run uses RUN_DIR/artifacts
        print(f"  [independent] start {p['id']}", flush=True)
        run_dir = work / "runs" / p["id"]
        log = work / "logs" / f"{p['id']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        for step, cmd in point_commands(work / "runs", {**p, "base": str(grid.base)}, default_cli()):
            if step == "eval" and (run_dir / "results.json").exists():
                break
            with open(log, "a") as f:
                rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if rc != 0:
                raise SystemExit(f"independent side: {step} of {p['id']} exited {rc}; see {log}")
        dirs.append(run_dir)
    return dirs


def run_facts(run_dirs: list[Path]) -> dict[str, int]:
    """Stage-1 trainings run, all stage trainings run, feature-cache hits/misses (last logged value per stage)."""
    facts = {"stage1_trained": 0, "stages_trained": 0, "hits": 0, "misses": 0}
    for d in run_dirs:
        stages = json.loads((d / "manifest.json").read_text())["stages"]
        first = next(iter(stages.values()))
        facts["stage1_trained"] += int(bool(first["trained"]))
        facts["stages_trained"] += sum(int(bool(s["trained"])) for s in stages.values())
        last: dict[str, dict] = {}
        for line in (d / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "feature_cache_hits" in rec:
                last[rec["stage"]] = rec
        facts["hits"] += sum(r["feature_cache_hits"] for r in last.values())
        facts["misses"] += sum(r["feature_cache_misses"] for r in last.values())
    return facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=Path, default=DEFAULT_GRID)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe override for every point on both sides (YAML value), repeatable")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of each side, alternating which goes first")
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the child processes (0 = default)")
    ap.add_argument("--work", type=Path, default=None, help="where run dirs go (default: a temp dir, deleted)")
    args = ap.parse_args()
    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    extra = _parse_set(args.set)
    root = args.work or Path(tempfile.mkdtemp(prefix="grid_cost_"))
    print("machine:", json.dumps(machine()))
    print(f"grid: {args.grid}  extra overrides: {extra}  child threads: {args.threads or 'default'}  work: {root}")

    sides = {"shared (vlm grid: stage-1 artifacts + feature cache)": run_shared,
             "independent (own artifact store, no feature cache)": run_independent}
    results: dict[str, dict] = {n: {"wall": [], "cpu": [], "load": []} for n in sides}
    names = list(sides)
    for r in range(args.reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            work = root / f"rep{r}" / ("shared" if name.startswith("shared") else "independent")
            print(f"rep {r}: {name}", flush=True)
            load0 = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), _cpu_tree()
            dirs = sides[name](args.grid, work, extra)
            wall, cpu = time.perf_counter() - t0, _cpu_tree() - c0
            res = results[name]
            res["wall"].append(wall)
            res["cpu"].append(cpu)
            res["load"].append((load0 + os.getloadavg()[0]) / 2)
            res["facts"] = run_facts(dirs)
            res["points"] = len(dirs)
            print(f"  wall {wall:.1f} s, CPU {cpu:.1f} s, {res['facts']}", flush=True)

    rows = []
    for name, res in results.items():
        f = res["facts"]
        rows.append([name, res["points"], statistics.median(res["wall"]), min(res["wall"]), max(res["wall"]),
                     statistics.median(res["cpu"]), f["stage1_trained"], f["stages_trained"], f["hits"], f["misses"],
                     statistics.median(res["load"])])
    print(table(["side", "points", "median wall s", "min", "max", "CPU s (tree)", "stage-1 trainings",
                 "stage trainings", "cache hits", "cache misses", "load avg"], rows))
    shared, indep = (results[n] for n in names)
    ratio = statistics.median(shared["wall"]) / statistics.median(indep["wall"])
    cpu_ratio = statistics.median(shared["cpu"]) / statistics.median(indep["cpu"])
    print(f"shared / independent: wall {ratio:.3f}, CPU time {cpu_ratio:.3f} (goal <= 0.6 wall)")
    if args.work is None:
        shutil.rmtree(root, ignore_errors=True)
    print(f"RATIO grid_cost_shared_over_independent={ratio:.3f} cpu={cpu_ratio:.3f}")


if __name__ == "__main__":
    main()

"""`vlm demo [--quick] [--out DIR]`: the README's main job, end to end on one machine.

    1. `vlm zoo prepare dinov2-s efficientnet-lite0 smollm2-135m-instruct`   (a no-op once the cache is ready)
    2. `vlm data synth` — the generated world the demo recipes name            (cached outside the repo)
    3. `vlm grid recipes/grids/demo.yaml --out runs/demo`                      (local executor; done points skipped)
    4. `vlm report runs/demo`                                                  (report.md, report.html, plots/)

then a summary: every point's scores with their standard errors, and every axis's paired difference with its
standard error and seed noise — the report's own statistics (`summary_markdown`, docs/demo.md).
`--quick` runs the same grid on `recipes/demo/quick.yaml` (fewer steps and eval items) into runs/demo-quick.
`--seeds N` adds a `seed` axis (run.seed 0..N-1): every point is trained N times, and the summary measures the
seed-to-seed spread and marks an axis effect only when it exceeds both the item noise and the seed noise.
Each step prints what it does and how long it took; the grid step shows every running point's stage and step.
"""
from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from vlm.errors import UserError
from vlm.grid.points import launch, plan_grid, print_plan
from vlm.grid.spec import load_grid
from vlm.io import atomic_write_json, atomic_write_text, read_json, read_jsonl
from vlm.report.collect import collect
from vlm.report.render import build_report, md_table, summary_tables
from vlm.world.synth.world import synth_dir
from vlm.world.zoo.catalogue import get_entry, prepare_entry

ROOT = Path(__file__).resolve().parents[2]
GRID = ROOT / "recipes" / "grids" / "demo.yaml"
QUICK_BASE = ROOT / "recipes" / "demo" / "quick.yaml"
ZOO_ENTRIES = ("dinov2-s", "efficientnet-lite0", "smollm2-135m-instruct")
SEED_AXIS = "seed"
WORLD = {"preset": "quick", "seed": 0}  # the world the demo recipes name as `${synth_world:quick,0}`


@dataclass
class Plan:
    """What `vlm demo` will do; `steps` are (name, description) in order."""

    quick: bool
    out: Path
    grid: Path  # the grid file launched (demo.yaml, or a derived copy written into out: quick base / seed axis)
    workers: int
    seeds: int = 1
    steps: list[tuple[str, str]] = field(default_factory=list)


def _demo_name(quick: bool, seeds: int) -> str:
    """`demo`, `demo-quick`, `demo-2seeds`, ...: the default out dir and the derived grid's name."""
    return "demo" + ("-quick" if quick else "") + (f"-{seeds}seeds" if seeds > 1 else "")


def make_plan(quick: bool = False, out: str | Path | None = None, workers: int = 1, seeds: int = 1) -> Plan:
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}.")
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}.")
    name = _demo_name(quick, seeds)
    out = Path(out) if out else Path("runs") / name
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another --out.")
    grid = out / f"{name.replace('-', '_')}.yaml" if (quick or seeds > 1) else GRID
    plan = Plan(quick=quick, out=out, grid=grid, workers=workers, seeds=seeds)
    plan.steps = [
        ("zoo", f"vlm zoo prepare {' '.join(ZOO_ENTRIES)}"),
        ("data", f"vlm data synth (preset {WORLD['preset']}, seed {WORLD['seed']}) into the synth cache"),
        ("grid", f"vlm grid {grid} --out {out} --workers {workers}"),
        ("report", f"vlm report {out}"),
    ]
    return plan


def derived_grid_text(quick: bool = False, seeds: int = 1) -> str:
    """recipes/grids/demo.yaml on the quick recipe and/or with a `seed` axis (0..seeds-1); paths made absolute
    so the copy runs from any directory."""
    raw = yaml.safe_load(GRID.read_text(encoding="utf-8"))
    raw["name"] = _demo_name(quick, seeds)
    raw["base"] = str(QUICK_BASE if quick else (GRID.parent / raw["base"]).resolve())
    if seeds > 1:
        raw["axes"][SEED_AXIS] = {"values": {str(s): {"run.seed": s} for s in range(seeds)}}
    flags = " ".join(f for f, on in (("--quick", quick), (f"--seeds {seeds}", seeds > 1)) if on)
    return f"# written by `vlm demo {flags}`: derived from recipes/grids/demo.yaml\n" + yaml.safe_dump(raw, sort_keys=False)


# ---------------------------------------------------------------- steps


def step_zoo(echo: Callable[[str], None]) -> None:
    for name in ZOO_ENTRIES:
        prepare_entry(get_entry(name), log=lambda m: echo(f"  {m}"))


def step_data(echo: Callable[[str], None]) -> Path:
    world = synth_dir({**WORLD, "cache_dir": None})
    echo(f"  world: {world}")
    return world


def point_progress(run_dir: Path) -> tuple[float, str] | None:
    """(fraction done, what it is doing) of one grid point, from its recipe, status and step log; None before it
    starts. Each enabled stage and the final evaluation count as equal parts (their steps within a stage)."""
    try:
        st = read_json(run_dir / "status.json")
        stages = [n for n, v in (yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}).get("stages", {}).items()
                  if (v or {}).get("enabled", True)]
    except (OSError, ValueError, AttributeError):
        return None
    parts = len(stages) + 1
    if st.get("state") == "done":
        return 1.0, "done"
    where = st.get("stage") or "-"
    if where == "eval":
        return (parts - 1) / parts, "evaluating"
    if where not in stages:
        return 0.0, where
    step = 0
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        if rec.get("stage") == where and "loss" in rec:
            step = int(rec["step"])
    total = int(st.get("total_steps") or 0)
    frac = (stages.index(where) + (step / total if total else 0.0)) / parts
    return frac, f"{where} {step}/{total}" if total else where


def watch_points(grid_dir: Path, stop: threading.Event, echo: Callable[[str], None], every: float = 15.0) -> None:
    """Every `every` seconds: each running point's stage and step, and the whole grid's progress with an ETA
    (elapsed time scaled by what is left; points are assumed to cost alike)."""
    t0 = time.time()
    last = ""
    while not stop.wait(every):
        plan_file = grid_dir / "_grid" / "plan.json"
        if not plan_file.exists():
            continue
        ids = [p["id"] for p in read_json(plan_file)["points"]]
        prog = {i: point_progress(grid_dir / i) for i in ids}
        done = sum(p[0] for p in prog.values() if p)
        running = [f"{i}: {p[1]}" for i, p in prog.items() if p and p[0] < 1]
        frac = done / len(ids) if ids else 0.0
        elapsed = time.time() - t0
        eta = f", ETA {_mmss(elapsed * (1 - frac) / frac)}" if frac > 0.01 else ""
        line = f"  [{_mmss(elapsed)}] grid {100 * frac:.0f}% ({sum(1 for p in prog.values() if p and p[0] >= 1)}/" \
               f"{len(ids)} points done{eta})" + ("; " + "; ".join(running) if running else "")
        if line.split("] ", 1)[1] != last:
            last = line.split("] ", 1)[1]
            echo(line)


def step_grid(plan: Plan, echo: Callable[[str], None]) -> dict[str, str]:
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.grid != GRID:
        atomic_write_text(plan.grid, derived_grid_text(plan.quick, plan.seeds))
    stop = threading.Event()
    watcher = threading.Thread(target=watch_points, args=(plan.out, stop, echo), daemon=True)
    watcher.start()
    try:
        outcome = launch(plan.grid, plan.out, executor="local", workers=plan.workers, echo=lambda m: echo(f"  {m}"))
    finally:
        stop.set()
        watcher.join(timeout=1)
    return outcome


def step_report(plan: Plan, echo: Callable[[str], None]) -> dict[str, Path]:
    files = build_report(plan.out)
    for name, path in files.items():
        echo(f"  {name}: {path}")
    return files


# ---------------------------------------------------------------- the summary: the report's statistics


def summary_markdown(grid_dir: Path) -> str:
    """Every point's scores ± SE, the seed noise, and every axis's paired effects against both noises — the same
    tables `vlm report` writes (`vlm.report.render.summary_tables`), without the per-dataset detail."""
    if not (Path(grid_dir) / "_grid" / "plan.json").exists():
        return "no grid plan found; nothing to summarise.\n"
    return "\n".join(md_table(t) for t in summary_tables(collect(grid_dir)))


def _cpu_s() -> float:
    """CPU seconds used by this process and its finished children: on a busy shared machine, CPU time / cores
    estimates the wall time the same work takes on an idle one (docs/demo.md)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _mmss(s: float) -> str:
    return f"{int(s) // 60:02d}:{int(s) % 60:02d}"


def run_plan(plan: Plan, echo: Callable[[str], None] = print) -> int:
    """Run every step of the plan; write `OUT/demo_timings.json`; return 1 if a grid point failed."""
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t_all, c_all = time.time(), _cpu_s()
    outcome: dict[str, str] = {}
    for i, (name, desc) in enumerate(plan.steps, 1):
        echo(f"[{i}/{len(plan.steps)}] {desc}")
        t0, c0 = time.time(), _cpu_s()
        if name == "zoo":
            step_zoo(echo)
        elif name == "data":
            step_data(echo)
        elif name == "grid":
            outcome = step_grid(plan, echo)
        elif name == "report":
            step_report(plan, echo)
        timings[name] = round(time.time() - t0, 1)
        cpu[name] = round(_cpu_s() - c0, 1)
        echo(f"      {name} took {_mmss(timings[name])} (CPU time {cpu[name]:.0f} s)")
    timings["total"] = round(time.time() - t_all, 1)
    cpu["total"] = round(_cpu_s() - c_all, 1)
    record = {"quick": plan.quick, "workers": plan.workers, "timings_s": timings, "cpu_s": cpu,
              "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "finished": time.time()}
    history = plan.out / "demo_timings.json"
    prior = read_json(history).get("runs", []) if history.exists() else []
    atomic_write_json(history, {"runs": [*prior, record]})
    summary = summary_markdown(plan.out)
    atomic_write_text(plan.out / "demo_summary.md", summary)
    echo("")
    echo(summary)
    echo(f"demo finished in {_mmss(timings['total'])}: {plan.out / 'report.md'}, {plan.out / 'report.html'}, "
         f"{plan.out / 'demo_summary.md'}")
    failed = [k for k, v in outcome.items() if v == "failed"]
    if failed:
        echo(f"{len(failed)} point(s) failed: see `vlm status {plan.out}` and {plan.out / '_grid' / 'logs'}")
        return 1
    return 0


def dry_run(plan: Plan, echo: Callable[[str], None] = print) -> None:
    """Print the plan's steps and the grid's points (with shared stage-1 artifacts); run nothing."""
    for i, (_, desc) in enumerate(plan.steps, 1):
        echo(f"[{i}/{len(plan.steps)}] {desc}")
    with tempfile.TemporaryDirectory() as tmp:
        path = plan.grid
        if path != GRID:
            path = Path(tmp) / plan.grid.name
            path.write_text(derived_grid_text(plan.quick, plan.seeds), encoding="utf-8")
        grid = load_grid(path)
        print_plan(grid, plan_grid(grid, None))

"""Running grid points: one point = `vlm train` then `vlm eval` on its run dir, guarded by a file lock
(the SLURM side, with requeue, multi-node training and eval jobs, is `vlm.grid.slurm`).

Grid dir layout (bookkeeping lives in `_grid/`, run dirs are `GRID_DIR/<point id>/`):

    grid.yaml                 copy of the grid file (with `base` made absolute, so it can be launched again)
    _grid/plan.json           every point: id, axis labels, recipe overrides
    _grid/points/<id>.json    the point's launcher record: state, attempts, error, log tail, job id
    _grid/locks/<id>.lock     held while a process runs the point (two launchers never run it twice)
    _grid/logs/<id>.log       stdout+stderr of train and eval, appended per attempt
    _grid/events.jsonl        start / done / failed / requeued / preempted / interrupted / trained / eval_done events
                              with host and pid (an audit trail)
    _grid/stop/<id>           created to make the point's trainer stop with a checkpoint (SLURM's warning signal,
                              SIGTERM)
    artifacts/                shared stage artifacts (`run.artifact_store`): points sharing stage 1 train it once
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

from filelock import FileLock, Timeout

from vlm.grid.survey import eval_command
from vlm.io import append_jsonl, atomic_write_json, read_json
from vlm.train.stop import STOP_FILE_ENV, STOPPED_EXIT_CODE

LOG_TAIL_LINES = 40
DONE, FAILED, RUNNING, QUEUED = "done", "failed", "running", "queued"
EVALUATING = "evaluating"  # trained; its eval tasks run as jobs of their own (grid `slurm_eval`)


def default_cli() -> list[str]:
    return [sys.executable, "-m", "vlm"]


def bookkeeping(grid_dir: Path) -> Path:
    return Path(grid_dir) / "_grid"


def record_path(grid_dir: Path, pid: str) -> Path:
    return bookkeeping(grid_dir) / "points" / f"{pid}.json"


def lock_path(grid_dir: Path, pid: str) -> Path:
    return bookkeeping(grid_dir) / "locks" / f"{pid}.lock"


def log_path(grid_dir: Path, pid: str) -> Path:
    return bookkeeping(grid_dir) / "logs" / f"{pid}.log"


def read_record(grid_dir: Path, pid: str) -> dict[str, Any]:
    path = record_path(grid_dir, pid)
    return read_json(path) if path.exists() else {}


def write_record(grid_dir: Path, pid: str, **fields: Any) -> dict[str, Any]:
    rec = {**read_record(grid_dir, pid), **fields}
    atomic_write_json(record_path(grid_dir, pid), rec)
    return rec


def is_locked(grid_dir: Path, pid: str) -> bool:
    """True when some process (here or on another host sharing the filesystem) is running the point."""
    lock = FileLock(lock_path(grid_dir, pid))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def _die_with_parent() -> None:
    """Child-side hook: get SIGKILL when the launching process dies, so a killed launcher leaves no orphan."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child_setup() -> None:
    """Child-side hook of `run_child`: die with the parent, lead a process group (so `stop_child` reaches every
    process of a launcher such as torchrun), and ignore SIGUSR2 until the trainer installs its handler: SLURM
    signals every process of a job step, and a launcher must not die of the trainer's stop signal."""
    _die_with_parent()
    os.setpgid(0, 0)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def record_event(grid_dir: Path, pid: str, event: str, **fields: Any) -> None:
    """Append to `_grid/events.jsonl` (the audit trail: start, done, failed, requeued, preempted, eval_done, ...)."""
    append_jsonl(bookkeeping(grid_dir) / "events.jsonl", {"point": pid, "event": event, "time": time.time(),
                                                           "host": socket.gethostname(), "process": os.getpid(), **fields})


def stop_file(grid_dir: Path, pid: str) -> Path:
    """The point's stop file (`vlm.train.stop`): created to make its trainer stop with a checkpoint."""
    return bookkeeping(grid_dir) / "stop" / pid


def train_command(grid_dir: Path, point: dict[str, Any], cli: Sequence[str], gpus: int = 0,
                  launcher: Sequence[str] = (), evaluate: bool = True) -> list[str]:
    """`vlm train BASE key=value ... --out GRID_DIR/<id>` for one point of the plan: under `launcher` (a torchrun
    prefix for one node of a multi-node training, see `vlm.grid.slurm.node_launcher`) when given, else under
    `accelerate launch` with `gpus` processes when gpus > 0 (on a free rendezvous port, so points running side by
    side on one machine do not collide); `--no-eval` when its eval tasks run elsewhere. Under a launcher, `cli`
    minus its interpreter is the program (`-m vlm`, or a script)."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in point["overrides"].items()]
    args = ["train", point["base"], *overrides, "--out", str(Path(grid_dir) / point["id"]),
            *([] if evaluate else ["--no-eval"])]
    program = list(cli[1:]) if len(cli) > 1 else ["-m", "vlm"]
    if launcher:
        return [*launcher, *program, *args]
    if gpus > 0:
        return [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if gpus > 1 else []),
                "--num_processes", str(gpus), "--num_machines", "1", "--main_process_port", str(_free_port()),
                *program, *args]
    return [*cli, *args]


def point_commands(grid_dir: Path, point: dict[str, Any], cli: Sequence[str], gpus: int = 0,
                   launcher: Sequence[str] = (), evaluate: bool = True) -> list[tuple[str, list[str]]]:
    """`train` (see `train_command`) and, unless `evaluate` is false, `eval` for one point of the plan; a survey
    grid's point is its `eval` alone (`vlm.grid.survey`)."""
    if point.get("survey"):
        return [("eval", eval_command(list(cli), point, Path(grid_dir) / point["id"]))]
    train = ("train", train_command(grid_dir, point, cli, gpus, launcher, evaluate))
    return [train, ("eval", [*cli, "eval", str(Path(grid_dir) / point["id"])])] if evaluate else [train]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])


_CHILD: dict[str, Any] = {}  # the child `run_child` is waiting for: step, process, stop file


def run_child(step: str, cmd: Sequence[str], log: Path, stop: Path | None) -> int:
    """Run `cmd` with output appended to `log`; returns its exit code. `stop_child` (called from a signal handler
    while this waits) can stop it: through `stop` (the trainer's stop file) for `train`, by SIGTERM otherwise."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if stop is not None:
        stop.parent.mkdir(parents=True, exist_ok=True)
        stop.unlink(missing_ok=True)  # a request to an earlier attempt
        env[STOP_FILE_ENV] = str(stop)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_child_setup)
    _CHILD.update(step=step, proc=proc, stop=stop)
    try:  # os.waitpid, not Popen.wait: stop_child may reap the child from a signal handler interrupting this wait
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        _CHILD.clear()
    return proc.returncode


def ask_child_to_stop() -> None:
    """Ask the child `run_child` is waiting for to end, without waiting: a trainer gets its stop file (it ends at its
    next step boundary with a checkpoint), any other step SIGTERM."""
    if not _CHILD:
        return
    step, proc, stop = _CHILD["step"], _CHILD["proc"], _CHILD["stop"]
    try:
        if step == "train" and stop is not None:
            stop.touch()
        else:
            os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def stop_child() -> tuple[str | None, int | None]:
    """Stop the child `run_child` is waiting for (`ask_child_to_stop`) and reap it: (its step, its exit code);
    (None, None) when there was none, the code None when the interrupted wait had already reaped it."""
    if not _CHILD:
        return None, None
    step, proc = _CHILD["step"], _CHILD["proc"]
    ask_child_to_stop()
    try:
        _, status = os.waitpid(proc.pid, 0)
    except (ChildProcessError, ProcessLookupError):
        return step, None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return step, proc.returncode


def run_point(grid_dir: str | Path, pid: str, cli: Sequence[str] | None = None, gpus: int | None = None,
              launcher: Sequence[str] = (), evaluate: bool = True) -> str:
    """Run one point to completion unless it is done or another process holds it; returns the final state
    (`done`; `evaluating` when trained with `evaluate` false, its eval tasks running as jobs of their own;
    `failed`; or `busy` when another process is running it). Train and eval resume by themselves.
    `gpus`: processes for train (default: the plan's `num_processes`, the recipe's `distributed.num_processes`);
    `launcher`: this node's torchrun prefix of a multi-node training."""
    grid_dir = Path(grid_dir)
    plan = read_json(bookkeeping(grid_dir) / "plan.json")
    point = next(p for p in plan["points"] if p["id"] == pid)
    lock = FileLock(lock_path(grid_dir, pid))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return "busy"
    try:
        rec = read_record(grid_dir, pid)
        if rec.get("state") == DONE or (not evaluate and rec.get("trained")):
            return rec["state"]
        attempt = int(rec.get("attempts", 0)) + 1
        who = {"host": socket.gethostname(), "process": os.getpid()}
        write_record(grid_dir, pid, state=RUNNING, attempts=attempt, started=time.time(), error=None, log_tail=None,
                     note=None, **who)
        record_event(grid_dir, pid, "start", attempt=attempt)
        log = log_path(grid_dir, pid)
        error = None
        procs = int(point.get("num_processes") or 0) if gpus is None else gpus
        for step, cmd in point_commands(grid_dir, {**point, "base": plan["base"]}, cli or default_cli(), procs,
                                        launcher, evaluate):
            if step == "eval" and not point.get("survey") and (grid_dir / pid / "results.json").exists():
                break  # `vlm train` already evaluated the recipe's eval.tasks
            rc = run_child(step, cmd, log, stop_file(grid_dir, pid) if step == "train" else None)
            if rc == STOPPED_EXIT_CODE:
                error = f"{step} stopped early with a checkpoint (exit code {rc}); launch the grid again to resume"
                break
            if rc != 0:
                error = f"{step} exited with code {rc} (log: {log})"
                break
        state = FAILED if error else (DONE if evaluate else EVALUATING)
        write_record(grid_dir, pid, state=state, finished=time.time(), error=error,
                     log_tail=tail(log) if error else None, **({} if evaluate or error else {"trained": True}))
        record_event(grid_dir, pid, "trained" if state == EVALUATING else state, attempt=attempt)
        return state
    finally:
        lock.release()


def run_local(grid_dir: Path, ids: list[str], workers: int, cli: Sequence[str] | None, echo=print) -> dict[str, str]:
    """Run points as up to `workers` concurrent subprocesses (each dies with this launcher)."""
    pending, running, outcome = deque(ids), {}, {}
    base_cmd = [sys.executable, "-m", "vlm.grid.executors", str(grid_dir)]
    extra = ["--cli", json.dumps(list(cli))] if cli else []
    while pending or running:
        while pending and len(running) < max(1, workers):
            pid = pending.popleft()
            if is_locked(grid_dir, pid):
                outcome[pid] = "busy"
                echo(f"skip  {pid} (running in another launcher)")
                continue
            echo(f"start {pid}")
            running[pid] = subprocess.Popen([*base_cmd, pid, *extra], stdin=subprocess.DEVNULL,
                                            preexec_fn=_die_with_parent)
        for pid, proc in list(running.items()):
            if proc.poll() is not None:
                del running[pid]
                rec = read_record(grid_dir, pid)
                outcome[pid] = rec.get("state", FAILED) if proc.returncode == 0 else FAILED
                if proc.returncode != 0 and rec.get("state") != FAILED:
                    write_record(grid_dir, pid, state=FAILED, error=f"point runner exited with code {proc.returncode}")
                echo(f"{outcome[pid]:5s} {pid}" + (f": {rec.get('error')}" if outcome[pid] == FAILED else ""))
        time.sleep(0.1)
    return outcome


def main(argv: list[str] | None = None) -> int:
    """Entry point of one local worker: `python -m vlm.grid.executors GRID_DIR POINT_ID [--cli JSON]`."""
    p = argparse.ArgumentParser(prog="python -m vlm.grid.executors")
    p.add_argument("grid_dir")
    p.add_argument("point_id")
    p.add_argument("--cli", type=json.loads, default=None)
    a = p.parse_args(argv)
    run_point(a.grid_dir, a.point_id, cli=a.cli)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The SLURM executor of `vlm grid --executor slurm`: submitit jobs for training, requeue with a checkpoint on
SLURM's warning signal (time limits), multi-node training, and evaluation in jobs of its own.

- **Training job** (`PointJob`, one per point): `run_point` in a submitit job. On SLURM's warning signal
  (`--signal=USR2@<slurm.signal_delay_s>`, submitit's default 90 s before the time limit) submitit calls `PointJob.checkpoint`: it asks
  the trainer to stop (`vlm.train.stop`: the trainer saves a checkpoint at its next step boundary and exits with
  `STOPPED_EXIT_CODE`), waits for it, and returns the same job, which submitit requeues (`scontrol requeue`). The
  requeued job runs `vlm train` on the same run dir again, which resumes bitwise from that checkpoint. A job may be
  requeued for its time limit `slurm.max_num_timeout` times (default 20). A job whose training ended just as the
  signal came is not requeued when nothing is left to do in it.
- **Preemption, `scontrol requeue`, `scancel`** (SLURM's SIGTERM to every process of the job, SIGKILL KillWait or
  GraceTime seconds later): the job asks SLURM what it is doing (`scontrol show job`, `sigterm_verdict`), asks the
  trainer to stop (it takes SIGTERM as a stop request too, `vlm.train.stop`, and saves a checkpoint at its next step
  boundary if it gets there before SIGKILL; else the last periodic one, `save_every`, is where it resumes), records
  the point `queued` (or, cancelled, leaves it to show `interrupted`) with a `preempted` (`interrupted`) event, waits
  for the trainer and ends. SLURM requeues a preempted job itself (PreemptMode=REQUEUE, `scontrol requeue`): the job
  never requeues it a second time. Only a SIGTERM that SLURM has not acted on yet (a preemption with GraceTime,
  whose requeue would come at its end, or `scancel --signal=TERM`) makes the job requeue itself, as at the warning
  signal. A SIGTERM during the warning signal's stop (the hard limit) is left to that stop.
- **Multi-node** (`slurm.nodes: N > 1`): the job has one task per node; each starts `torchrun` for its node
  (`--nnodes N --node_rank $SLURM_NODEID --nproc_per_node P`, the rendezvous at the first host of the allocation,
  `scontrol show hostnames $SLURM_JOB_NODELIST`), so the N nodes run one training of N x P processes. The first
  node's task keeps the point's lock, record and log.
- **Evaluation jobs** (grid key `slurm_eval: {...}`, submitit parameters such as `timeout_min`, `gpus_per_node`,
  `partition`): the training job only trains (`vlm train --no-eval`) and every eval task of the point becomes a job
  of its own (`EvalJob`), submitted with `--dependency=afterok:<training job>`, so a finished point is evaluated
  while other points train, and a failed task is resubmitted alone by the next `vlm grid` run. (A training job that
  once ended at its time limit before it could stop makes SLURM drop those dependent jobs; the training job
  submits them again when it has finished.) The point is done when every task has its results;
  `RUN_DIR/results.json` is rebuilt from `RUN_DIR/eval/<task>/results.json`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit
from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from eval.runner import resolve_task, summarize
from vlm.errors import UserError
from vlm.grid.executors import (DONE, EVALUATING, FAILED, QUEUED, RUNNING, STOPPED_EXIT_CODE, ask_child_to_stop, bookkeeping,
                                default_cli, is_locked, log_path, read_record, record_event, run_child, run_point,
                                stop_child, stop_file, tail, train_command, write_record)
from vlm.grid.spec import load_grid
from vlm.io import atomic_write_json, atomic_write_text, read_json

GENERIC = {"name", "timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node",
           "stderr_to_stdout"}
NOT_SUBMITIT = {"max_num_timeout"}  # our own keys in `slurm:` (submitit takes max_num_timeout at construction)
DEFAULT_MAX_NUM_TIMEOUT = 20
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
         "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


# ---------------------------------------------------------------- multi-node rendezvous


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list (`node[01-03]`), expanded by `scontrol show hostnames`."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def rendezvous_port(job_id: str) -> int:
    """A port every node of a job derives alike from the job id (two jobs sharing a host rarely collide)."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def node_launcher(procs_per_node: int, nodes: int, environ: dict[str, str] | None = None,
                  resolve: Callable[[str], list[str]] = hostnames) -> list[str]:
    """The `torchrun` prefix that starts this node's share of a training of `nodes` x `procs_per_node` processes,
    from the SLURM allocation in `environ` (SLURM_JOB_NODELIST, SLURM_NODEID, SLURM_JOB_ID); [] for one process."""
    if nodes * procs_per_node <= 1:
        return []
    run = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        return [*run, "--standalone", "--nproc_per_node", str(procs_per_node)]
    env = os.environ if environ is None else environ
    missing = [k for k in ("SLURM_JOB_NODELIST", "SLURM_NODEID", "SLURM_JOB_ID") if k not in env]
    if missing:
        raise UserError(f"a {nodes}-node training must run inside a SLURM allocation ({', '.join(missing)} not set); "
                        "launch the grid with --executor slurm")
    hosts = resolve(env["SLURM_JOB_NODELIST"])
    if len(hosts) != nodes:
        raise UserError(f"slurm.nodes is {nodes} but the allocation has {len(hosts)} hosts ({' '.join(hosts)})")
    return [*run, "--nnodes", str(nodes), "--node_rank", env["SLURM_NODEID"], "--nproc_per_node", str(procs_per_node),
            "--master_addr", hosts[0], "--master_port", str(rendezvous_port(env["SLURM_JOB_ID"]))]


# ---------------------------------------------------------------- SIGTERM: preemption, requeue, cancel

_ENDING: list[str] = []  # set once the job is ending for a signal (the warning signal or SIGTERM): the other waits


def sigterm_verdict(show_job: str, restart_count: int) -> str:
    """What SLURM is doing with a job whose processes got SIGTERM, from `scontrol show job -o <id>` run then:
    `requeued` (`scontrol requeue`, or a preemption in REQUEUE mode: SLURM has already counted the restart, its
    `Restarts` exceeds this run's SLURM_RESTART_COUNT), `running` (nothing decided yet: a preemption with GraceTime,
    requeued only at its end, or `scancel --signal=TERM`), or `ending` (cancelled, the hard time limit)."""
    fields = dict(w.split("=", 1) for w in show_job.split() if "=" in w)
    if int(fields.get("Restarts", "0")) > restart_count:
        return "requeued"
    return "running" if fields.get("JobState") == "RUNNING" else "ending"


def _ask_slurm() -> str:
    """`sigterm_verdict` for this job (`ending` when SLURM does not answer: nothing is requeued twice)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    res = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    if res.returncode != 0 or not job:
        return "ending"
    return sigterm_verdict(res.stdout, int(os.environ.get("SLURM_RESTART_COUNT") or 0))


def _requeue_self() -> str | None:
    """`scontrol requeue` this job (as submitit does at the warning signal); the error when SLURM refuses."""
    res = subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], capture_output=True, text=True, timeout=60)
    return None if res.returncode == 0 else (res.stderr or res.stdout).strip() or f"exit code {res.returncode}"


def _on_sigterm(record: Callable[[str, str | None], None] | None) -> None:
    """Make SIGTERM end this job as `vlm.grid.slurm`'s docstring says; `record(verdict, requeue_error)` keeps the
    bookkeeping (None on the other nodes of a multi-node training, which only stop their trainer)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        if _ENDING:  # the warning signal's stop is under way: it decides (a SIGTERM now is the hard limit)
            return
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # no warning-signal requeue on top of SLURM's
        _ENDING.append("sigterm")
        ask_child_to_stop()  # before asking SLURM: the trainer's grace time runs
        verdict = _ask_slurm()
        if record:
            record(verdict, None)
        stop_child()
        if verdict == "running" and record:
            error = _requeue_self()
            if error:
                record("ending", error)
        sys.exit(0)

    signal.signal(signal.SIGTERM, handler)


def _record_point_sigterm(grid_dir: Path, pid: str, evaluate: bool) -> Callable[[str, str | None], None]:
    """The training job's bookkeeping at SIGTERM: the point `queued` when SLURM (or the job) requeues it, else left
    `running` so that it shows `interrupted` once the job is gone; a `preempted` or `interrupted` event."""
    def record(verdict: str, requeue_error: str | None) -> None:
        rec = read_record(grid_dir, pid)
        when = time.strftime("%H:%M:%S")
        if rec.get("state") == DONE or (not evaluate and rec.get("trained")):  # nothing left to resume
            record_event(grid_dir, pid, "preempted" if verdict != "ending" else "interrupted", slurm=verdict)
        elif verdict == "ending" or requeue_error:
            why = f"the job could not requeue itself: {requeue_error}" if requeue_error else "cancelled or its hard limit"
            write_record(grid_dir, pid, state=RUNNING, note=f"SIGTERM at {when} ({why}); "
                                                            "run `vlm grid GRID_DIR --executor slurm` again to resume")
            record_event(grid_dir, pid, "interrupted", slurm=verdict, **({"error": requeue_error} if requeue_error else {}))
        else:
            write_record(grid_dir, pid, state=QUEUED, error=None, log_tail=None,
                         note=f"requeued at {when} (SIGTERM: preemption or `scontrol requeue`)")
            record_event(grid_dir, pid, "preempted", slurm=verdict)
    return record


def _record_task_sigterm(grid_dir: Path, pid: str, name: str) -> Callable[[str, str | None], None]:
    """An eval job's bookkeeping at SIGTERM: the task `queued` when requeued (it resumes from its saved
    predictions), else left `running` with a job SLURM no longer has (the next `vlm grid` resubmits it)."""
    def record(verdict: str, requeue_error: str | None) -> None:
        if verdict != "ending" and not requeue_error:
            _set_task(grid_dir, pid, name, state=QUEUED)
        record_event(grid_dir, pid, "interrupted" if verdict == "ending" or requeue_error else "preempted",
                     task=name, slurm=verdict)
    return record


# ---------------------------------------------------------------- the training job


class PointJob(submitit.helpers.Checkpointable):
    """Train (and, without `slurm_eval`, evaluate) one point in a SLURM job; requeued with a checkpoint on the
    warning signal. Called with (grid_dir, point id, cli, procs_per_node, nodes, evaluate)."""

    def __call__(self, grid_dir: str, pid: str, cli: Sequence[str] | None, procs_per_node: int, nodes: int,
                 evaluate: bool) -> str:
        env = submitit.JobEnvironment()
        if env.global_rank == 0:  # the point's bookkeeping; on one node `accelerate launch` as when run locally
            if env.cluster == "slurm":
                _on_sigterm(_record_point_sigterm(Path(grid_dir), pid, evaluate))
            launcher = node_launcher(procs_per_node, nodes) if nodes > 1 else []
            state = run_point(grid_dir, pid, cli, launcher=launcher, evaluate=evaluate)
            if state == EVALUATING:
                _ensure_eval_jobs(Path(grid_dir), pid, cli)
            return state
        _on_sigterm(None)
        launcher = node_launcher(procs_per_node, nodes)
        # another node of a multi-node training: its share of the processes, no bookkeeping (node 0 keeps it)
        plan = read_json(bookkeeping(Path(grid_dir)) / "plan.json")
        point = next(p for p in plan["points"] if p["id"] == pid)
        cmd = train_command(Path(grid_dir), {**point, "base": plan["base"]}, cli or default_cli(), launcher=launcher,
                            evaluate=False)
        log = bookkeeping(Path(grid_dir)) / "logs" / f"{pid}.node{env.node}.log"
        rc = run_child("train", cmd, log, stop_file(Path(grid_dir), pid))
        return f"node {env.node} exited with code {rc}"

    def checkpoint(self, grid_dir: str, pid: str, cli: Sequence[str] | None, procs_per_node: int, nodes: int,
                   evaluate: bool) -> submitit.helpers.DelayedSubmission | None:
        """SLURM's warning signal: stop the trainer at a step boundary (it saves a checkpoint) and requeue the job.
        When the work was already done (training ended as the signal came, and the eval tasks are jobs of their
        own), the job ends successfully instead; when the trainer failed, it ends without a requeue."""
        _ENDING.append("warning")  # a SIGTERM from now on is the hard limit: this stop decides
        step, rc = stop_child()
        gd = Path(grid_dir)
        rec = read_record(gd, pid)
        if step == "train" and rc == 0 and not evaluate and rec.get("state") != DONE:
            write_record(gd, pid, state=EVALUATING, trained=True, finished=time.time(), error=None, log_tail=None)
            record_event(gd, pid, "trained")
        if rec.get("state") == DONE or (step in ("train", None) and rc in (0, None) and not evaluate
                                        and read_record(gd, pid).get("trained")):
            if not evaluate:
                _ensure_eval_jobs(gd, pid, cli)
            sys.exit(0)  # nothing left to resume: the job ends as completed (its dependent eval jobs start)
        if step == "train" and rc not in (STOPPED_EXIT_CODE, 0, None, -signal.SIGTERM, -signal.SIGKILL):
            log = log_path(gd, pid)
            write_record(gd, pid, state=FAILED, error=f"train exited with code {rc} (log: {log})", log_tail=tail(log))
            record_event(gd, pid, FAILED)
            return None
        # -SIGTERM / -SIGKILL: SLURM ended the trainer before it could stop (the hard limit, or `scancel` in the
        # warning window: SLURM cannot tell them apart yet, so the job is requeued either way)
        write_record(gd, pid, state=QUEUED, error=None,
                     note=f"requeued at {time.strftime('%H:%M:%S')} (SLURM's warning signal)")
        record_event(gd, pid, "requeued", step=step, child_exit=rc)
        return super().checkpoint(grid_dir, pid, cli, procs_per_node, nodes, evaluate)


def _ensure_eval_jobs(grid_dir: Path, pid: str, cli: Sequence[str] | None) -> None:
    """From the training job of a trained point: submit its eval jobs that SLURM no longer has. An eval job waits
    for the training job with `afterok`; when a requeued training job once ended at its time limit before it could
    stop, SLURM drops the eval jobs (that dependency can no longer be met), so the training job replaces them."""
    if submitit.JobEnvironment().cluster != "slurm":
        return
    grid = load_grid(grid_dir / "grid.yaml")
    point = next(p for p in read_json(bookkeeping(grid_dir) / "plan.json")["points"] if p["id"] == pid)
    submit(grid, grid_dir, [point], cli, cluster="slurm", echo=lambda *_: None)


# ---------------------------------------------------------------- eval jobs


def task_names(cfg: Any) -> list[str]:
    """The names of a resolved recipe's `eval.tasks` (as `eval.runner` names them)."""
    tasks = OmegaConf.to_container(cfg, resolve=True)["eval"]["tasks"] if OmegaConf.is_config(cfg) else cfg["eval"]["tasks"]
    return [resolve_task(t)["name"] for t in tasks]


def _eval_lock(grid_dir: Path, pid: str, name: str) -> Path:
    return bookkeeping(grid_dir) / "locks" / f"{pid}.eval.{name}.lock"


def _merge_lock(grid_dir: Path, pid: str) -> Path:
    return bookkeeping(grid_dir) / "locks" / f"{pid}.merge.lock"


def rebuild_results(run_dir: Path, names: Sequence[str]) -> dict[str, Any]:
    """`RUN_DIR/results.json` from the per-task `eval/<task>/results.json` of `names` (those that exist)."""
    tasks = {}
    for name in names:
        path = run_dir / "eval" / name / "results.json"
        if path.exists():
            res = read_json(path)
            tasks[name] = {k: res[k] for k in ("type", "family", "headline", "score", "num_items", "metrics")}
    results = {"tasks": tasks, **summarize(tasks)}
    atomic_write_json(run_dir / "results.json", results)
    return results


class EvalJob(submitit.helpers.Checkpointable):
    """One eval task of one trained point in a SLURM job (`vlm eval RUN_DIR --tasks <the task's spec>`); requeued
    on the warning signal (the task resumes from its saved predictions). Called with (grid_dir, point id, task, cli)."""

    def __call__(self, grid_dir: str, pid: str, name: str, cli: Sequence[str] | None) -> str:
        grid_dir_p = Path(grid_dir)
        run_dir = grid_dir_p / pid
        lock = FileLock(_eval_lock(grid_dir_p, pid, name))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return "busy"
        if submitit.JobEnvironment().cluster == "slurm":
            _on_sigterm(_record_task_sigterm(grid_dir_p, pid, name))
        try:
            rec = read_record(grid_dir_p, pid)
            state = rec.get("eval", {}).get(name, {})
            if state.get("state") == DONE:
                return DONE
            attempt = int(state.get("attempts", 0)) + 1
            _set_task(grid_dir_p, pid, name, state="running", attempts=attempt, host=socket.gethostname())
            spec = _task_spec(run_dir, name)
            # no comma in the path: `vlm eval --tasks` splits on commas (run ids have them)
            spec_file = bookkeeping(grid_dir_p) / "eval" / pid.replace(",", "+") / f"{name}.yaml"
            atomic_write_text(spec_file, json.dumps(spec))  # JSON is YAML
            log = log_path(grid_dir_p, f"{pid}.eval.{name}")
            cmd = [*(cli or default_cli()), "eval", str(run_dir), "--tasks", str(spec_file)]
            rc = run_child("eval", cmd, log, None)
            error = None if rc == 0 and (run_dir / "eval" / name / "results.json").exists() else \
                f"eval task {name} exited with code {rc} (log: {log})"
            return _finish_task(grid_dir_p, pid, name, error, tail(log) if error else None)
        finally:
            lock.release()

    def checkpoint(self, grid_dir: str, pid: str, name: str, *args: Any) -> submitit.helpers.DelayedSubmission:
        _ENDING.append("warning")
        stop_child()
        _set_task(Path(grid_dir), pid, name, state=QUEUED)
        return super().checkpoint(grid_dir, pid, name, *args)


def _task_spec(run_dir: Path, name: str) -> dict[str, Any]:
    recipe = OmegaConf.to_container(OmegaConf.load(run_dir / "recipe.yaml"), resolve=True)
    for t in recipe["eval"]["tasks"]:
        full = resolve_task(t)
        if full["name"] == name:
            return full
    raise UserError(f"run {run_dir}: no eval task named {name!r} in its recipe.yaml")


def _set_task(grid_dir: Path, pid: str, name: str, **fields: Any) -> None:
    with FileLock(_merge_lock(grid_dir, pid)):
        rec = read_record(grid_dir, pid)
        tasks = dict(rec.get("eval") or {})
        tasks[name] = {**tasks.get(name, {}), **fields}
        write_record(grid_dir, pid, eval=tasks)


def _finish_task(grid_dir: Path, pid: str, name: str, error: str | None, log_tail: str | None) -> str:
    """Record the task's outcome; the last task to finish rebuilds results.json and marks the point done (once)."""
    with FileLock(_merge_lock(grid_dir, pid)):
        rec = read_record(grid_dir, pid)
        tasks = dict(rec.get("eval") or {})
        tasks[name] = {**tasks.get(name, {}), "state": FAILED if error else DONE, "error": error, "log_tail": log_tail,
                       "finished": time.time()}
        record_event(grid_dir, pid, "eval_failed" if error else "eval_done", task=name)
        names = rec.get("eval_tasks") or list(tasks)
        rebuild_results(grid_dir / pid, names)
        if error:
            write_record(grid_dir, pid, eval=tasks, state=FAILED, error=error, log_tail=log_tail)
            return FAILED
        if all(tasks.get(n, {}).get("state") == DONE for n in names) and rec.get("state") != DONE:
            write_record(grid_dir, pid, eval=tasks, state=DONE, error=None, log_tail=None, finished=time.time())
            record_event(grid_dir, pid, DONE)
        else:
            write_record(grid_dir, pid, eval=tasks)
        return DONE


# ---------------------------------------------------------------- submission


def alive_jobs(job_ids: Sequence[str]) -> set[str]:
    """The ids among `job_ids` that SLURM still has pending or running (`squeue`; no accounting database needed)."""
    ids = [str(j) for j in job_ids if j]
    if not ids:
        return set()
    res = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"], capture_output=True, text=True)
    if res.returncode != 0:  # "Invalid job id specified": every listed job has left the queue
        return set() if len(ids) == 1 else {j for j in ids if alive_jobs([j])}
    return {line.split()[0] for line in res.stdout.splitlines() if line.split()[1] in ALIVE}


def _parameters(settings: dict[str, Any], name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "nodes": 1, "tasks_per_node": 1}
    for k, v in settings.items():
        if k in NOT_SUBMITIT:
            continue
        params[k if k in GENERIC or k.startswith("slurm_") else f"slurm_{k}"] = v
    if extra:
        params["slurm_additional_parameters"] = {**(params.get("slurm_additional_parameters") or {}), **extra}
    return params


def submit(grid: Any, grid_dir: Path, todo: list[dict[str, Any]], cli: Sequence[str] | None, *, cluster: str,
           echo=print) -> list:
    """Submit what each not-done point still needs: its training job (with, under `slurm_eval`, one eval job per
    task depending on it), or only the eval jobs of tasks not done when it is trained. Points and tasks whose job
    is still queued or running are not submitted again. Returns the submitit jobs."""
    folder = bookkeeping(grid_dir) / "slurm" / "%j"
    max_timeouts = int(grid.slurm.get("max_num_timeout", DEFAULT_MAX_NUM_TIMEOUT))

    def executor(params: dict[str, Any]) -> submitit.AutoExecutor:  # a new one per job: parameters accumulate
        ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_timeouts)
        ex.update_parameters(**params)
        return ex
    split_eval = bool(grid.slurm_eval)
    real = cluster == "slurm"
    records = {p["id"]: read_record(grid_dir, p["id"]) for p in todo}
    if real:
        known = [r.get("job_id") for r in records.values()]
        known += [t.get("job_id") for r in records.values() for t in (r.get("eval") or {}).values()]
        alive = alive_jobs([j for j in known if j])
    else:
        alive = set()
    jobs = []
    for p in todo:
        pid, rec = p["id"], records[p["id"]]
        gd = str(grid_dir.resolve())
        train_job = None
        if not (split_eval and rec.get("trained")):
            if rec.get("job_id") in alive:
                echo(f"skip  {pid} (job {rec['job_id']} is {'queued' if rec.get('state') == QUEUED else 'running'})")
                continue
            if is_locked(grid_dir, pid):
                echo(f"skip  {pid} (running elsewhere)")
                continue
            ex = executor(_parameters({**grid.slurm, "nodes": p["nodes"],
                                       "gpus_per_node": grid.slurm.get("gpus_per_node", p["gpus"])}, f"{grid.name}/{pid}"))
            train_job = ex.submit(PointJob(), gd, pid, list(cli) if cli else None, p["procs_per_node"], p["nodes"],
                                  not split_eval)
            write_record(grid_dir, pid, state=QUEUED, job_id=str(train_job.job_id), eval_tasks=p.get("eval_tasks"),
                         note=None)
            echo(f"submitted {pid} as job {train_job.job_id}")
            jobs.append(train_job)
            if not split_eval:
                continue
        tasks = rec.get("eval") or {}
        for name in p.get("eval_tasks") or []:
            t = tasks.get(name, {})
            if t.get("state") == DONE or (t.get("job_id") in alive and train_job is None):
                continue
            dep = {"dependency": f"afterok:{train_job.job_id}", "kill_on_invalid_dep": "yes"} if train_job and real else None
            job = executor(_parameters(grid.slurm_eval, f"{grid.name}/{pid}/eval/{name}", dep)).submit(EvalJob(), gd, pid, name, list(cli) if cli else None)
            _set_task(grid_dir, pid, name, state=QUEUED, job_id=str(job.job_id))
            echo(f"submitted eval {name} of {pid} as job {job.job_id}" + (f" (after job {train_job.job_id})" if dep else ""))
            jobs.append(job)
        if split_eval and rec.get("trained") and rec.get("state") != EVALUATING:
            write_record(grid_dir, pid, state=EVALUATING, error=None, eval_tasks=p.get("eval_tasks"))
    return jobs

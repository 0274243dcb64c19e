"""Cluster-grade grids: stop-with-checkpoint and exact resume, multi-node launch, eval jobs, and the smoke grid on a
real SLURM cluster of two slurmd "nodes" on this machine (tests/slurm_cluster.py; skipped without root +
slurm-wlm, `python3 dev.py test` installs them in CI): time limits, `scontrol requeue` (preemption), `scancel`, a
2-node training. The submitit debug-executor tests run everywhere.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import slurm_cluster
from vlm.errors import UserError
from vlm.grid.executors import read_record
from vlm.grid.points import launch, load_plan, plan_grid, point_state
from vlm.grid.slurm import node_launcher, rendezvous_port, sigterm_verdict
from vlm.grid.spec import load_grid
from vlm.io import read_json, read_jsonl
from vlm.train import stop

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def _artifacts(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for stage in ("align", "finetune"):
        out[stage] = load_file(str(Path(read_json(run / "stages" / stage / "artifact.json")["path"]) / "weights.safetensors"))
    return out


# ---------------------------------------------------------------- stop with a checkpoint, resume exactly


def test_stop_request_saves_a_checkpoint_and_resume_is_bitwise(tmp_path, monkeypatch):
    """A stop file present from the start stops training after its first step (exit code 75 from the CLI); the
    next run resumes from that checkpoint and ends with the weights of an uninterrupted run."""
    from vlm.recipe.schema import load_recipe
    from vlm.train.steps import train

    over = ["stages.align.max_steps=3", "stages.finetune.max_steps=3", f"run.feature_cache_dir={tmp_path / 'fc'}"]
    ref = tmp_path / "ref"
    train(load_recipe(ROOT / "recipes/smoke.yaml", over + ["eval.tasks=[]"]), ref)

    flag = tmp_path / "stop-now"
    flag.touch()
    cut = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-m", "vlm", "train", str(ROOT / "recipes/smoke.yaml"), *over, "eval.tasks=[]",
                           "--out", str(cut)], cwd=ROOT, env={**ENV, stop.STOP_FILE_ENV: str(flag)},
                          capture_output=True, text=True)
    assert proc.returncode == stop.STOPPED_EXIT_CODE, proc.stdout + proc.stderr
    status = read_json(cut / "status.json")
    assert status["state"] == "stopped" and status["stage"] == "align" and status["step"] == 1
    assert (cut / "stages" / "align" / "checkpoints" / "step_00000001").is_dir()
    assert [m["step"] for m in read_jsonl(cut / "metrics.jsonl")] == [1]

    monkeypatch.setenv(stop.STOP_FILE_ENV, str(flag))  # in-process: stops again after one more step
    with pytest.raises(stop.Stopped):
        train(load_recipe(ROOT / "recipes/smoke.yaml", over + ["eval.tasks=[]"]), cut)
    assert read_json(cut / "status.json")["step"] == 2
    flag.unlink()
    train(load_recipe(ROOT / "recipes/smoke.yaml", over + ["eval.tasks=[]"]), cut)
    assert [m["step"] for m in read_jsonl(cut / "metrics.jsonl") if m["stage"] == "align"] == [1, 2, 3]
    a, b = _artifacts(ref), _artifacts(cut)
    for stage in a:
        assert a[stage].keys() == b[stage].keys()
        for k in a[stage]:
            assert torch.equal(a[stage][k], b[stage][k]), (stage, k)


def test_sigusr2_requests_a_stop():
    stop.clear()
    old = signal.getsignal(stop.STOP_SIGNAL)
    try:
        stop.install_handler()
        assert not stop.requested()
        os.kill(os.getpid(), stop.STOP_SIGNAL)
        time.sleep(0.05)
        assert stop.requested()
    finally:
        stop.clear()
        signal.signal(stop.STOP_SIGNAL, old)


def test_sigterm_in_a_grid_trainer_requests_a_stop(monkeypatch):
    """A trainer the grid runs (VLM_STOP_FILE set) takes SIGTERM (SLURM's preemption, requeue, cancel) as a stop
    request (and drops PyTorch's DataLoader SIGCHLD check: SLURM's SIGTERM ends the loader's workers too, which must
    not make the stopping trainer raise); a plain `vlm train` keeps SIGTERM's default action."""
    stop.clear()
    old = {s: signal.getsignal(s) for s in (stop.STOP_SIGNAL, signal.SIGTERM, signal.SIGCHLD)}
    try:
        monkeypatch.delenv(stop.STOP_FILE_ENV, raising=False)
        stop.install_handler()
        assert signal.getsignal(signal.SIGTERM) is old[signal.SIGTERM]
        monkeypatch.setenv(stop.STOP_FILE_ENV, "/nonexistent/stop-file")
        stop.install_handler()
        signal.signal(signal.SIGCHLD, lambda *_: None)  # as a DataLoader sets it
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested() and signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    finally:
        stop.clear()
        for s, h in old.items():
            signal.signal(s, h)


def test_sigterm_verdict_from_scontrol_show_job():
    """What the job reads from `scontrol show job -o` at SIGTERM (fields as SLURM 22.05 printed them in the
    cluster below): `scontrol requeue` / a REQUEUE preemption has counted the restart already; `scancel` has not
    (here after one earlier requeue: SLURM_RESTART_COUNT=1); a GraceTime preemption leaves the job RUNNING."""
    assert sigterm_verdict("JobId=7 JobState=COMPLETING Reason=None Requeue=1 Restarts=1 BatchFlag=1", 0) == "requeued"
    assert sigterm_verdict("JobId=7 JobState=COMPLETING Reason=None Requeue=1 Restarts=1 BatchFlag=1", 1) == "ending"
    assert sigterm_verdict("JobId=7 JobState=RUNNING Reason=None Requeue=1 Restarts=0 BatchFlag=1", 0) == "running"
    assert sigterm_verdict("JobId=7 JobState=CANCELLED Reason=None Restarts=0", 0) == "ending"


# ---------------------------------------------------------------- multi-node


def test_two_node_launch_command_from_the_allocation():
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242"}
    seen = []
    cmd = node_launcher(8, 2, env, resolve=lambda nl: seen.append(nl) or ["gpu07", "gpu08"])
    assert seen == ["gpu[07-08]"]
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1",
                   "--nproc_per_node", "8", "--master_addr", "gpu07", "--master_port", str(rendezvous_port("4242"))]
    node0 = node_launcher(8, 2, {**env, "SLURM_NODEID": "0"}, resolve=lambda _: ["gpu07", "gpu08"])
    assert node0 == [*cmd[:6], "0", *cmd[7:]]  # the same rendezvous, node rank 0
    assert node_launcher(1, 1, env) == []
    assert node_launcher(4, 1, env)[3:] == ["--standalone", "--nproc_per_node", "4"]
    with pytest.raises(UserError, match="inside a SLURM allocation"):
        node_launcher(8, 2, {})
    with pytest.raises(UserError, match="allocation has 1 hosts"):
        node_launcher(8, 2, env, resolve=lambda _: ["gpu07"])


def _grid(tmp_path: Path, extra: dict, points: list | None = None) -> Path:
    """The smoke grid with more settings (absolute base, so it can live in tmp_path)."""
    raw = yaml.safe_load((ROOT / "recipes/grids/smoke.yaml").read_text())
    raw["base"] = str(ROOT / "recipes/smoke.yaml")
    raw.update(extra)
    if points:
        raw["points"] = points
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_plan_counts_processes_across_nodes_and_keys_follow_them(tmp_path):
    multi = plan_grid(load_grid(_grid(tmp_path, {"slurm": {"nodes": 2, "gpus_per_node": 4}})), tmp_path / "a")
    single = plan_grid(load_grid(_grid(tmp_path, {})), tmp_path / "a")
    assert {(p["nodes"], p["procs_per_node"]) for p in multi} == {(2, 4)}
    assert {p["overrides"]["distributed.num_processes"] for p in multi} == {8}
    assert {(p["nodes"], p["procs_per_node"]) for p in single} == {(1, 1)}
    assert "distributed.num_processes" not in single[0]["overrides"]
    # 8 processes make a global batch 8 times larger: no stage artifact is shared with the 1-process points
    assert not {k for p in multi for k in p["stage_keys"]} & {k for p in single for k in p["stage_keys"]}
    with pytest.raises(UserError, match="not divisible"):
        plan_grid(load_grid(_grid(tmp_path, {"slurm": {"nodes": 2}, "set": {"distributed.num_processes": 3}})), None)


def test_two_nodes_run_one_training(tmp_path):
    """Two 'nodes' on this machine (node ranks 0 and 1 of a fake 2-node allocation, one CPU process each) started
    with the commands node_launcher gives them form one training of 2 processes, not two copies."""
    out = tmp_path / "run"
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": str(os.getpid())}
    over = ["stages.align.max_steps=2", "stages.finetune.max_steps=2", "stages.align.batch_size=2",
            "stages.finetune.batch_size=1", "eval.tasks=[]", f"run.feature_cache_dir={tmp_path / 'fc'}"]
    procs = []
    for rank in ("0", "1"):
        cmd = node_launcher(1, 2, {**env, "SLURM_NODEID": rank}, resolve=lambda _: ["127.0.0.1", "127.0.0.1"])
        procs.append(subprocess.Popen([*cmd, "-m", "vlm", "train", str(ROOT / "recipes/smoke.yaml"), *over, "--out", str(out)],
                                      cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert read_json(out / "manifest.json")["hardware"]["world_size"] == 2
    steps = [(m["stage"], m["step"]) for m in read_jsonl(out / "metrics.jsonl")]
    assert steps == [("align", 1), ("align", 2), ("finetune", 1), ("finetune", 2)]  # one run logs each step once
    # the run records its real process count, and its artifacts are keyed by it (global batch 2 x 2, not 2)
    from vlm.recipe.keys import stage_keys
    from vlm.recipe.schema import load_recipe

    assert yaml.safe_load((out / "recipe.yaml").read_text())["distributed"]["num_processes"] == 2
    key = read_json(out / "stages" / "align" / "artifact.json")["key"]
    assert key == stage_keys(load_recipe(ROOT / "recipes/smoke.yaml", [*over, "distributed.num_processes=2"]))[0]
    assert key != stage_keys(load_recipe(ROOT / "recipes/smoke.yaml", over))[0]


# ---------------------------------------------------------------- eval jobs, submitit debug executor (no SLURM needed)

FAKE = r'''
import json, os, sys
from pathlib import Path
cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "train":
    run = Path(args[args.index("--out") + 1]); run.mkdir(parents=True, exist_ok=True)
    with open(run / "calls.jsonl", "a") as f: f.write(json.dumps({"event": "train", "args": args}) + "\n")
    (run / "recipe.yaml").write_text(json.dumps({"eval": {"tasks": TASKS}}))
elif cmd == "eval":
    spec_file, = args[args.index("--tasks") + 1].split(",")  # as `vlm eval --tasks` reads it: comma-separated
    run, spec = Path(args[0]), json.loads(Path(spec_file).read_text())
    with open(run / "calls.jsonl", "a") as f: f.write(json.dumps({"event": "eval", "task": spec["name"]}) + "\n")
    flaky = Path(os.environ["FAKE_FLAKY"])
    if spec["name"] == "synth_vqa" and "s1llm=frozen,s2lr=1e-4" in str(run) and not flaky.exists():
        flaky.touch(); print("eval crashed on purpose"); sys.exit(4)
    fam = "fine_grained" if spec["type"] == "classification" else "general"
    res = {"task": spec["name"], "type": spec["type"], "family": fam, "headline": "acc",
           "score": 0.25 if fam == "fine_grained" else 0.5, "num_items": 4, "metrics": {"acc": 0.5}}
    (run / "eval" / spec["name"]).mkdir(parents=True, exist_ok=True)
    (run / "eval" / spec["name"] / "results.json").write_text(json.dumps(res))
'''


def test_eval_jobs_per_task_and_a_failed_task_is_retried_alone(tmp_path, monkeypatch):
    path = _grid(tmp_path, {"slurm": {"timeout_min": 60}, "slurm_eval": {"timeout_min": 30, "cpus_per_task": 1}})
    tasks = [{"type": "classification", "name": "synth_cls"}, {"type": "vqav2", "name": "synth_vqa"}]
    fake = tmp_path / "fake_vlm.py"
    fake.write_text(FAKE.replace("TASKS", json.dumps(tasks)))
    monkeypatch.setenv("FAKE_FLAKY", str(tmp_path / "flaky-done"))
    out, cli = tmp_path / "gd", [sys.executable, str(fake)]
    jobs = launch(path, out, executor="slurm", cli=cli, slurm_cluster="debug", echo=lambda *_: None)
    assert len(jobs) == 4 * 3  # per point: the training job and one job per eval task
    assert [j.result() for j in jobs].count("failed") == 1
    ids = [p["id"] for p in load_plan(out)["points"]]
    bad = "s1llm=frozen,s2lr=1e-4"
    assert {pid: point_state(out, pid) for pid in ids} == {pid: "failed" if pid == bad else "done" for pid in ids}
    for pid in ids:
        train_call = [c for c in read_jsonl(out / pid / "calls.jsonl") if c["event"] == "train"][0]
        assert "--no-eval" in train_call["args"]
    assert read_record(out, bad)["eval"]["synth_vqa"]["state"] == "failed"
    assert "eval crashed on purpose" in read_record(out, bad)["log_tail"]

    again = launch(path, out, executor="slurm", cli=cli, slurm_cluster="debug", echo=lambda *_: None)
    assert len(again) == 1 and again[0].result() == "done"  # only the failed task, not training, not the other task
    assert [c["event"] + c.get("task", "") for c in read_jsonl(out / bad / "calls.jsonl")] == \
        ["train", "evalsynth_cls", "evalsynth_vqa", "evalsynth_vqa"]
    assert all(point_state(out, pid) == "done" for pid in ids)
    events = list(read_jsonl(out / "_grid" / "events.jsonl"))
    for pid in ids:
        assert sum(e["point"] == pid and e["event"] == "done" for e in events) == 1
        res = read_json(out / pid / "results.json")
        assert set(res["tasks"]) == {"synth_cls", "synth_vqa"} and res["gap"] == pytest.approx(-0.25)
    assert launch(path, out, executor="slurm", cli=cli, slurm_cluster="debug", echo=lambda *_: None) == []


# ---------------------------------------------------------------- a real SLURM cluster

REASON = slurm_cluster.available()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if REASON and os.geteuid() == 0 and slurm_cluster.ensure_installed():
        pass
    elif REASON:
        pytest.skip(REASON)
    c = slurm_cluster.start_cluster(tmp_path_factory.mktemp("slurm"))
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(c.conf))
    try:
        yield c
    finally:
        mp.undo()
        c.stop()


def _wait_idle(cluster, timeout: float, poll=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if poll:
            poll()
        if not cluster.run("squeue", "-h", "-o", "%i").strip():
            return
        time.sleep(1)
    raise AssertionError(f"jobs still queued after {timeout:.0f} s:\n{cluster.run('squeue')}\n{cluster.logs()}")


def test_scontrol_expands_node_lists(cluster):
    from vlm.grid.slurm import hostnames

    assert hostnames("gpu[07-08],cpu1") == ["gpu07", "gpu08", "cpu1"]


# `vlm` as the grid runs it, but the first `train` waits for the warning signal's stop file before it starts: slurmctld
# delivers the signal at its next time-limit check, up to 30 s into the job, and on an idle machine the tiny trainer
# can finish before that — the race the first version of this test lost in CI-like conditions
WAIT_FOR_WARNING = r'''
import os, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
marker = Path(os.environ["VLM_TEST_MARKER"])
if args[0] == "train" and not marker.exists():
    marker.touch()
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the trainer installs its own handler
    stop, deadline = Path(os.environ["VLM_STOP_FILE"]), time.time() + 50
    while not stop.exists() and time.time() < deadline:
        time.sleep(0.2)
os.execv(sys.executable, [sys.executable, "-m", "vlm", *args])
'''


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, tmp_path, monkeypatch):
    """A point in a 1-minute partition whose job asks for SLURM's warning signal 59 s before the limit (it comes at
    slurmctld's first time-limit check, 0-30 s into the job; the first attempt's trainer starts once it has come):
    the trainer stops after its first step that does not end a stage (stage 2, step 1 of 2) with a checkpoint, the
    job requeues itself, and the requeued job resumes there; the point ends done once, every step logged once."""
    wrapper = tmp_path / "vlm_after_warning.py"
    wrapper.write_text(WAIT_FOR_WARNING)
    monkeypatch.setenv("VLM_TEST_MARKER", str(tmp_path / "first-attempt-started"))
    raw = yaml.safe_load((ROOT / "recipes/grids/smoke.yaml").read_text())
    path = tmp_path / "tl.yaml"
    path.write_text(yaml.safe_dump({
        "name": "timelimit", "base": str(ROOT / "recipes/smoke.yaml"),
        "set": {**raw["set"], "stages.align.max_steps": 1, "stages.finetune.max_steps": 2},
        "axes": {"s2lr": {"key": "stages.finetune.optim.lr", "values": {"1e-4": 1.0e-4}}},
        "slurm": {"partition": "short", "timeout_min": 1, "signal_delay_s": 59, "cpus_per_task": 1},
        "slurm_eval": {"partition": "debug", "timeout_min": 10, "cpus_per_task": 1}}))
    out = tmp_path / "gd"
    jobs = launch(path, out, executor="slurm", cli=[sys.executable, str(wrapper)], echo=lambda *_: None)
    assert len(jobs) == 3  # training, and one job per eval task (outside the 1-minute partition)
    marker, moved = tmp_path / "first-attempt-started", []

    def give_the_requeued_job_time() -> None:
        # In a 1-minute partition the requeued attempt's warning comes 0-30 s into it too, and on a loaded machine it
        # can land while the job's Python is still importing (before any handler: SIGUSR2's default action ends the
        # job, which then is not requeued). The first attempt is what this test is about; the requeued one, pending
        # for its begin time, moves to the unlimited partition with a 5-minute limit (as a real partition's limit).
        if moved or not marker.exists():
            return
        pending = cluster.run("squeue", "-h", "-p", "short", "-t", "PD", "-o", "%i").split()
        for job in pending:
            cluster.run("scontrol", "update", f"JobId={job}", "Partition=debug", "TimeLimit=5", check=False)
            moved.append(job)

    _wait_idle(cluster, 420, poll=give_the_requeued_job_time)
    pid = "s2lr=1e-4"
    events = [e["event"] for e in read_jsonl(out / "_grid" / "events.jsonl")]
    assert point_state(out, pid) == "done", (events, read_record(out, pid), (out / "_grid/logs" / f"{pid}.log").read_text()[-3000:])
    assert events.count("done") == 1 and events.count("requeued") >= 1 and events.count("trained") == 1, events
    log = (out / "_grid" / "logs" / f"{pid}.log").read_text()
    assert "stage finetune stopped at step 1/2 on request; checkpoint saved" in log
    steps = [(m["stage"], m["step"]) for m in read_jsonl(out / pid / "metrics.jsonl") if "loss" in m]
    assert steps == [("align", 1), ("finetune", 1), ("finetune", 2)]  # resumed, nothing redone or skipped
    assert read_json(out / pid / "results.json")["fine_grained"] is not None


# `vlm` as the grid runs it, but the first `train` holds still after its N-th optimizer step (where it checks for a
# stop request) until a stop is requested, and says so in a file: the test requeues the job exactly there
HOLD_AFTER_STEP = r'''
import os, runpy, sys, time
from pathlib import Path
marker = Path(os.environ["VLM_TEST_MARKER"])
if sys.argv[1] == "train" and not marker.exists():
    from vlm.train import stop
    real, calls = stop.requested, []
    def requested():
        calls.append(1)
        if len(calls) == int(os.environ["VLM_TEST_HOLD_AFTER"]):
            marker.touch()
            deadline = time.time() + 600
            while not real() and time.time() < deadline:
                time.sleep(0.1)
        return real()
    stop.requested = requested
runpy.run_module("vlm", run_name="__main__")
'''


def test_requeue_by_slurm_sigterm_stops_with_a_checkpoint_and_resumes_once(cluster, tmp_path, monkeypatch):
    """`scontrol requeue` on a running training job (what SLURM does to a job it preempts with PreemptMode=REQUEUE):
    SLURM sends SIGTERM to every process of the job; the trainer, held after stage 2's step 3 of 4 (a periodic
    checkpoint at step 2), stops there with a checkpoint; the job records the point `queued` with a `preempted`
    event and does not requeue itself (SLURM counts one restart); the requeued job resumes at step 3: every step
    is logged once, and the point ends done once, with its report row."""
    wrapper = tmp_path / "vlm_hold.py"
    wrapper.write_text(HOLD_AFTER_STEP)
    marker = tmp_path / "first-attempt-held"
    monkeypatch.setenv("VLM_TEST_MARKER", str(marker))
    monkeypatch.setenv("VLM_TEST_HOLD_AFTER", "3")  # finetune steps 1-3 (a stage's last step asks nothing)
    raw = yaml.safe_load((ROOT / "recipes/grids/smoke.yaml").read_text())
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump({
        "name": "preempt", "base": str(ROOT / "recipes/smoke.yaml"),
        "set": {**raw["set"], "stages.align.max_steps": 1, "stages.finetune.max_steps": 4,
                "stages.finetune.save_every": 2},
        "axes": {"s2lr": {"key": "stages.finetune.optim.lr", "values": {"1e-4": 1.0e-4}}},
        "slurm": {"timeout_min": 10, "cpus_per_task": 1}}))
    out, pid = tmp_path / "gd", "s2lr=1e-4"
    jobs = launch(path, out, executor="slurm", cli=[sys.executable, str(wrapper)], echo=lambda *_: None)
    assert len(jobs) == 1  # training and eval in one job
    job_id = read_record(out, pid)["job_id"]
    deadline = time.time() + 600  # start-up alone took 5 min on the 2-core VM at load average 23
    while not marker.exists():
        assert time.time() < deadline and cluster.run("squeue", "-h", "-j", job_id, check=False).strip(), \
            (cluster.run("squeue"), cluster.logs(), (out / "_grid/logs" / f"{pid}.log").read_text()[-3000:])
        time.sleep(0.5)
    assert (out / pid / "stages" / "finetune" / "checkpoints" / "step_00000002").is_dir()  # the periodic one
    cluster.run("scontrol", "requeue", job_id)
    _wait_idle(cluster, 420)
    events = list(read_jsonl(out / "_grid" / "events.jsonl"))
    names = [e["event"] for e in events]
    log = (out / "_grid" / "logs" / f"{pid}.log").read_text()
    assert point_state(out, pid) == "done", (names, read_record(out, pid), log[-3000:])
    assert names == ["start", "preempted", "start", "done"], names  # never failed, never requeued by the job itself
    assert events[1]["slurm"] == "requeued"  # the job's SIGTERM handler ran and found SLURM requeueing it
    assert "Restarts=1 " in cluster.run("scontrol", "show", "job", "-o", job_id)  # requeued once, by SLURM
    assert "stage finetune stopped at step 3/4 on request; checkpoint saved" in log
    steps = [(m["stage"], m["step"]) for m in read_jsonl(out / pid / "metrics.jsonl") if "loss" in m]
    assert steps == [("align", 1), *(("finetune", k) for k in (1, 2, 3, 4))]  # resumed at 3: nothing redone
    assert read_record(out, pid)["attempts"] == 2

    from vlm.report.render import build_report

    build_report(out)
    import csv

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run_id"], r["state"]) for r in rows] == [(pid, "done")] and rows[0]["fine_grained"] != ""


def test_two_node_job_trains_one_run(cluster, tmp_path):
    """`slurm.nodes: 2` on the cluster's two slurmd nodes: one job, one task per node, each starts torchrun for its
    node (gloo, one CPU process each) and they form ONE training of 2 processes: world size 2 in the manifest,
    each step logged once, the global batch twice the per-process one (8 captions at 4 per process: one epoch per
    step), the artifact keyed by 2 processes; the point is evaluated and done once."""
    raw = yaml.safe_load((ROOT / "recipes/grids/smoke.yaml").read_text())
    path = _grid(tmp_path, {"set": {**raw["set"], "stages.align.max_steps": 2, "stages.finetune.max_steps": 1,
                                    "stages.finetune.batch_size": 1},  # 4 instructions: 1 x 2 processes x 2 accum
                            "axes": {"s2lr": {"key": "stages.finetune.optim.lr", "values": {"1e-4": 1.0e-4}}},
                            "slurm": {"nodes": 2, "gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 10}})
    out, pid = tmp_path / "gd", "s2lr=1e-4"
    jobs = launch(path, out, executor="slurm", echo=lambda *_: None)
    assert len(jobs) == 1
    job_id = read_record(out, pid)["job_id"]
    _wait_idle(cluster, 420)
    log = (out / "_grid" / "logs" / f"{pid}.log").read_text()
    assert point_state(out, pid) == "done", (read_record(out, pid), log[-3000:],
                                             (out / "_grid/logs" / f"{pid}.node1.log").read_text()[-3000:])
    job = cluster.run("scontrol", "show", "job", "-o", job_id)
    assert "NumNodes=2 " in job and f"NodeList={','.join(sorted(cluster.nodes))} " in job, job
    assert "--nnodes 2 --node_rank 0 --nproc_per_node 1" in log
    assert "--nnodes 2 --node_rank 1" in (out / "_grid" / "logs" / f"{pid}.node1.log").read_text()
    run = out / pid
    manifest = read_json(run / "manifest.json")
    assert manifest["hardware"]["world_size"] == 2
    metrics = [m for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]
    assert [(m["stage"], m["step"]) for m in metrics] == [("align", 1), ("align", 2), ("finetune", 1)]
    captions = manifest["data"]["captions"]["records"]
    per_epoch = captions // (4 * 2)  # steps per epoch at batch_size 4 x 2 processes
    assert per_epoch == 1 and [m["epoch"] for m in metrics if m["stage"] == "align"] == [0, 1]  # 1 process: [0, 0]
    from vlm.recipe.keys import stage_keys
    from vlm.recipe.schema import load_recipe

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["distributed"]["num_processes"] == 2
    over = [f"{k}={json.dumps(v)}" for k, v in load_plan(out)["points"][0]["overrides"].items()]
    key = read_json(run / "stages" / "align" / "artifact.json")["key"]
    assert key == stage_keys(load_recipe(ROOT / "recipes/smoke.yaml", over))[0]
    one = [o for o in over if not o.startswith("distributed.num_processes=")]
    assert key != stage_keys(load_recipe(ROOT / "recipes/smoke.yaml", one))[0]
    assert [e["event"] for e in read_jsonl(out / "_grid" / "events.jsonl")] == ["start", "done"]
    assert read_json(run / "results.json")["fine_grained"] is not None


def test_smoke_grid_on_slurm_with_eval_jobs_and_a_cancelled_job(cluster, tmp_path):
    """The smoke grid on a real SLURM, eval tasks as jobs of their own: one training job is cancelled (scancel)
    while it trains, and its eval jobs go with it (their dependency can no longer be met); the grid run again
    resubmits just that point; every point ends done exactly once with its report row."""
    path = _grid(tmp_path, {"slurm": {"timeout_min": 10, "cpus_per_task": 1},
                            "slurm_eval": {"timeout_min": 10, "cpus_per_task": 1}})
    out = tmp_path / "gd"
    jobs = launch(path, out, executor="slurm", echo=lambda *_: None)
    ids = [p["id"] for p in load_plan(out)["points"]]
    assert len(jobs) == 4 * 3
    victim = "s1llm=frozen,s2lr=3e-4"
    cancelled = []

    def cancel_when_training() -> None:
        st = out / victim / "status.json"
        if not cancelled and st.exists() and read_json(st).get("state") == "running":
            cluster.run("scancel", read_record(out, victim)["job_id"])
            cancelled.append(read_json(st))

    _wait_idle(cluster, 600, cancel_when_training)
    assert cancelled, "the victim never started training"
    states = {pid: point_state(out, pid) for pid in ids}
    assert states.pop(victim) not in ("done", "evaluating") and set(states.values()) == {"done"}, states

    # the CLI, as a user runs it again on the grid dir (SLURM_CONF names the test cluster)
    again = subprocess.run([sys.executable, "-m", "vlm", "grid", str(out), "--executor", "slurm"], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    submitted = [line for line in again.stdout.splitlines() if line.startswith("submitted")]
    assert len(submitted) == 3 and all(victim in line for line in submitted), again.stdout  # training + 2 eval jobs
    _wait_idle(cluster, 300)
    states = {pid: point_state(out, pid) for pid in ids}
    assert set(states.values()) == {"done"}, (states, {pid: read_record(out, pid) for pid in ids})
    events = list(read_jsonl(out / "_grid" / "events.jsonl"))
    for pid in ids:
        assert sum(e["point"] == pid and e["event"] == "done" for e in events) == 1
        assert sorted(e["task"] for e in events if e["point"] == pid and e["event"] == "eval_done") == ["synth_cls", "synth_vqa"]
    train_calls = (out / "_grid" / "logs" / f"{ids[0]}.log").read_text()
    assert "--no-eval" in train_calls

    status = subprocess.run([sys.executable, "-m", "vlm", "status", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert status.returncode == 0 and "4 done" in status.stdout, status.stdout + status.stderr

    from vlm.report.render import build_report

    build_report(out)
    import csv

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run_id"] for r in rows) == sorted(ids)
    assert all(r["state"] == "done" and r["fine_grained"] != "" and r["general"] != "" for r in rows)

"""Grid files, the local and submitit executors, locks, resume after a killed launcher, `vlm status`.

Train and eval are replaced by a stand-in CLI (FAKE_VLM below) that honours the run-dir contract (status.json,
a resumable step counter, eval/<task>/results.json, results.json) and logs every call, so these tests check the
launcher itself quickly; the smoke-grid test at the end runs the real `vlm train` / `vlm eval`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vlm.cli.status import run as run_status
from vlm.errors import UserError
from vlm.grid.executors import lock_path, point_commands, read_record
from vlm.grid.points import launch, load_plan, point_state, validate_grid
from vlm.grid.spec import load_grid
from vlm.io import read_json, read_jsonl

ROOT = Path(__file__).resolve().parent.parent

FAKE_VLM = r'''
import json, os, sys, time
from pathlib import Path

def put(path, text):  # atomic, like vlm.io
    tmp = path.with_suffix(".tmp"); tmp.write_text(text); os.replace(tmp, path)

def log(run, **rec):
    with open(Path(run) / "calls.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "train":
    run = Path(args[args.index("--out") + 1]); run.mkdir(parents=True, exist_ok=True)
    ov = {a.split("=", 1)[0]: json.loads(a.split("=", 1)[1]) for a in args[1:args.index("--out")]}
    (run / "overrides.json").write_text(json.dumps(ov))
    if ov.get("run.name") == "boom":
        print("RuntimeError: the stand-in trainer exploded on purpose"); sys.exit(3)
    metrics = run / "metrics.jsonl"  # doubles as the checkpoint: resume after the last logged step
    start = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    log(run, event="train_start", from_step=start)
    for step in range(start, STEPS):
        time.sleep(DT)
        put(run / "status.json", json.dumps({"stage": "align", "step": step + 1, "total_steps": STEPS}))
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": step + 1, "loss": 1.0 / (step + 1), "stage": "align", "eval": {"flowers": step / STEPS}}) + "\n")
    log(run, event="train_end")
elif cmd == "eval":
    run = Path(args[0]); ov = json.loads((run / "overrides.json").read_text())
    big = ov.get("model.encoder.config.hidden_size", 32) == 48
    unfrozen = ov.get("stages.align.freeze.llm") == "full"
    fine = 0.3 + 0.2 * big + 0.05 * unfrozen
    general = 0.5 + 0.02 * big + 0.1 * unfrozen
    tasks = {"flowers": ("fine_grained", "classification", "mc_acc", fine, {"mc_acc": fine, "open_acc": fine / 2}),
             "flowers_probe": ("probe", "linear_probe", "acc", 0.9, {"acc": 0.9}),
             "vqav2": ("general", "vqav2", "acc", general, {"acc": general})}
    summary = {}
    for name, (family, typ, head, score, metrics) in tasks.items():
        res = {"task": name, "type": typ, "family": family, "headline": head, "score": score, "num_items": 10,
               "metrics": metrics}
        (run / "eval" / name).mkdir(parents=True, exist_ok=True)
        (run / "eval" / name / "results.json").write_text(json.dumps(res))
        right = round(score * 10)  # the 10 items' scores, as every eval task writes them
        (run / "eval" / name / "item_scores.json").write_text(json.dumps({
            "task": name, "family": family, "headline": head,
            "scores": {head: {f"i{i}": float(i < right) for i in range(10)}}}))
        summary[name] = {k: v for k, v in res.items() if k != "task"}
    (run / "results.json").write_text(json.dumps({"tasks": summary, "fine_grained": fine, "general": general,
                                                  "gap": fine - general}))
    log(run, event="eval")
'''


def fake_cli(tmp_path: Path, steps: int = 3, dt: float = 0.01) -> list[str]:
    script = tmp_path / "fake_vlm.py"
    script.write_text(FAKE_VLM.replace("STEPS", str(steps)).replace("DT", str(dt)))
    return [sys.executable, str(script)]


def write_grid(tmp_path: Path, body: str, name: str = "g.yaml") -> Path:
    recipe = tmp_path / "base.yaml"
    recipe.write_text("defaults: [models/tiny.yaml, data/synth_tiny.yaml, stages/llava_two_stage.yaml]\n")
    path = tmp_path / name
    path.write_text(f"base: base.yaml\n{textwrap.dedent(body)}")
    return path


AXES_2X2 = """
name: t
axes:
  enc: {key: model.encoder.config.hidden_size, values: {a: 32, b: 48}}
  s1llm: {key: stages.align.freeze.llm, values: {frozen: frozen, unfrozen: full}}
"""


def calls(run_dir: Path) -> list[dict]:
    return list(read_jsonl(run_dir / "calls.jsonl"))


# ---------------------------------------------------------------- grid files


def test_product_zip_exclude_and_point_overrides(tmp_path):
    path = write_grid(tmp_path, """
        axes:
          enc: {key: model.encoder.type, values: {clip: clip, siglip: siglip, dino: dinov2}}
          llm: {key: model.llm.path, values: {vicuna: v, qwen: q}}
          tmpl: {key: model.llm.chat_template, values: [vicuna_v1, chatml]}
          pt: {values: {llava: {stages.align.data: [captions]}, dense: {stages.align.data: [instructions], stages.align.epochs: 2}}}
        zip: [[llm, tmpl]]
        exclude: [{enc: dino, pt: dense}]
        points: [{match: {enc: siglip, llm: qwen}, set: {stages.finetune.batch_size: 4}}]
    """)
    points = load_grid(path).points()
    ids = [p.id for p in points]
    # 3 encoders x 2 (llm, tmpl zipped) x 2 pt = 12, minus dino x dense (2 points)
    assert len(ids) == 10 and len(set(ids)) == 10
    assert ids[0] == "enc=clip,llm=vicuna,tmpl=vicuna_v1,pt=llava"
    assert "enc=clip,llm=vicuna,tmpl=chatml,pt=llava" not in ids  # zipped, not crossed
    assert not [i for i in ids if "enc=dino" in i and "pt=dense" in i]
    by_id = {p.id: p for p in points}
    p = by_id["enc=siglip,llm=qwen,tmpl=chatml,pt=dense"]
    assert p.overrides == {"model.encoder.type": "siglip", "model.llm.path": "q", "model.llm.chat_template": "chatml",
                           "stages.align.data": ["instructions"], "stages.align.epochs": 2,
                           "stages.finetune.batch_size": 4}
    assert "stages.finetune.batch_size" not in by_id["enc=siglip,llm=vicuna,tmpl=vicuna_v1,pt=dense"].overrides
    assert [p.id for p in load_grid(path).points()] == ids  # deterministic


@pytest.mark.parametrize("body, needle", [
    ("axes: {a: {key: x, values: [1, 2]}}\nzip: [[a, b]]\n", "unknown axis 'b'"),
    ("axes: {a: {key: x, values: [1, 2]}, b: {key: y, values: [1]}}\nzip: [[a, b]]\n", "same number of values"),
    ("axes: {a: {key: x, values: {'bad label': 1}}}\n", "labels ['bad label']"),
    ("axes: {a: {key: x, values: [1]}}\nexclude: [{a: 1}]\n", "every point is excluded"),
    ("axes: {a: {key: x, values: [1]}}\nexclude: [{a: 7}]\n", "has no value 7"),
    ("axes: {a: {values: [1]}}\n", "needs each value to be a mapping"),
    ("axes: {a: {key: x, values: [1]}}\naxis: {}\n", "unknown key axis. Did you mean axes?"),
    ("axes: {}\n", "at least one axis"),
])
def test_bad_grids_are_user_errors(tmp_path, body, needle):
    with pytest.raises(UserError, match=None) as e:
        load_grid(write_grid(tmp_path, body)).points()
    assert needle in str(e.value)


def test_bad_point_recipe_names_the_point(tmp_path):
    path = write_grid(tmp_path, "axes: {lr: {key: stages.align.optim.lrr, values: [0.1]}}\n")
    with pytest.raises(UserError, match=r"point lr=0.1: .*stages.align.optim.lr"):
        validate_grid(path)


def test_validate_shows_shared_stage1_artifacts(tmp_path, capsys):
    path = write_grid(tmp_path, """
        axes:
          s1llm: {key: stages.align.freeze.llm, values: {frozen: frozen, unfrozen: full}}
          lr2: {key: stages.finetune.optim.lr, values: [1.0e-5, 2.0e-5]}
    """)
    validate_grid(path)
    out = capsys.readouterr().out
    assert "stage 1 is trained 2 time(s) for 4 points" in out
    from vlm.cli import main

    assert main(["validate", str(path)]) == 0 and "s1llm=unfrozen,lr2=2e-05" in capsys.readouterr().out
    assert main(["grid", str(path), "--dry-run"]) == 0


# ---------------------------------------------------------------- local executor


def test_local_workers_run_every_point_once_and_record_failures(tmp_path):
    path = write_grid(tmp_path, AXES_2X2 + "points: [{match: {enc: b, s1llm: frozen}, set: {run.name: boom}}]\n")
    out = tmp_path / "gd"
    cli = fake_cli(tmp_path)
    result = launch(path, out, workers=2, cli=cli, echo=lambda *_: None)
    assert result.pop("enc=b,s1llm=frozen") == "failed"
    assert set(result.values()) == {"done"} and len(result) == 3
    rec = read_record(out, "enc=b,s1llm=frozen")
    assert rec["state"] == "failed" and "train exited with code 3" in rec["error"]
    assert "exploded on purpose" in rec["log_tail"]
    for pid in result:
        assert [c["event"] for c in calls(out / pid)] == ["train_start", "train_end", "eval"]
        assert read_json(out / pid / "results.json")["fine_grained"] > 0
    assert (out / "grid.yaml").exists() and load_grid(out / "grid.yaml").base == (tmp_path / "base.yaml").resolve()
    # every point shares one artifact store inside the grid dir
    plan = load_plan(out)
    assert {p["overrides"]["run.artifact_store"] for p in plan["points"]} == {str((out / "artifacts").resolve())}
    # a second launch skips finished points and retries the failed one only
    again = launch(path, out, workers=2, cli=cli, echo=lambda *_: None)
    assert again == {"enc=b,s1llm=frozen": "failed"}
    assert read_record(out, "enc=b,s1llm=frozen")["attempts"] == 2
    for pid in result:
        assert len(calls(out / pid)) == 3


def test_a_point_held_by_another_launcher_is_skipped(tmp_path):
    from filelock import FileLock

    path = write_grid(tmp_path, AXES_2X2)
    out = tmp_path / "gd"
    held = "enc=a,s1llm=unfrozen"
    lock_path(out, held).parent.mkdir(parents=True)
    with FileLock(lock_path(out, held)):
        result = launch(path, out, workers=2, cli=fake_cli(tmp_path), echo=lambda *_: None)
        assert result[held] == "busy" and point_state(out, held) == "running"
    assert not (out / held).exists()
    assert sum(v == "done" for v in result.values()) == 3


def test_changed_point_settings_are_refused(tmp_path):
    path = write_grid(tmp_path, AXES_2X2)
    out = tmp_path / "gd"
    launch(path, out, workers=1, cli=fake_cli(tmp_path), echo=lambda *_: None)
    path.write_text(path.read_text().replace("values: {a: 32, b: 48}", "values: {a: 40, b: 48}"))
    with pytest.raises(UserError, match="enc=a,s1llm=frozen was launched with different settings"):
        launch(path, out, workers=1, cli=fake_cli(tmp_path), echo=lambda *_: None)


def test_killed_launcher_then_rerun_runs_each_point_exactly_once(tmp_path):
    path = write_grid(tmp_path, AXES_2X2)
    out = tmp_path / "gd"
    cli = fake_cli(tmp_path, steps=30, dt=0.05)
    code = "import json,sys; from vlm.grid.points import launch; launch(sys.argv[1], sys.argv[2], workers=2, cli=json.loads(sys.argv[3]))"
    launcher = subprocess.Popen([sys.executable, "-c", code, str(path), str(out), json.dumps(cli)],
                                stdout=subprocess.DEVNULL, cwd=ROOT)
    events = out / "_grid" / "events.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until one point is done and a later one is mid-training
        done = [e for e in read_jsonl(events) if e["event"] == "done"]
        mid = [p for p in out.glob("enc=*") if (p / "status.json").exists() and 3 <= read_json(p / "status.json")["step"] < 25]
        if done and mid:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the launcher made no progress")
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    time.sleep(0.5)  # orphans would keep writing; the workers die with the launcher
    progress = lambda: {p.parent.name: p.read_text() for p in out.glob("enc=*/metrics.jsonl")}  # noqa: E731
    snapshot = progress()
    time.sleep(0.4)
    assert snapshot == progress()
    interrupted = [pid for pid in snapshot if point_state(out, pid) == "interrupted"]
    assert interrupted, {pid: point_state(out, pid) for pid in snapshot}

    result = launch(path, out, workers=2, cli=cli, echo=lambda *_: None)
    plan_ids = [p["id"] for p in load_plan(out)["points"]]
    assert all(point_state(out, pid) == "done" for pid in plan_ids)
    ev = list(read_jsonl(events))
    for pid in plan_ids:
        assert sum(e["point"] == pid and e["event"] == "done" for e in ev) == 1
        steps = [m["step"] for m in read_jsonl(out / pid / "metrics.jsonl")]
        assert steps == list(range(1, 31)), pid  # every training step ran once: nothing redone, nothing skipped
        assert [x["event"] for x in calls(out / pid)].count("eval") == 1
    for pid in interrupted:  # resumed from its checkpoint, not restarted
        starts = [x["from_step"] for x in calls(out / pid) if x["event"] == "train_start"]
        assert starts == [0, len(snapshot[pid].splitlines())]
    assert not [pid for pid, s in result.items() if s != "done"]

    from vlm.report.render import build_report

    build_report(out)
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(plan_ids) and all(",done," in r for r in rows[1:])


def test_status_table(tmp_path, capsys):
    import argparse

    path = write_grid(tmp_path, AXES_2X2 + "points: [{match: {enc: b, s1llm: frozen}, set: {run.name: boom}}]\n")
    out = tmp_path / "gd"
    launch(path, out, workers=1, cli=fake_cli(tmp_path), echo=lambda *_: None)
    run_status(argparse.Namespace(grid_dir=str(out)))
    text = capsys.readouterr().out
    assert text.count("done") >= 3 and "failed" in text and "train exited with code 3" in text
    assert "0.550" in text  # fine-grained of enc=b,s1llm=unfrozen: 0.3 + 0.2 + 0.05
    with pytest.raises(UserError, match="not a grid dir"):
        run_status(argparse.Namespace(grid_dir=str(tmp_path)))


# ---------------------------------------------------------------- SLURM via submitit


def test_slurm_executor_with_submitit_debug_cluster(tmp_path):
    path = write_grid(tmp_path, AXES_2X2 + "slurm: {partition: gpu, timeout_min: 60, cpus_per_task: 2}\n")
    out = tmp_path / "gd"
    jobs = launch(path, out, executor="slurm", cli=fake_cli(tmp_path), slurm_cluster="debug", echo=lambda *_: None)
    assert len(jobs) == 4
    assert all(read_record(out, p["id"])["state"] == "queued" for p in load_plan(out)["points"])
    assert [j.result() for j in jobs] == ["done"] * 4
    assert all(point_state(out, p["id"]) == "done" for p in load_plan(out)["points"])
    assert launch(path, out, executor="slurm", cli=fake_cli(tmp_path), slurm_cluster="debug", echo=lambda *_: None) == []


def test_gpu_points_train_under_accelerate_launch(tmp_path):
    point = {"id": "x=1", "base": "/r.yaml", "overrides": {"stages.align.optim.lr": 0.001}}
    (_, train), (_, ev) = point_commands(tmp_path, point, ["vlm"], gpus=8)
    assert train[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert train[train.index("--num_processes") + 1] == "8"
    assert train[train.index("-m", 3):] == ["-m", "vlm", "train", "/r.yaml", "stages.align.optim.lr=0.001", "--out",
                                             str(tmp_path / "x=1")]
    assert ev == ["vlm", "eval", str(tmp_path / "x=1")]


# ---------------------------------------------------------------- the real smoke grid (Done-when of the grid issue)


def test_smoke_grid_two_workers_killed_and_rerun_covers_every_point_once(tmp_path):
    """Real `vlm train`/`vlm eval` on recipes/grids/smoke.yaml: kill the launcher after the first point finishes,
    launch again, and check every point finished once, stage 1 was trained once per shared artifact, and the
    report covers all points."""
    out = tmp_path / "smoke"
    launcher = subprocess.Popen([sys.executable, "-m", "vlm", "grid", "recipes/grids/smoke.yaml", "--out", str(out),
                                 "--workers", "2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = out / "_grid" / "events.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not [e for e in read_jsonl(events) if e["event"] == "done"]:
        assert launcher.poll() is None, "the launcher exited before any point finished"
        time.sleep(0.2)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    plan_ids = [p["id"] for p in load_plan(out)["points"]]
    assert [point_state(out, pid) for pid in plan_ids].count("done") < len(plan_ids)  # killed mid-way

    result = launch(ROOT / "recipes/grids/smoke.yaml", out, workers=2, echo=lambda *_: None)
    assert all(point_state(out, pid) == "done" for pid in plan_ids), result
    ev = list(read_jsonl(events))
    for pid in plan_ids:
        assert sum(e["point"] == pid and e["event"] == "done" for e in ev) == 1
    trained = {}
    for pid in plan_ids:
        align = read_json(out / pid / "manifest.json")["stages"]["align"]
        trained.setdefault(align["key"], []).append(align["trained"])
    assert len(trained) == 2 and all(flags.count(True) == 1 for flags in trained.values())  # stage 1 shared

    from vlm.report.render import build_report

    build_report(out)
    with open(out / "results.csv", newline="") as f:
        import csv

        rows = list(csv.DictReader(f))
    assert sorted(r["run_id"] for r in rows) == sorted(plan_ids)
    assert all(r["state"] == "done" and r["fine_grained"] != "" and r["general"] != "" for r in rows)


def test_research_grid_validates_when_its_data_is_present(tmp_path, monkeypatch, capsys):
    for var in ("LLAVA_PRETRAIN_IMAGES", "SHAREGPT4V_IMAGES", "LLAVA_FINETUNE_IMAGES"):
        monkeypatch.setenv(var, str(tmp_path))
    path = ROOT / "recipes/grids/fine_grained_knowledge.yaml"
    grid = load_grid(path)
    assert len(grid.points()) == 32 and grid.base.read_text().count(str(ROOT / "recipes")) == 3  # list of bases
    validate_grid(path)
    out = capsys.readouterr().out
    assert "enc=dinosiglip,llm=qwen2.5-7b,pt=sharegpt4v,s1llm=unfrozen" in out
    assert "stage 1 is trained 32 time(s) for 32 points" in out
    from vlm.grid.points import resolve_point

    cfg = resolve_point(grid, grid.points()[-1])
    assert set(cfg.model.encoder) == {"type", "mode", "encoders"}  # the preset, not merged with another encoder
    assert cfg.stages.align.freeze.llm.mode == "full" and list(cfg.stages.align.data[0].values())[0] == "sharegpt4v_pt"

"""Survey grids: a list of model specs evaluated on the same tasks, no training, reported like any grid."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fixtures_eval import builders as B
from test_zero_shot import _two_tower
from vlm.errors import UserError
from vlm.grid.points import launch, load_plan, validate_grid
from vlm.grid.spec import load_grid
from vlm.model.hf_llava import export_hf_llava
from vlm.plan.planner import Settings, plan_target
from vlm.report.collect import collect
from vlm.report.render import build_report, probe_pairs
from vlm.testing import tiny_vlm

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid))
    return path


def test_shipped_survey_grid_validates(capsys):
    grid = load_grid(ROOT / "recipes/grids/survey.yaml")
    assert grid.survey is not None and grid.base is None and list(grid.axes) == ["model"]
    validate_grid(ROOT / "recipes/grids/survey.yaml")
    out = capsys.readouterr().out
    assert "no training" in out and "model=qwen2-vl-7b" in out and "hf:Qwen/Qwen2-VL-7B-Instruct" in out
    plans, warnings, title = plan_target(ROOT / "recipes/grids/survey.yaml", [], Settings())
    assert plans == [] and "nothing trained" in warnings[0] and "10 models" in title


@pytest.mark.parametrize("extra,needle", [
    ({"base": "../smoke.yaml"}, "do not apply"),
    ({"set": {"run.seed": 1}}, "do not apply"),
    ({"slurm_eval": {"timeout_min": 60}}, "do not apply"),
    ({"axes": {"model": {"values": {"a": "hf:x"}}, "lr": {"key": "x", "values": [1]}}}, "exactly one axis"),
    ({"axes": {"model": {"key": "model.encoder", "values": {"a": "hf:x"}}}}, "exactly one axis"),
    ({"survey": {"tasks": []}}, "empty"),
    ({"survey": {"tasks": ["flowers102"], "limt": 3}}, "survey.limt"),
    ({"survey": {"tasks": ["no_such_task"]}}, "survey.tasks[0]"),
    ({"axes": {"model": {"values": {"a": 3}}}}, "model spec is a string"),
])
def test_bad_survey_grids_are_user_errors(tmp_path, extra, needle):
    grid = {"name": "s", "survey": {"tasks": ["flowers102"]}, "axes": {"model": {"values": {"a": "hf:x"}}}, **extra}
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        validate_grid(_write(tmp_path / "g.yaml", grid))


def test_survey_runs_eval_per_model_and_reports(tmp_path):
    """Two loaders of one tiny exported checkpoint (`hf:` and `hf-llava:`) on a fine-grained and a general task:
    each point is `vlm eval --model SPEC`, and the report has a fine-grained vs general row per model."""
    torch.manual_seed(0)
    export = export_hf_llava(tiny_vlm(encoder="clip", llm="llama", family="chatml"), tmp_path / "export")
    birds = B.classification_folder(tmp_path / "birds")
    vqa = B.vqav2(tmp_path / "vqa")
    _two_tower("clip", tmp_path / "clip")
    tasks = [{"type": "classification", "name": "birds", "path": str(birds), "protocols": ["mc"], "k": 2,
              "mining": "tfidf", "mc_generate": False, "options_file": str(tmp_path / "options.json")},
             {"type": "zero_shot", "name": "birds_zero_shot", "path": str(birds), "model": str(tmp_path / "clip"),
              "templates": "birdsnap"},
             {"type": "vqav2", "name": "vqa", **vqa, "max_new_tokens": 3}]
    grid = {"name": "tiny-survey", "survey": {"tasks": tasks, "limit": 4, "batch_size": 2},
            "axes": {"model": {"values": {"hf": f"hf:{export}", "hf-llava": f"hf-llava:{export}"}}}}
    out = tmp_path / "runs"
    result = launch(_write(tmp_path / "survey.yaml", grid), out, echo=lambda *_: None)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((out / "_grid/logs").glob("*.log")))
    assert result == {"model=hf": "done", "model=hf-llava": "done"}, logs
    plan = load_plan(out)
    assert [p["overrides"]["model"] for p in plan["points"]] == [f"hf:{export}", f"hf-llava:{export}"]
    for pid in ("model=hf", "model=hf-llava"):
        res = json.loads((out / pid / "results.json").read_text())
        assert set(res["tasks"]) == {"birds", "birds_zero_shot", "vqa"}
        assert res["fine_grained"] is not None and res["general"] is not None
        assert res["tasks"]["birds"]["num_items"] == 4  # the survey's limit
        assert not (out / pid / "recipe.yaml").exists()  # evaluated, not trained
    build_report(out)
    rows = {r["run_id"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"model=hf", "model=hf-llava"}
    # the same weights through our VLM (hf-llava:) and through HF's own classes (hf:) score alike (solid-colour
    # images, so both image processors give the same pixels)
    assert float(rows["model=hf"]["birds.mc_gold_prob"]) == pytest.approx(float(rows["model=hf-llava"]["birds.mc_gold_prob"]), abs=1e-4)
    assert "model=hf-llava" in (out / "report.md").read_text()
    # the encoder's zero-shot ceiling sits beside the VLM's accuracy on the same data, in the same rows
    pairs = probe_pairs(collect(out))
    assert {(p["run"], p["dataset"]) for p in pairs} == {("model=hf", "birds"), ("model=hf-llava", "birds")}
    for p in pairs:
        assert p["vlm"] == pytest.approx(float(rows[p["run"]]["birds.score"]))
        assert p["probe"] == pytest.approx(float(rows[p["run"]]["birds_zero_shot.score"]))
    # a second launch finds both done and runs nothing
    assert launch(tmp_path / "survey.yaml", out, echo=lambda *_: None) == {}


FAKE_EVAL = r'''
import json, sys
from pathlib import Path
import yaml
args = sys.argv[2:]
assert sys.argv[1] == "eval", sys.argv
out = Path(args[args.index("--out") + 1]); out.mkdir(parents=True, exist_ok=True)
tasks = yaml.safe_load(open(args[args.index("--tasks-file") + 1]))
(out / "argv.json").write_text(json.dumps({"model": args[args.index("--model") + 1], "tasks": tasks}))
(out / "results.json").write_text(json.dumps({"tasks": {}, "fine_grained": 0.5, "general": 0.7, "gap": -0.2}))
'''


def test_survey_points_run_as_slurm_jobs(tmp_path):
    """The SLURM executor (submitit's debug cluster: the same job code, run in this process) runs each survey
    point as `vlm eval --model SPEC --tasks-file ...` and nothing else."""
    script = tmp_path / "fake_vlm.py"
    script.write_text(FAKE_EVAL)
    grid = {"name": "s", "survey": {"tasks": ["flowers102", {"recipe": "pets", "limit": 3}]},
            "axes": {"model": {"values": {"a": "hf:org/a", "b": "hf:org/b"}}},
            "slurm": {"partition": "gpu", "timeout_min": 60, "gpus_per_node": 1}}
    out = tmp_path / "gd"
    path = _write(tmp_path / "g.yaml", grid)
    jobs = launch(path, out, executor="slurm", cli=[sys.executable, str(script)], slurm_cluster="debug",
                  echo=lambda *_: None)
    assert [j.result() for j in jobs] == ["done", "done"]
    for label in ("a", "b"):
        argv = json.loads((out / f"model={label}" / "argv.json").read_text())
        assert argv == {"model": f"hf:org/{label}", "tasks": ["flowers102", {"recipe": "pets", "limit": 3}]}

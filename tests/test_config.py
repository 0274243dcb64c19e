"""One way to check configuration (issue 14 point 3): `vlm.config` against builder signatures, and every config it
now refuses before any compute — each of these was accepted by the old code (or failed only after training)."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest

from connectors import build_connector
from eval.runner import check_tasks
from vlm.cli import main
from vlm.config import MISSING, Check, Positive, Range, check, check_value, fields
from vlm.errors import UserError
from vlm.grid.points import launch
from vlm.grid.spec import load_grid
from vlm.model.llm import check_llm_config
from vlm.model.vlm import build_vlm
from vlm.recipe.schema import load_recipe
from vlm.testing import tiny_vlm_config

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the mechanism


def _builder(*, vision_dim: int, depth: Annotated[int, Range(ge=1)] = 2, act: Literal["gelu", "relu"] = "gelu",
             scale: float = 1.0, name: str) -> None:
    """A stand-in builder: `vision_dim` is context, the rest are config keys."""


def test_fields_come_from_the_builder_signature():
    spec = fields(_builder, skip={"vision_dim"})
    assert list(spec) == ["depth", "act", "scale", "name"]
    assert spec["depth"][1] == 2 and spec["name"][1] is MISSING


def test_check_fills_defaults_coerces_and_names_the_path():
    assert check({"name": "x", "scale": 2}, _builder, "model.c", skip={"vision_dim"}) == \
        {"depth": 2, "act": "gelu", "scale": 2.0, "name": "x"}
    assert check({"name": "x", "scale": "1e-3"}, _builder, "m", skip={"vision_dim"})["scale"] == 1e-3  # YAML 1.1
    cases = [
        ({"name": "x", "dpeth": 3}, r"unknown key model\.c\.dpeth\. Did you mean model\.c\.depth\?"),
        ({"name": "x", "depth": 0}, r"model\.c\.depth = 0 is out of range: it must be >= 1"),
        ({"name": "x", "depth": True}, r"model\.c\.depth must be int, got bool"),
        ({"name": "x", "act": "gelu_new"}, r"model\.c\.act = 'gelu_new' is not one of 'gelu', 'relu'\. Did you mean 'gelu'\?"),
        ({}, r"model\.c\.name is required"),
        ({"name": None}, r"model\.c\.name must not be null"),
    ]
    for cfg, match in cases:
        with pytest.raises(UserError, match=match):
            check(cfg, _builder, "model.c", skip={"vision_dim"})


def test_check_value_nested_types_and_named_values():
    @dataclass
    class Inner:
        lr: Annotated[float, Range(gt=0)] = 1.0
        tags: list[str] = field(default_factory=list)

    assert check_value({"lr": 3}, Inner, "a") == {"lr": 3.0, "tags": []}
    with pytest.raises(UserError, match=r"a\.tags\[1\] must be str, got int"):
        check_value({"tags": ["x", 1]}, Inner, "a")
    with pytest.raises(UserError, match=r"a\.lr = -1\.0 is out of range: it must be > 0"):
        check_value({"lr": -1}, Inner, "a")
    colour = Annotated[str, Check(lambda v: v in ("red", "blue"), "a colour", lambda: ["red", "blue"])]
    assert check_value(None, Optional[colour], "c") is None
    with pytest.raises(UserError, match=r"c = 'rde' is not a colour\. Did you mean 'red'\? Known: blue, red\."):
        check_value("rde", Optional[colour], "c")
    assert check({"k": 2}, {"k": Positive, "j": str}, "t") == {"k": 2}  # a mapping schema: optional keys, no defaults


# ---------------------------------------------------------------- configs the checker now refuses


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    rec = {"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                         {"from": "gpt", "value": "A red dot."}]}
    (tmp_path / "caps.json").write_text(json.dumps([rec] * 4))
    p = tmp_path / "r.yaml"
    p.write_text(f"""defaults: [models/tiny.yaml, stages/llava_two_stage.yaml]
run: {{name: t}}
datasets:
  captions: {{type: llava, path: {tmp_path / 'caps.json'}}}
  instructions: {{type: llava, path: {tmp_path / 'caps.json'}}}
eval:
  tasks:
    - {{type: pope, name: pope_local, data_files: {tmp_path / 'pope.jsonl'}}}
""")
    return p


REFUSED = [
    # the connector accepted typos silently: {type: mlp, dpeth: 3} built a depth-2 MLP and trained
    (["model.connector={type: mlp, dpeth: 3}"], r"unknown key model\.connector\.dpeth\. Did you mean model\.connector\.depth\?"),
    (["model.connector={type: resampler, num_querys: 8}"], r"model\.connector\.num_querys\. Did you mean model\.connector\.num_queries\?"),
    (["model.connector={type: avgpool, factor: 0}"], r"model\.connector\.factor = 0 is out of range"),
    (["model.connector={type: mlp2x_gelu, depth: 3}"], r"model\.connector\.depth = 3 is not one of 2"),
    (["model.connector={type: mpl}"], r"model\.connector\.type: unknown connector type 'mpl'\. Did you mean 'mlp'\?"),
    # a negative (or zero) learning rate passed
    (["stages.align.optim.lr=-1e-3"], r"stages\.align\.optim\.lr = -0\.001 is out of range: it must be > 0"),
    (["stages.align.optim.lr=0"], r"stages\.align\.optim\.lr = 0\.0 is out of range"),
    (["stages.finetune.freeze.llm={mode: lora, dropout: 1.5}"], r"stages\.finetune\.freeze\.llm\.dropout = 1\.5 is out of range"),
    (["stages.align.optim.warmup_ratio=2"], r"warmup_ratio = 2\.0 is out of range: it must be >= 0 and <= 1"),
    (["stages.align.optim.betas=[0.9]"], r"stages\.align\.optim\.betas = \[0\.9\] is not two numbers"),
    (["stages.align.epochs=0"], r"stages\.align\.epochs = 0\.0 is out of range"),
    (["distributed.num_processes=0"], r"distributed\.num_processes = 0 is out of range"),
    # an unknown chat template passed (the LLM's, and a stage's: its samples became broken samples)
    (["model.llm.chat_template=vicuna"], r"model\.llm\.chat_template = 'vicuna' is not a chat template of "
                                         r"vlm/model/templates/\. Did you mean 'vicuna_v1'\?"),
    (["stages.align.chat_template=plian"], r"stages\.align\.chat_template = 'plian' is not a chat template.*'plain'"),
    (["model.llm.chat_templat=plain"], r"unknown key model\.llm\.chat_templat\. Did you mean model\.llm\.chat_template\?"),
    (["model.llm.dtype=float8"], r"model\.llm\.dtype = 'float8' is not one of"),
    (["model.vision=x"], r"unknown key model\.vision"),
    (["datasets.captions.pth=x"], r"unknown key datasets\.captions\.pth\. Did you mean datasets\.captions\.path\?"),
]


@pytest.mark.parametrize("overrides,match", REFUSED)
def test_load_recipe_refuses(recipe, overrides, match):
    with pytest.raises(UserError, match=match):
        load_recipe(recipe, overrides)


EVAL_REFUSED = [
    # the eval tasks of a recipe were not checked: an unknown task or a misspelt key surfaced after training
    ("[flowers1022]", r"eval\.tasks\[0\]: eval task recipe 'flowers1022' not found"),
    ("[{type: classificaton, name: c}]", r"eval\.tasks\[0\]\.type: unknown eval task type 'classificaton'\. Did you "
                                          r"mean 'classification'\?"),
    ("[{recipe: flowers102, protocls: [mc]}]", r"unknown key eval\.tasks\[0\]\.protocls\. Did you mean "
                                              r"eval\.tasks\[0\]\.protocols\?"),
    ("[{recipe: flowers102, k: 0}]", r"eval\.tasks\[0\]\.k = 0 is out of range"),
    ("[pope, {recipe: pope}]", r"eval\.tasks: eval task names must be unique; repeated: \['pope'\]"),
    ("[{type: spec, name: s, path: x, score: avg}]", r"eval\.tasks\[0\]\.score = 'avg' is not one of 'mean', 'sum'"),
    ("[{type: mmbench, name: m, mode: generat}]", r"eval\.tasks\[0\]: task 'm': mode must be"),
]


@pytest.mark.parametrize("tasks,match", EVAL_REFUSED)
def test_validate_and_train_refuse_bad_eval_tasks(recipe, tmp_path, capsys, tasks, match):
    assert main(["validate", str(recipe), f"eval.tasks={tasks}"]) == 2
    assert re.search(match, " ".join(capsys.readouterr().err.split())), match
    out = tmp_path / "run"
    assert main(["train", str(recipe), f"eval.tasks={tasks}", "--out", str(out)]) == 2
    assert not out.exists()  # refused before any compute: no run dir


def test_quick_tasks_are_checked_too(recipe):
    from eval.runner import check_recipe_tasks

    with pytest.raises(UserError, match=r"eval\.quick_tasks\[0\]"):
        check_recipe_tasks(load_recipe(recipe, ["eval.quick_tasks=[{recipe: pope, prompt: 3}]"]))


def test_every_shipped_eval_recipe_passes_its_schema():
    names = sorted(p.stem for p in (ROOT / "recipes" / "eval").glob("*.yaml"))
    assert len(check_tasks(names)) == len(names)


def test_connector_and_encoder_errors_name_the_recipe_path():
    cfg = tiny_vlm_config()
    with pytest.raises(UserError, match=r"unknown key model\.connector\.dpeth"):
        build_vlm({**cfg, "connector": {"type": "mlp", "dpeth": 3}})
    with pytest.raises(UserError, match=r"^model\.encoder: .*select_layr"):
        build_vlm({**cfg, "encoder": {**cfg["encoder"], "select_layr": -2}})
    with pytest.raises(UserError, match=r"unknown key connector\.dpeth"):  # outside a recipe: the part's own name
        build_connector({"type": "mlp", "dpeth": 3}, vision_dim=8, llm_dim=8, num_tokens=4)
    with pytest.raises(UserError, match=r"model\.llm needs exactly one of `path`"):
        check_llm_config({"tokenizer": "builtin:chatml"}, "model.llm")


def test_validate_names_the_misspelt_connector_key(recipe, capsys):
    assert main(["validate", str(recipe), "model.connector={type: mlp, dpeth: 3}"]) == 2
    assert "model.connector.dpeth. Did you mean model.connector.depth?" in " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------- grid files


def _grid(tmp_path: Path, recipe: Path, extra: str) -> Path:
    g = tmp_path / "g.yaml"
    g.write_text(f"base: {recipe}\naxes: {{lr: {{key: stages.align.optim.lr, values: [0.1, 0.2]}}}}\n{extra}")
    return g


@pytest.mark.parametrize("extra,match", [
    ("axis: {}\n", r"unknown key axis\. Did you mean axes\?"),
    ("workers: 0\n", r"workers = 0 is out of range: it must be >= 1"),
    ("workers: two\n", r"workers must be int"),
    ("zip: llm\n", r"zip must be a list"),
])
def test_grid_file_refuses(tmp_path, recipe, extra, match):
    with pytest.raises(UserError, match=match):
        load_grid(_grid(tmp_path, recipe, extra))


def test_grid_axis_keys_are_checked(tmp_path, recipe):
    g = tmp_path / "g.yaml"
    g.write_text(f"base: {recipe}\naxes: {{lr: {{kye: stages.align.optim.lr, values: [0.1]}}}}\n")
    with pytest.raises(UserError, match=r"unknown key axes\.lr\.kye\. Did you mean axes\.lr\.key\?"):
        load_grid(g)


def test_grid_workers_key_is_the_local_default(tmp_path, recipe, monkeypatch):
    """`workers:` in a grid file was accepted and never read; now it is `vlm grid`'s default worker count."""
    import vlm.grid.points as points

    seen = []
    monkeypatch.setattr(points, "run_local", lambda grid_dir, ids, workers, cli, echo: seen.append(workers) or {})
    g = _grid(tmp_path, recipe, "workers: 3\n")
    assert load_grid(g).workers == 3
    launch(g, tmp_path / "gd", echo=lambda m: None)
    launch(g, tmp_path / "gd", workers=1, echo=lambda m: None)  # --workers wins
    assert seen == [3, 1]


FAKE_TRAIN = r'''
import json, os, sys
from pathlib import Path
cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "train":
    run = Path(args[args.index("--out") + 1]); run.mkdir(parents=True, exist_ok=True)
    (run / f"rank{os.environ.get('RANK', '-')}.json").write_text(json.dumps(
        {"rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE")}))
else:
    Path(args[0], "results.json").write_text("{}")
'''


def test_local_executor_honours_num_processes(tmp_path, recipe):
    """`distributed.num_processes` was ignored by the local executor; now train runs under `accelerate launch` with
    that many processes (2 CPU processes here: each sees WORLD_SIZE=2)."""
    script = tmp_path / "fake_vlm.py"
    script.write_text(FAKE_TRAIN)
    g = _grid(tmp_path, recipe, "set: {distributed.num_processes: 2}\n")
    out = tmp_path / "gd"
    outcome = launch(g, out, cli=[sys.executable, str(script)], echo=lambda m: None)
    assert set(outcome.values()) == {"done"}, (outcome, [p.read_text()[-2000:] for p in (out / "_grid" / "logs").glob("*")])
    for pid in outcome:
        ranks = sorted(json.loads(p.read_text())["rank"] for p in (out / pid).glob("rank*.json"))
        worlds = {json.loads(p.read_text())["world"] for p in (out / pid).glob("rank*.json")}
        assert ranks == ["0", "1"] and worlds == {"2"}



def test_a_task_on_another_tasks_recipe_takes_only_its_own_keys():
    """`{recipe: flowers102, type: linear_probe}` (the research grid) reuses the classification recipe's data keys;
    its protocol settings stay behind, while the spec's own keys are still checked."""
    from eval.runner import resolve_task

    cfg = resolve_task({"recipe": "flowers102", "type": "linear_probe", "name": "p", "train_split": "train"})
    assert cfg["type"] == "linear_probe" and "protocols" not in cfg and cfg["hf"]
    check_tasks([cfg])
    with pytest.raises(UserError, match=r"eval\.tasks\[0\]\.protocols"):
        check_tasks([{"recipe": "flowers102", "type": "linear_probe", "name": "p", "protocols": ["mc"]}])

"""Recipes: composition, overrides, the typed schema and its error catalogue, `vlm validate`, stage keys, docs."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vlm.cli.validate
from vlm.cli import main
from vlm.errors import UserError
from vlm.recipe.keys import stage_keys
from vlm.recipe.schema import RECIPES_ROOT, Recipe, compose, load_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    rec = {"id": "0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                         {"from": "gpt", "value": "A red dot."}]}
    path = tmp_path / "caps.json"
    path.write_text(json.dumps([rec] * 4))
    return path


def _recipe(tmp_path: Path, data_file: Path, extra: str = "") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"""defaults: [models/tiny.yaml, stages/llava_two_stage.yaml]
run: {{name: t}}
datasets:
  captions: {{type: llava, path: {data_file}}}
  instructions: {{type: llava, path: {data_file}}}
{extra}""")
    return p


def test_compose_defaults_body_and_overrides(tmp_path, data_file):
    p = _recipe(tmp_path, data_file, "stages:\n  finetune: {freeze: {llm: lora}}\n")
    cfg = load_recipe(p, ["stages.align.optim.lr=0.5", "run.seed=7", "stages.finetune.freeze.vision=frozen"])
    assert list(cfg.stages) == ["align", "finetune"]  # order of the base file kept
    assert cfg.stages.align.optim.lr == 0.5 and cfg.run.seed == 7
    assert cfg.stages.align.freeze.connector.mode == "full"  # from stages/llava_two_stage.yaml
    assert cfg.stages.finetune.freeze.llm.mode == "lora"  # string shorthand merged key-wise into the dict form
    assert cfg.stages.finetune.freeze.llm.r == 8  # schema default filled in
    assert cfg.stages.finetune.optim.lr == 2e-5  # "2.0e-5" from YAML is a float
    assert cfg.model.llm.tokenizer == "builtin:chatml"


def test_mapping_overrides_replace_and_stages_can_be_indexed(tmp_path, data_file):
    """What a grid axis does: `model.encoder={...}` swaps the whole encoder config, not a key-wise blend."""
    p = _recipe(tmp_path, data_file)
    cfg = load_recipe(p, ['model.encoder={"type": "siglip", "config": {"hidden_size": 16}}', "stages.1.optim.lr=0.25",
                          "stages.0.data=instructions", "stages.finetune.freeze.llm={mode: lora, r: 2}"])
    assert dict(cfg.model.encoder) == {"type": "siglip", "config": {"hidden_size": 16}}
    assert cfg.stages.finetune.optim.lr == 0.25 and cfg.stages.align.optim.lr == 1e-3
    assert [d.dataset for d in cfg.stages.align.data] == ["instructions"]
    assert cfg.stages.finetune.freeze.llm.r == 2
    with pytest.raises(UserError, match="stage index 5 but the recipe has 2 stages"):
        load_recipe(p, ["stages.5.optim.lr=1"])


def test_research_grid_variants_compose(tmp_path, data_file):
    for name, check in [
        ("stage1_llm_unfrozen", lambda c: c.stages.align.freeze.llm.mode == "full" and c.stages.align.freeze.llm.lr == 2e-5),
        ("stage2_vision_partial", lambda c: c.stages.finetune.freeze.vision.mode == "partial" and c.stages.finetune.freeze.vision.k == 4),
        ("stage2_vision_full", lambda c: c.stages.finetune.freeze.vision.mode == "full"),
        ("stage2_lora", lambda c: c.stages.finetune.freeze.llm.mode == "lora" and c.stages.finetune.freeze.llm.r == 128),
        ("single_stage", lambda c: not c.stages.align.enabled and [d.dataset for d in c.stages.finetune.data] == ["captions", "instructions"]),
    ]:
        p = tmp_path / f"{name}.yaml"
        p.write_text(f"defaults: [models/tiny.yaml, stages/{name}.yaml]\ndatasets:\n"
                     f"  captions: {{type: llava, path: {data_file}}}\n  instructions: {{type: llava, path: {data_file}}}\n")
        assert check(load_recipe(p)), name


@pytest.mark.parametrize("override, message", [
    (["stages.align.optim.lrr=1"], r"unknown key stages\.align\.optim\.lrr\. Did you mean stages\.align\.optim\.lr\?"),
    (["run.sed=1"], r"Did you mean run\.seed\?"),
    (["stages.align.batch_size=abc"], r"stages\.align\.batch_size must be int, got str"),
    (["stages.align.precision=bf1"], r"stages\.align\.precision = 'bf1' is not one of .*Did you mean 'bf16'\?"),
    (["stages.align.freeze.llm=frozn"], r"Did you mean 'frozen'\?"),
    (["stages.align.data=[nope]"], r"names dataset 'nope', which is not defined"),
    (["datasets.captions.path=/does/not/exist.json"], r"datasets\.captions\.path: file /does/not/exist\.json not found"),
    (["stages.align.freeze.connector=frozen"], r"every module is frozen, so nothing would train"),
    (["stages.align.freeze.connector=lora"], r"LoRA on the connector is not supported"),
    (["stages.align.batch_size=0"], r"stages\.align\.batch_size = 0 is out of range: it must be >= 1"),
    (["nokey"], r"not of the form key=value"),
])
def test_bad_recipes_raise_one_clear_user_error(tmp_path, data_file, override, message):
    p = _recipe(tmp_path, data_file)
    with pytest.raises(UserError, match=message):
        load_recipe(p, override)


def test_deepspeed_strategy_needs_deepspeed(tmp_path, data_file, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(UserError, match="deepspeed_zero3 needs DeepSpeed, which is not installed"):
        load_recipe(_recipe(tmp_path, data_file), ["distributed.strategy=deepspeed_zero3"])
    assert load_recipe(_recipe(tmp_path, data_file), ["distributed.strategy=fsdp"]).distributed.strategy == "fsdp"
    monkeypatch.setattr(importlib.util, "find_spec", real)
    with pytest.raises(UserError, match="DeepSpeed fixes the micro-batch"):
        load_recipe(_recipe(tmp_path, data_file), ["distributed.strategy=deepspeed_zero2"])  # batch 32 vs 16
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "tensorboardX")
                        else real(name, *a))
    with pytest.raises(UserError, match="run.trackers lists tensorboard, but tensorboard is not installed"):
        load_recipe(_recipe(tmp_path, data_file), ["run.trackers=[tensorboard]"])


def test_only_datasets_used_by_enabled_stages_must_exist(tmp_path, data_file):
    p = _recipe(tmp_path, data_file)
    p.write_text(p.read_text() + "  spare: {type: llava, path: /not/here.json}\n")  # appended under datasets:
    assert "spare" in load_recipe(p).datasets
    with pytest.raises(UserError, match="datasets.spare.path: file /not/here.json not found"):
        load_recipe(p, ["stages.align.data=[captions, spare]"])


def test_missing_base_and_self_include(tmp_path, data_file):
    p = tmp_path / "r.yaml"
    p.write_text("defaults: [models/nope.yaml]\n")
    with pytest.raises(UserError, match="base file 'models/nope.yaml'.*not found"):
        load_recipe(p)
    p.write_text("defaults: [r.yaml]\n")
    with pytest.raises(UserError, match="includes itself"):
        load_recipe(p)


def test_partial_without_blocks_is_caught_on_the_model(tmp_path, data_file, capsys):
    """The connector (an MLP) has no stacked blocks: `partial` on it fails before any run dir exists."""
    p = _recipe(tmp_path, data_file)
    out = tmp_path / "run"
    rc = main(["train", str(p), "stages.align.freeze.connector=partial", "--out", str(out)])
    assert rc == 2 and not out.exists()
    rc = main(["validate", str(p), "stages.finetune.freeze.llm.mode=partial", "stages.finetune.freeze.llm.k=9"])
    assert rc == 2
    rc = main(["train", str(p), "stages.align.batch_size=5", "--out", str(out)])  # 4 samples < one batch
    assert rc == 2 and not out.exists() and "fewer than one global batch" in capsys.readouterr().err


def test_cli_user_error_exit_2_no_traceback_no_run_dir(tmp_path, data_file):
    p = _recipe(tmp_path, data_file)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "vlm", "train", str(p), "stages.align.optim.lrr=1", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Did you mean stages.align.optim.lr?" in proc.stderr
    assert not out.exists()


def test_validate_prints_plan(tmp_path, data_file, capsys):
    p = _recipe(tmp_path, data_file)
    assert main(["validate", str(p), "stages.finetune.freeze.llm=lora", "stages.finetune.freeze.vision.mode=partial",
                 "stages.finetune.freeze.vision.k=1"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:2]) for line in out.splitlines()}
    assert ("align", "vision") in rows and ("finetune", "vision") in rows
    assert re.search(r"connector\s+full\s+6,272\s+0\.001", out)  # mlp2x_gelu 32->64->64: 32*64+64+64*64+64
    assert re.search(r"llm\s+lora\(r=8\)\s+[1-9][\d,]*\s+2e-05", out)
    assert re.search(r"partial\(k=1\)\s+[1-9]", out)
    assert out.count("artifact ") == 2


def test_validate_delegates_grid_files(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(vlm.cli.validate, "validate_grid", lambda path: seen.append(Path(path)) or 0)
    g = tmp_path / "g.yaml"
    g.write_text("base: x.yaml\naxes: {a: {key: run.seed, values: [1, 2]}}\n")
    assert main(["validate", str(g)]) == 0 and seen == [g]


def test_stage_keys_chain(tmp_path, data_file):
    p = _recipe(tmp_path, data_file)
    base = stage_keys(load_recipe(p))
    assert len(base) == 2 and len(set(base)) == 2
    ft = stage_keys(load_recipe(p, ["stages.finetune.optim.lr=1e-4"]))
    assert ft[0] == base[0] and ft[1] != base[1]  # a stage-2 change keeps stage 1 shareable
    al = stage_keys(load_recipe(p, ["stages.align.optim.lr=1e-4"]))
    assert al[0] != base[0] and al[1] != base[1]  # stage 2 starts from a different artifact
    assert stage_keys(load_recipe(p, ["stages.align.save_every=5"])) == base  # bookkeeping is not identity
    assert stage_keys(load_recipe(p, ["run.seed=1"]))[0] != base[0]
    data_file.write_text(data_file.read_text().replace("red", "blue"))
    assert stage_keys(load_recipe(p))[0] != base[0]  # data content is part of the key


def test_named_hub_datasets_and_shipped_recipes_validate():
    raw = compose(RECIPES_ROOT / "data" / "llava.yaml")
    assert raw["datasets"]["captions"]["path"].endswith("blip_laion_cc_sbu_558k.json")
    assert raw["datasets"]["instructions"]["path"].endswith("llava_v1_5_mix665k.json")
    for f in ("sharegpt4v.yaml", "pixmo_cap.yaml"):
        assert compose(RECIPES_ROOT / "data" / f)["datasets"]


def _schema_keys(tp=Recipe, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(tp)
    for f in dataclasses.fields(tp):
        key = f"{prefix}{f.name}"
        t = hints[f.name]
        args = typing.get_args(t)
        if t.__name__ == "FreezePolicy" if isinstance(t, type) else False:
            yield from _schema_keys(typing.get_type_hints(t)["llm"], key + ".<module>.")
        elif dataclasses.is_dataclass(t):
            yield from _schema_keys(t, key + ".")
        elif typing.get_origin(t) is dict and args and dataclasses.is_dataclass(args[1]):
            yield from _schema_keys(args[1], key + ".<name>.")
        elif typing.get_origin(t) is list and args and dataclasses.is_dataclass(args[0]):
            yield from _schema_keys(args[0], key + "[].")
        else:
            yield key


def test_docs_reference_matches_schema():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_<>\[\].]+)` \|", doc, flags=re.M))
    schema = set(_schema_keys())
    assert schema - documented == set(), "keys missing from docs/recipes.md"
    assert documented - schema == set(), "docs/recipes.md documents keys the schema lacks"

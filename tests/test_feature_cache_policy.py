"""The frozen-encoder feature cache at real scale (issue 17.9): keyed on and stored in the stage's compute dtype,
used only where it pays (more than one pass over the images, or asked for), its size stated before writing."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from _train_data import write_recipe
from vlm.io import read_json, read_jsonl
from vlm.recipe.schema import load_recipe
from vlm.train.feature_cache import FeatureCache
from vlm.train.steps import train

ALIGN = ["stages.finetune.enabled=false", "stages.align.batch_size=4", "stages.align.max_length=128",
         "stages.align.optim.warmup_ratio=0.0"]


def test_the_key_includes_the_dtype(tmp_path):
    a = FeatureCache(tmp_path, "enc", torch.float32)
    b = FeatureCache(tmp_path, "enc", torch.bfloat16)
    assert a.dir != b.dir


def test_one_pass_stages_do_not_cache(tmp_path):
    recipe = write_recipe(tmp_path)  # 16 samples, global batch 4: 4 steps = one epoch
    train(load_recipe(recipe, ALIGN + ["stages.align.max_steps=4"]), tmp_path / "run")
    assert not (tmp_path / "fc").exists()
    m = [x for x in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in x]
    assert "feature_cache_hits" not in m[-1]
    assert read_json(tmp_path / "run" / "manifest.json")["stages"]["align"]["feature_cache"] == \
        {"used": False, "why": "one pass over the images (epochs <= 1): the cache would never be read"}


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_multi_epoch_stages_cache_in_the_compute_dtype(tmp_path, capfd, precision, dtype):
    recipe = write_recipe(tmp_path)
    cfg = load_recipe(recipe, ALIGN + ["stages.align.epochs=2", f"stages.align.precision={precision}"])
    train(cfg, tmp_path / "run")
    files = sorted((tmp_path / "fc").rglob("*.safetensors"))
    assert len(files) == 16
    assert {load_file(str(f))["features"].dtype for f in files} == {dtype}
    m = [x for x in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in x]
    assert m[-1]["feature_cache_hits"] == 16 and m[-1]["feature_cache_misses"] == 16
    fc = read_json(tmp_path / "run" / "manifest.json")["stages"]["align"]["feature_cache"]
    per_image = load_file(str(files[0]))["features"].numel() * dtype.itemsize
    assert fc["used"] and fc["images"] == 16 and fc["estimated_bytes"] == 16 * per_image
    err = capfd.readouterr().err  # stated before the first write
    assert f"feature cache" in err and f"({fc['estimated_bytes']} bytes)" in err


def test_forcing_the_cache_on_a_one_pass_stage(tmp_path):
    recipe = write_recipe(tmp_path)
    cfg = load_recipe(recipe, ALIGN + ["stages.align.max_steps=4", "stages.align.feature_cache=true"])
    train(cfg, tmp_path / "run")
    assert len(list((tmp_path / "fc").rglob("*.safetensors"))) == 16

"""2 CPU processes (gloo) under fsdp and ddp: a bf16 LLM (LoRA) next to an fp32 encoder (last block trained) trains,
checkpoints, resumes, saves artifacts, reloads equal to the in-run model and evaluates (issue 17.3).

FSDP really shards: torch's `fully_shard` per LLM decoder layer and vision block (accelerate's FSDP plugin is
ignored on CPU), and `manifest.json` records the setup that was engaged."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from _train_data import ROOT, launch, write_recipe
from vlm.io import read_json, read_jsonl

BODY = """model:
  llm: {dtype: bfloat16}
stages:
  align: {max_steps: 2, batch_size: 2, max_length: 128, precision: bf16, optim: {warmup_ratio: 0.0}}
  finetune:
    max_steps: 3
    batch_size: 2
    max_length: 128
    precision: bf16
    save_every: 1
    gradient_checkpointing: true
    optim: {lr: 1.0e-3, warmup_ratio: 0.0}
    freeze: {vision: {mode: partial, k: 1}, llm: {mode: lora, r: 4}}
eval:
  tasks:
    - {type: classification, name: cls, path: "${synth_world:tiny,0}/classification", protocols: [open],
       max_new_tokens: 4, limit: 6}
  every_steps: 2
  quick_tasks: ${eval.tasks}
"""


def _artifact(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(read_json(run / "stages" / stage / "artifact.json")["path"]) / "weights.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process run per strategy (started together: the machine has few cores, they mostly wait on each other)."""
    tmp = tmp_path_factory.mktemp("dist")
    recipe = write_recipe(tmp, BODY)
    procs = {s: launch(2, "train", str(recipe), f"distributed.strategy={s}", "--out", str(tmp / s))
             for s in ("ddp", "fsdp")}
    for s, p in procs.items():
        assert p.wait(timeout=900) == 0, p.stdout.read()[-6000:]
    return tmp, recipe


def test_fsdp_engages_and_manifest_says_so(runs):
    tmp, _ = runs
    d = read_json(tmp / "fsdp" / "manifest.json")["distributed"]
    assert d["strategy"] == "fsdp" and d["world_size"] == 2 and d["backend"] == "gloo"
    assert d["engaged"].startswith("torch fully_shard")
    # one unit per LLM decoder layer (2) and per vision block (2), plus the root
    assert d["sharded_units"] == 5 and d["mixed_precision"] == {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    assert read_json(tmp / "ddp" / "manifest.json")["distributed"]["engaged"].startswith("DistributedDataParallel")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_quick_evals_run_during_sharded_stages(runs, strategy):
    """The main process evaluates a plain copy of the sharded model every `eval.every_steps` and at a stage's end."""
    tmp, _ = runs
    evals = [(x["stage"], x["step"]) for x in read_jsonl(tmp / strategy / "metrics.jsonl") if "eval" in x]
    assert evals == [("align", 2), ("finetune", 2), ("finetune", 3)]
    assert (tmp / strategy / "stages" / "finetune" / "eval" / "step_00000002" / "results.json").is_file()


def test_fsdp_trains_like_ddp_with_global_norm_clipping(runs):
    tmp, recipe = runs
    m = {s: [x for x in read_jsonl(tmp / s / "metrics.jsonl") if "loss" in x] for s in ("ddp", "fsdp")}
    assert [(x["stage"], x["step"]) for x in m["fsdp"]] == [(x["stage"], x["step"]) for x in m["ddp"]]
    assert [x["loss"] for x in m["fsdp"]] == pytest.approx([x["loss"] for x in m["ddp"]], rel=3e-2)
    # a per-rank norm would be ~1/sqrt(2) of the global one
    assert [x["grad_norm"] for x in m["fsdp"]] == pytest.approx([x["grad_norm"] for x in m["ddp"]], rel=5e-2)
    for stage in ("align", "finetune"):
        a, b = _artifact(tmp / "ddp", stage), _artifact(tmp / "fsdp", stage)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype == torch.float32 for k in a)  # fp32 master weights, gathered in full
    assert any(k.startswith("encoder.") for k in b) and any("lora_" in k for k in b)
    # the align stage's update (Adam: about lr per element and step) is the same update under both strategies
    from vlm.recipe.schema import load_recipe
    from vlm.train.run_dir import build_model

    init = dict(build_model(OmegaConf.to_container(load_recipe(recipe), resolve=True)).named_parameters())
    a, b = _artifact(tmp / "ddp", "align"), _artifact(tmp / "fsdp", "align")
    da = torch.cat([(a[k] - init[k].detach().float()).flatten() for k in a])
    db = torch.cat([(b[k] - init[k].detach().float()).flatten() for k in a])
    assert da.norm() > 0 and float((da - db).norm() / da.norm()) < 0.2


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_reloaded_run_equals_the_in_run_model(runs, strategy):
    """Rank 0 evaluated the in-run model after training; `load_run` rebuilds it and scores the same."""
    from eval.runner import evaluate
    from vlm.train.run_dir import load_run

    tmp, _ = runs
    run = tmp / strategy
    got = read_json(run / "results.json")
    tasks = OmegaConf.to_container(OmegaConf.load(run / "recipe.yaml").eval.tasks, resolve=True)
    again = evaluate(load_run(run), tasks, tmp / f"re_{strategy}")
    assert got["tasks"]["cls"] == again["tasks"]["cls"]
    pred = [x for x in read_jsonl(run / "eval" / "cls" / "predictions.jsonl")]
    assert pred == list(read_jsonl(tmp / f"re_{strategy}" / "eval" / "cls" / "predictions.jsonl"))


def test_fsdp_resumes_from_a_mid_stage_checkpoint(runs):
    """Kill a 2-process fsdp run after a mid-stage checkpoint (save_every: 1); the rerun continues from it and ends
    where the uninterrupted run ended."""
    tmp, recipe = runs
    run = tmp / "fsdp_killed"
    p = launch(2, "train", str(recipe), "distributed.strategy=fsdp", "--out", str(run), session=True)
    latest = run / "stages" / "finetune" / "checkpoints" / "latest.json"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if latest.is_file() and read_json(latest)["step"] < 3:
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before a mid-stage checkpoint could be interrupted"
    at = read_json(latest)["step"]
    p = launch(2, "train", str(run / "recipe.yaml"), "--out", str(run))
    assert p.wait(timeout=600) == 0, p.stdout.read()[-6000:]
    fine = [x["step"] for x in read_jsonl(run / "metrics.jsonl") if x.get("stage") == "finetune" and "loss" in x]
    assert fine.count(1) == 1 and fine[-1] == 3 and fine[fine.index(at) + 1:].count(at + 1) >= 1
    a, b = _artifact(tmp / "fsdp", "finetune"), _artifact(run, "finetune")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_fsdp_that_cannot_be_engaged_is_an_error(tmp_path):
    """A plain `vlm train` (no process group) asking for fsdp is refused, not run as plain data parallel."""
    from vlm.errors import UserError
    from vlm.recipe.schema import load_recipe
    from vlm.train.steps import train

    recipe = write_recipe(tmp_path)
    with pytest.raises(UserError, match="fsdp needs a process group"):
        train(load_recipe(recipe, ["distributed.strategy=fsdp", "stages.finetune.enabled=false",
                                   "stages.align.max_steps=1", "stages.align.batch_size=4"]), tmp_path / "run")
    assert not list((tmp_path / "run").glob("artifacts/*/weights.safetensors"))

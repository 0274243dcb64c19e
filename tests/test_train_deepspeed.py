"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (DeepSpeed's CPU accelerator over gloo): a bf16 stage trains, the
stage artifacts hold the full fp32 master weights (gathered with DeepSpeed's own API), the reloaded run equals the
in-run model and evaluates, and a stage stopped after a mid-stage checkpoint resumes bitwise (issue 17.4)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from _train_data import ENV, ROOT, launch, write_recipe
from vlm.errors import UserError
from vlm.io import read_json, read_jsonl
from vlm.train.checkpoint import latest_checkpoint, read_partition
from vlm.train.strategy import DeepSpeedStrategy

# align has one step (no stop request is honoured after a stage's last step), so a stop file present from the start
# stops the run after finetune's first step, right after its save_every checkpoint
BODY = """model:
  llm: {dtype: bfloat16}
stages:
  align: {max_steps: 1, batch_size: 2, max_length: 128, precision: bf16, optim: {warmup_ratio: 0.0}}
  finetune:
    max_steps: 2
    batch_size: 2
    max_length: 128
    precision: bf16
    save_every: 1
    gradient_checkpointing: false
    optim: {lr: 1.0e-3, warmup_ratio: 0.0}
    freeze: {vision: {mode: partial, k: 1}, llm: {mode: lora, r: 4, dropout: 0.1}}
eval:
  tasks:
    - {type: classification, name: cls, path: "${synth_world:tiny,0}/classification", protocols: [open],
       max_new_tokens: 4, limit: 6}
"""
STRATEGIES = ("ddp", "deepspeed_zero2", "deepspeed_zero3")


def _artifact(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(read_json(run / "stages" / stage / "artifact.json")["path"]) / "weights.safetensors"))


ZEROS = ("deepspeed_zero2", "deepspeed_zero3")
NO_EVAL = "eval.tasks=[]"  # the stopped-and-resumed runs skip the final eval (training does not depend on it)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run per strategy and, started together with them, one ZeRO-2 and one ZeRO-3 run that a stop
    file stops after finetune's step-1 checkpoint; each is resumed (`vlm train` again) as soon as it has stopped."""
    tmp = tmp_path_factory.mktemp("ds")
    recipe = write_recipe(tmp, BODY)
    (tmp / "stop").touch()
    ds = {"DS_ACCELERATOR": "cpu"}
    procs = {s: launch(2, "train", str(recipe), f"distributed.strategy={s}", "--out", str(tmp / s), env=ds)
             for s in STRATEGIES}
    stopped = {s: launch(2, "train", str(recipe), f"distributed.strategy={s}", NO_EVAL, "--out",
                         str(tmp / f"{s}_resumed"), env={**ds, "VLM_STOP_FILE": str(tmp / "stop")}) for s in ZEROS}
    for s, p in stopped.items():
        out = p.communicate(timeout=900)[0]
        assert p.returncode != 0 and read_json(tmp / f"{s}_resumed" / "status.json")["state"] == "stopped", out[-6000:]
        procs[f"{s}_resumed"] = launch(2, "train", str(tmp / f"{s}_resumed" / "recipe.yaml"), "--out",
                                       str(tmp / f"{s}_resumed"), env=ds)
    for s, p in procs.items():
        assert p.wait(timeout=900) == 0, p.stdout.read()[-6000:]
    return tmp


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_like_ddp_and_saves_full_fp32_artifacts(runs, stage):
    run = runs / f"deepspeed_zero{stage}"
    d = read_json(run / "manifest.json")["distributed"]
    assert d["engaged"].startswith(f"deepspeed ZeRO-{stage}") and d["world_size"] == 2 and d["accelerator"] == "cpu"
    ref = [x for x in read_jsonl(runs / "ddp" / "metrics.jsonl") if "loss" in x]
    got = [x for x in read_jsonl(run / "metrics.jsonl") if "loss" in x]
    assert [(x["stage"], x["step"]) for x in got] == [(x["stage"], x["step"]) for x in ref]
    assert [x["loss"] for x in got] == pytest.approx([x["loss"] for x in ref], rel=3e-2)
    assert [x["grad_norm"] for x in got] == pytest.approx([x["grad_norm"] for x in ref], rel=5e-2)
    for name in ("align", "finetune"):
        a, b = _artifact(runs / "ddp", name), _artifact(run, name)
        assert a.keys() == b.keys() and all(b[k].dtype == torch.float32 and b[k].shape == a[k].shape for k in a)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_reloads_equal_to_the_in_run_model(runs, stage):
    from eval.runner import evaluate
    from vlm.train.run_dir import load_run

    run = runs / f"deepspeed_zero{stage}"
    tasks = OmegaConf.to_container(OmegaConf.load(run / "recipe.yaml").eval.tasks, resolve=True)
    again = evaluate(load_run(run), tasks, runs / f"re_{stage}")
    assert read_json(run / "results.json")["tasks"]["cls"] == again["tasks"]["cls"]
    assert list(read_jsonl(run / "eval" / "cls" / "predictions.jsonl")) == \
        list(read_jsonl(runs / f"re_{stage}" / "eval" / "cls" / "predictions.jsonl"))


@pytest.mark.parametrize("strategy", ZEROS)
def test_zero_stage_stopped_after_a_checkpoint_resumes_bitwise(runs, strategy):
    """The stopped run saved finetune's step-1 checkpoint as partitions (one per process, safetensors + JSON) and
    stopped; resumed, its losses, grad norms and artifacts equal the uninterrupted run's bit for bit."""
    ref, run = runs / strategy, runs / f"{strategy}_resumed"
    fine = [x for x in read_jsonl(run / "metrics.jsonl") if x.get("stage") == "finetune" and "loss" in x]
    assert [x["step"] for x in fine] == [1, 2], "the resume restarted the stage instead of continuing it"
    key = {(x["stage"], x["step"]): x for x in read_jsonl(ref / "metrics.jsonl") if "loss" in x}
    got = [x for x in read_jsonl(run / "metrics.jsonl") if "loss" in x]
    assert [(x["stage"], x["step"]) for x in got] == list(key)
    for x in got:
        want = key[(x["stage"], x["step"])]
        assert (x["loss"], x["grad_norm"], x["lr"]) == (want["loss"], want["grad_norm"], want["lr"]), x
    for name in ("align", "finetune"):
        a, b = _artifact(ref, name), _artifact(run, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any("lora_" in k for k in b) and any(k.startswith("encoder.") for k in b)
    assert read_json(run / "status.json")["state"] == "done"


@pytest.mark.parametrize("strategy", ZEROS)
def test_zero_checkpoint_holds_each_process_partition_and_the_full_weights(runs, strategy):
    ckpt = latest_checkpoint(runs / strategy / "stages" / "finetune" / "checkpoints")
    stage = int(strategy[-1])
    assert read_json(ckpt / "state.json")["distributed"] == {"strategy": strategy, "world_size": 2, "zero_stage": stage}
    assert not (ckpt / "optimizer.json").exists() and not list(ckpt.parent.glob(".tmp-*"))
    for rank in (0, 1):
        tensors, meta = read_partition(ckpt, rank)
        assert (meta["rank"], meta["world_size"], meta["zero_stage"]) == (rank, 2, stage)
        shapes = meta["fp32_partitions"]
        assert [list(tensors[f"fp32.{i}"].shape) for i in range(len(shapes))] == shapes and shapes
        assert {k.rsplit(".", 1)[1] for k in tensors if k.startswith("optimizer.")} == {"exp_avg", "exp_avg_sq", "step"}
        assert "rng.torch" in tensors and "python" in meta["rng"]  # this process's own RNG (LoRA dropout draws)
    assert load_file(str(ckpt / "trainable.safetensors")).keys() == _artifact(runs / strategy, "finetune").keys()


def test_zero_checkpoint_under_another_world_size_is_refused(runs):
    """A ZeRO checkpoint resumes only with the process count and ZeRO stage that wrote it: `vlm train` refuses
    another process count before building anything, and so does the checkpoint itself."""
    run = runs / "deepspeed_zero2_resumed"
    p = subprocess.run([sys.executable, "-m", "vlm", "train", str(run / "recipe.yaml"), "--out", str(run)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "1 process(es) were started; launch 2" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    ckpt = latest_checkpoint(run / "stages" / "finetune" / "checkpoints")
    written = read_json(ckpt / "state.json")["distributed"]
    for world, stage in ((1, 2), (4, 2), (2, 3)):
        strategy = DeepSpeedStrategy(SimpleNamespace(num_processes=world), None, stage)
        with pytest.raises(UserError, match=fr"written by 2 process\(es\) under ZeRO-2, this run has {world} under "
                                            fr"ZeRO-{stage}.*Relaunch with 2 processes"):
            strategy.check_checkpoint(written, f"checkpoint {ckpt}")
    with pytest.raises(UserError, match="none of process 2"):
        read_partition(ckpt, 2)

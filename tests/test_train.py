"""Training: the smoke recipe end to end, metrics/manifest, artifacts shared and reused, load_run, eval hook,
feature cache equivalence, NaN stop, a stage = repeated `train_step`.
(Kill/resume and 2-process equivalence: tests/test_train_dist.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.errors import UserError
from vlm.io import read_json, read_jsonl
from vlm.recipe.schema import load_recipe
from vlm.train.run_dir import load_run
from vlm.train.steps import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    from PIL import Image

    recs = []
    for i in range(12):
        Image.new("RGB", (20, 20), (i * 20, 255 - i * 20, 7 * i)).save(tmp_path / f"im{i}.png")
        recs.append({"id": str(i), "image": f"im{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": f"Shade number {i}" + " ok" * (i % 4)}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    p = tmp_path / "r.yaml"
    p.write_text(f"""defaults: [models/tiny.yaml, stages/llava_two_stage.yaml]
run: {{name: t, progress: false, feature_cache_dir: {tmp_path / 'fc'}}}
datasets:
  captions: {{type: llava, path: {tmp_path / 'd.json'}}}
  instructions: {{type: llava, path: {tmp_path / 'd.json'}}}
stages:
  align: {{max_steps: 2, batch_size: 4, max_length: 128, optim: {{warmup_ratio: 0.0}}}}
  finetune: {{max_steps: 2, batch_size: 2, grad_accum: 2, max_length: 128, gradient_checkpointing: false}}
""")
    return p


def _weights(art: Path) -> dict[str, torch.Tensor]:
    return load_file(str(art / "weights.safetensors"))


def test_smoke_recipe_end_to_end(tmp_path):
    """recipes/smoke.yaml: both stages, eval, every observability file; a quick eval hook every step."""
    out = tmp_path / "smoke"
    cfg = load_recipe(ROOT / "recipes" / "smoke.yaml", [f"run.feature_cache_dir={tmp_path / 'fc'}", "eval.every_steps=2",
                                                        "eval.quick_tasks=${eval.tasks}"])
    train(cfg, out)
    assert read_json(out / "status.json")["state"] == "done"
    metrics = list(read_jsonl(out / "metrics.jsonl"))
    steps = [m for m in metrics if "loss" in m]
    assert [(m["stage"], m["step"]) for m in steps] == [("align", 1), ("align", 2), ("align", 3),
                                                       ("finetune", 1), ("finetune", 2), ("finetune", 3)]
    for m in steps:
        for k in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "peak_memory_mb", "skipped_samples"):
            assert k in m, k
        assert m["loss"] > 0 and m["skipped_samples"] == 0
    evals = [m for m in metrics if "eval" in m]
    # every 2 steps and at each stage's last step, so a training curve ends where the stage ends
    assert [(m["stage"], m["step"]) for m in evals] == [("align", 2), ("align", 3), ("finetune", 2), ("finetune", 3)]
    assert "synth_cls" in evals[0]["eval"]
    man = read_json(out / "manifest.json")
    assert set(man) >= {"versions", "git_revision", "hardware", "data", "model", "stages"}
    assert man["stages"]["align"]["wall_s"] > 0 and man["data"]["captions"]["identity"]
    res = read_json(out / "results.json")
    assert "synth_cls" in res["tasks"] and (out / "eval" / "synth_cls" / "predictions.jsonl").is_file()
    assert (out / "recipe.yaml").is_file() and (out / "stages" / "finetune" / "artifact.json").is_file()


def test_artifacts_chain_reuse_and_load_run(recipe, tmp_path):
    store = tmp_path / "store"
    a, b = tmp_path / "a", tmp_path / "b"
    train(load_recipe(recipe, [f"run.artifact_store={store}", "stages.finetune.freeze.llm=lora"]), a)
    # same stage 1, different stage 2: stage 1 comes from the shared store, stage 2 trains
    train(load_recipe(recipe, [f"run.artifact_store={store}", "stages.finetune.optim.lr=1e-3"]), b)
    ma, mb = read_json(a / "manifest.json"), read_json(b / "manifest.json")
    assert ma["stages"]["align"]["key"] == mb["stages"]["align"]["key"]
    assert mb["stages"]["align"]["reused_artifact"] and not mb["stages"]["finetune"]["reused_artifact"]
    assert [m["stage"] for m in read_jsonl(b / "metrics.jsonl")] == ["finetune", "finetune"]
    # the reused stage's log travels in its artifact (the report draws b's stage-1 curve from it)
    art_log = list(read_jsonl(store / ma["stages"]["align"]["key"] / "metrics.jsonl"))
    assert art_log and {m["stage"] for m in art_log} == {"align"}
    assert len([p for p in store.iterdir() if p.is_dir()]) == 3
    # finetune trained only connector + LoRA tensors; load_run merges them into plain linear layers
    w = _weights(store / ma["stages"]["finetune"]["key"])
    assert any("lora_A" in k for k in w) and all("lora_" in k or k.startswith("connector.") for k in w)
    m = load_run(a)
    assert not any("lora_" in n for n, _ in m.named_parameters())
    # run a again: everything is reused, nothing retrained, same result
    train(load_recipe(recipe, [f"run.artifact_store={store}", "stages.finetune.freeze.llm=lora"]), a)
    assert len(list(read_jsonl(a / "metrics.jsonl"))) == 4
    m2 = load_run(a)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(m(ids).logits, m2(ids).logits)
    # a merged-LoRA model differs from the stage-1 model (the adapters were trained and applied)
    from vlm.train.run_dir import apply_artifact, build_model

    cfg = load_recipe(recipe, [f"run.artifact_store={store}", "stages.finetune.freeze.llm=lora"])
    s1 = build_model(cfg)
    apply_artifact(s1, dict(cfg.stages.align), store / ma["stages"]["align"]["key"])
    s1.eval()
    assert not torch.allclose(s1(ids).logits, m(ids).logits)


def test_changed_recipe_in_existing_run_dir_is_refused(recipe, tmp_path):
    out = tmp_path / "run"
    train(load_recipe(recipe, ["stages.finetune.enabled=false"]), out)
    with pytest.raises(UserError, match="holds a different recipe"):
        train(load_recipe(recipe, ["stages.finetune.enabled=false", "run.seed=3"]), out)


def test_feature_cache_equals_uncached(recipe, tmp_path):
    """Frozen encoder: cached features give the same losses and weights; a second run only hits the cache."""
    common = ["stages.finetune.enabled=false", "stages.align.max_steps=4", "stages.align.batch_size=6"]
    train(load_recipe(recipe, common + ["stages.align.feature_cache=false"]), tmp_path / "plain")
    train(load_recipe(recipe, common), tmp_path / "cached")
    train(load_recipe(recipe, common), tmp_path / "cached2")
    plain = [m["loss"] for m in read_jsonl(tmp_path / "plain" / "metrics.jsonl")]
    cached = list(read_jsonl(tmp_path / "cached" / "metrics.jsonl"))
    again = list(read_jsonl(tmp_path / "cached2" / "metrics.jsonl"))
    assert plain == pytest.approx([m["loss"] for m in cached], rel=1e-6, abs=1e-7)
    assert cached[-1]["feature_cache_misses"] == 12 and cached[-1]["feature_cache_hits"] == 12  # 2 epochs of 12
    assert again[-1]["feature_cache_misses"] == 0 and again[-1]["feature_cache_hits"] == 24
    wp = _weights(next(p for p in (tmp_path / "plain" / "artifacts").iterdir() if p.is_dir()))
    wc = _weights(next(p for p in (tmp_path / "cached" / "artifacts").iterdir() if p.is_dir()))
    for k in wp:
        torch.testing.assert_close(wp[k], wc[k], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_the_run_naming_the_step(recipe, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"loss is nan at step 2"):
        train(load_recipe(recipe, ["stages.align.optim.lr=1e30", "stages.align.optim.max_grad_norm=null",
                                   "stages.align.optim.name=sgd", "stages.align.max_steps=3"]), out)
    assert read_json(out / "status.json")["state"] == "failed"


def test_gradient_accumulation_matches_a_larger_batch(recipe, tmp_path):
    """batch 4 x accum 1 and batch 1 x accum 4 (loaded by a worker) see the same samples: same token-mean losses."""
    base = ["stages.align.enabled=false", "stages.finetune.max_steps=3", "data.group_by_length=false"]
    train(load_recipe(recipe, base + ["stages.finetune.batch_size=4", "stages.finetune.grad_accum=1"]), tmp_path / "a")
    train(load_recipe(recipe, base + ["stages.finetune.batch_size=1", "stages.finetune.grad_accum=4",
                                      "data.num_workers=1"]), tmp_path / "b")
    la = [m["loss"] for m in read_jsonl(tmp_path / "a" / "metrics.jsonl")]
    lb = [m["loss"] for m in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_a_locked_stage_artifact_is_waited_for_and_reused(recipe, tmp_path):
    """While another run holds a stage's lock, a run waits; when the artifact appears it reuses it."""
    import shutil
    import threading
    import time

    from filelock import FileLock

    from vlm.recipe.keys import stage_keys

    only_align = ["stages.finetune.enabled=false"]
    train(load_recipe(recipe, only_align + [f"run.artifact_store={tmp_path / 'other'}"]), tmp_path / "other_run")
    cfg = load_recipe(recipe, only_align + [f"run.artifact_store={tmp_path / 'store'}"])
    key = stage_keys(cfg)[0]
    (tmp_path / "store").mkdir()
    lock = FileLock(str(tmp_path / "store" / f"{key}.lock"))
    lock.acquire()
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors, train, cfg, tmp_path / "waiting"))
    t.start()
    deadline = time.time() + 120
    while not (tmp_path / "waiting" / "recipe.yaml").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    assert not (tmp_path / "waiting" / "metrics.jsonl").exists()  # blocked on the lock, not training
    shutil.copytree(tmp_path / "other" / key, tmp_path / "store" / key)  # the other run finishes the stage
    lock.release()
    t.join(120)
    assert not errors and read_json(tmp_path / "waiting" / "status.json")["state"] == "done"
    assert not (tmp_path / "waiting" / "metrics.jsonl").exists()
    assert read_json(tmp_path / "waiting" / "manifest.json")["stages"]["align"]["reused_artifact"]


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except BaseException as e:  # surfaced by the test's assertion
        errors.append(e)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_stages_run_close_to_fp32(recipe, tmp_path, precision):
    base = ["stages.finetune.enabled=false", "stages.align.feature_cache=false"]
    train(load_recipe(recipe, base), tmp_path / "fp32")
    train(load_recipe(recipe, base + [f"stages.align.precision={precision}"]), tmp_path / precision)
    ref = [m["loss"] for m in read_jsonl(tmp_path / "fp32" / "metrics.jsonl")]
    got = [m["loss"] for m in read_jsonl(tmp_path / precision / "metrics.jsonl")]
    assert got == pytest.approx(ref, rel=2e-2) and got != ref  # autocast really changed the arithmetic


def test_gradient_checkpointing_gives_the_same_training(recipe, tmp_path):
    base = ["stages.align.enabled=false", "stages.finetune.max_steps=2", "stages.finetune.freeze.vision=full"]
    train(load_recipe(recipe, base + ["stages.finetune.gradient_checkpointing=false"]), tmp_path / "plain")
    train(load_recipe(recipe, base + ["stages.finetune.gradient_checkpointing=true"]), tmp_path / "gc")
    a = [m["loss"] for m in read_jsonl(tmp_path / "plain" / "metrics.jsonl")]
    b = [m["loss"] for m in read_jsonl(tmp_path / "gc" / "metrics.jsonl")]
    assert a == pytest.approx(b, rel=1e-6)
    ckpt = read_json(tmp_path / "gc" / "stages" / "finetune" / "checkpoints" / "latest.json")
    assert ckpt["step"] == 2  # the end state is checkpointed too


def test_tracker_records_are_flattened_per_stage(tmp_path):
    from types import SimpleNamespace

    from vlm.train.steps import Run

    logged = []
    fake = SimpleNamespace(main=False, run_dir=tmp_path, cfg={"run": {"trackers": ["tensorboard"]}},
                           acc=SimpleNamespace(log=lambda values, step: logged.append((values, step))))
    Run.log(fake, {"stage": "align", "step": 3, "loss": 1.5, "lr": {"connector": 0.1}, "eval": {"t": 0.5},
                   "gap": None})
    assert logged == [({"align/loss": 1.5, "align/lr/connector": 0.1, "align/eval/t": 0.5}, 3)]


def test_train_stage_is_repeated_train_step(recipe, tmp_path):
    """A stage's losses and weights are exactly those of `train_step` called on its batches (batch 2 x accum 2),
    so a benchmark that times `train_step` (set up by `setup_training`) times the training code; the step's loss
    is the token mean."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from vlm.data.datasets import TrainSet, build_mixture, collate, epoch_batches, load_source
    from vlm.train.run_dir import build_model, set_seed
    from vlm.train.steps import setup_training, train_step
    from vlm.train.strategy import Strategy

    cfg = load_recipe(recipe, ["stages.align.enabled=false"])
    train(cfg, tmp_path / "run")
    logged = [(m["loss"], m["grad_norm"], m["lr"], m["target_tokens"])
              for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    art = Path(read_json(tmp_path / "run" / "stages" / "finetune" / "artifact.json")["path"])

    cfg = OmegaConf.to_container(cfg, resolve=True)
    st, seed = cfg["stages"]["finetune"], cfg["run"]["seed"]
    vlm = build_model(cfg)
    set_seed(seed + 1 + list(cfg["stages"]).index("finetune"))
    state = setup_training(vlm, st, 2, Strategy(Accelerator(cpu=True), None), "stages.finetune")
    sources = {"instructions": load_source("instructions", cfg["datasets"]["instructions"], "raise")}
    ds = TrainSet(build_mixture(st["data"], sources, seed), vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens,
                  st["max_length"], "raise", st["chat_template"])
    pad_id = vlm.tokenizer.pad_token_id if vlm.tokenizer.pad_token_id is not None else 0
    plan = epoch_batches([ds.length(i) for i in range(len(ds))], 4, seed, 0, cfg["data"]["group_by_length"])
    steps = []
    for global_batch in plan[:2]:
        micro = [collate([ds[i] for i in global_batch[a:a + 2]], pad_id=pad_id) for a in (0, 2)]
        with torch.no_grad():  # the token mean over both micro-batches, from the model before the step
            vlm.eval()
            outs = [vlm(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        pixels=vlm.preprocess(b["images"])).logits[:, :-1] for b in micro]
            ref = F.cross_entropy(torch.cat([lg.reshape(-1, lg.shape[-1]) for lg in outs]),
                                  torch.cat([b["labels"][:, 1:].reshape(-1) for b in micro]), ignore_index=-100)
        stats = train_step(state, micro)
        assert stats.loss == pytest.approx(float(ref), rel=1e-5)
        assert stats.samples == 4 and stats.target_tokens == sum(b["num_target_tokens"] for b in micro)
        steps.append((stats.loss, stats.grad_norm, stats.lrs, stats.target_tokens))
    assert steps == logged
    weights = _weights(art)
    trained = {n: p for n, p in vlm.named_parameters() if p.requires_grad}
    assert weights.keys() == trained.keys()
    for n, p in trained.items():
        assert torch.equal(weights[n], p.detach()), n


def test_final_checkpoints_can_be_dropped_once_the_artifact_exists(tmp_path):
    over = [f"run.feature_cache_dir={tmp_path / 'fc'}", "run.keep_final_checkpoints=false", "eval.tasks=[]",
            "stages.align.max_steps=1", "stages.finetune.max_steps=1"]
    out = tmp_path / "run"
    train(load_recipe(ROOT / "recipes" / "smoke.yaml", over), out)
    for stage in ("align", "finetune"):
        assert (out / "stages" / stage / "artifact.json").is_file()
        assert not (out / "stages" / stage / "checkpoints").exists()
    load_run(out)
    train(load_recipe(ROOT / "recipes" / "smoke.yaml", over), out)  # re-run: nothing left to do, still fine
    assert read_json(out / "status.json")["state"] == "done"

"""BatchNorm running statistics survive training (issue 17, point 5): stage artifacts and checkpoints carry the
buffers of trained modules and reloading restores them; frozen modules and the frozen blocks of a `partial`
module run in eval mode through every step, so their statistics never move. A tiny timm ResNet as the encoder.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vlm.train.steps as train_module
from vlm.io import read_json
from vlm.recipe.freeze import apply_policy, set_train_modes, trained_buffer_names
from vlm.recipe.schema import load_recipe
from vlm.train.checkpoint import latest_checkpoint, load_trained_state, read_checkpoint
from vlm.train.run_dir import build_model, load_run
from vlm.train.steps import train

ENCODER = {"type": "timm", "model": "resnet18", "config": {"layers": [1, 1, 1, 1], "zero_init_last": False},
           "image_size": 64, "select_layer": -1}


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    from PIL import Image

    recs = []
    for i in range(8):
        Image.new("RGB", (24, 24), (i * 30, 255 - i * 30, 9 * i)).save(tmp_path / f"im{i}.png")
        recs.append({"id": str(i), "image": f"im{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": f"Shade {i}"}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    p = tmp_path / "r.yaml"
    p.write_text(f"""defaults: [stages/llava_two_stage.yaml]
model:
  encoder: {json.dumps(ENCODER)}
  connector: {{type: mlp2x_gelu}}
  llm:
    config: {{model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
             num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 256}}
    tokenizer: builtin:chatml
run: {{name: bn, progress: false, feature_cache_dir: {tmp_path / 'fc'}}}
datasets:
  captions: {{type: llava, path: {tmp_path / 'd.json'}}}
  instructions: {{type: llava, path: {tmp_path / 'd.json'}}}
stages:
  align: {{enabled: false}}
  finetune: {{max_steps: 3, batch_size: 4, max_length: 96, gradient_checkpointing: false,
             freeze: {{vision: full, connector: full, llm: frozen}}, optim: {{lr: 1.0e-3, warmup_ratio: 0.0}}}}
""")
    return p


def bn_buffers(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers()
            if n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
            and (names is None or n in names)}


def train_capturing(cfg, out: Path, monkeypatch) -> dict[str, torch.Tensor]:
    """Run `train`; return the live model's buffers at the end of training (before its artifact is applied)."""
    seen: dict[str, torch.Tensor] = {}
    original = train_module.apply_artifact

    def capture(vlm, stage_cfg, art):
        seen.update(bn_buffers(vlm))
        return original(vlm, stage_cfg, art)

    monkeypatch.setattr(train_module, "apply_artifact", capture)
    train(cfg, out)
    monkeypatch.undo()
    return seen


def test_full_vision_training_keeps_its_batchnorm_statistics(recipe, tmp_path, monkeypatch):
    cfg = load_recipe(recipe)
    init = bn_buffers(build_model(cfg))
    assert len([n for n in init if n.endswith("running_mean")]) == 12  # the ResNet's 12 BatchNorm layers
    live = train_capturing(cfg, tmp_path / "run", monkeypatch)
    assert live.keys() == init.keys()
    moved = [n for n in init if n.endswith("running_mean") and not torch.equal(live[n], init[n])]
    assert len(moved) == 12 and all(int(live[n]) == 3 for n in live if n.endswith("num_batches_tracked"))

    # the stage artifact carries them, and everything that reloads (load_run: eval, the next stage) gets them
    art = Path(read_json(tmp_path / "run" / "stages" / "finetune" / "artifact.json")["path"])
    weights = load_file(str(art / "weights.safetensors"))
    assert set(init) <= weights.keys()
    reloaded = load_run(tmp_path / "run")
    for n, t in bn_buffers(reloaded).items():
        assert torch.equal(t, live[n]), n
    # so the reloaded image tokens are the trained model's (eval mode: running statistics in use)
    fresh = build_model(cfg)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fresh.load_state_dict(reloaded.state_dict())
        assert torch.equal(fresh.eval().encoder(x), reloaded.encoder(x))

    # the stage's checkpoint carries them too, so a resume (which loads it with load_trained_state) restores them
    ckpt = latest_checkpoint(tmp_path / "run" / "stages" / "finetune" / "checkpoints")
    saved, _, _ = read_checkpoint(ckpt)
    assert set(init) <= saved.keys()
    resumed = build_model(cfg)
    load_trained_state(resumed, saved, f"checkpoint {ckpt}")
    for n, t in bn_buffers(resumed).items():
        assert torch.equal(t, live[n]), n


def test_partial_vision_training_leaves_frozen_blocks_statistics_alone(recipe, tmp_path, monkeypatch):
    cfg = load_recipe(recipe, ["stages.finetune.freeze.vision.mode=partial", "stages.finetune.freeze.vision.k=1"])
    model = build_model(cfg)
    init = bn_buffers(model)
    modes: list[tuple[str, bool]] = []
    for n, m in model.encoder.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args, n=n: modes.append((n, mod.training)))
    monkeypatch.setattr(train_module, "build_model", lambda cfg: model)  # observe the live model's modes
    live = train_capturing(cfg, tmp_path / "run", monkeypatch)
    trained = {n for n in init if ".layer4." in n}  # k=1: the last stage feeding the selected map
    assert trained and all(torch.equal(live[n], init[n]) for n in init if n not in trained)
    assert all(not torch.equal(live[n], init[n]) for n in trained if n.endswith("running_mean"))
    assert modes and {(n, t) for n, t in modes} == {(n, "layer4." in n) for n, _ in modes}
    art = Path(read_json(tmp_path / "run" / "stages" / "finetune" / "artifact.json")["path"])
    saved = {n for n in load_file(str(art / "weights.safetensors")) if n.rsplit(".", 1)[-1] in
             ("running_mean", "running_var", "num_batches_tracked")}
    assert saved == trained
    for n, t in bn_buffers(load_run(tmp_path / "run")).items():
        assert torch.equal(t, live[n]), n


def policy(**modes):
    base = {"lr": None, "weight_decay": None, "r": 2, "alpha": 4.0, "dropout": 0.1, "target_modules": None, "k": 1}
    return {m: {**base, "mode": "frozen", **modes.get(m, {})} for m in ("vision", "connector", "llm")}


class Stages(nn.Module):
    """A CNN-like encoder: three conv + BatchNorm stages, all feeding the output."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)) for _ in range(3)])

    def blocks(self) -> nn.ModuleList:
        return self.stages


class Toy(nn.Module):
    """Just what the freeze policy looks at: `encoder`, `connector`, `llm.model`."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Stages()
        self.connector = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.language_model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.1), nn.Linear(4, 4))
        self.llm = SimpleNamespace(model=self.language_model)


OPT = {"lr": 1e-3, "weight_decay": 0.0}


def test_train_modes_follow_the_policy_after_model_train():
    v = Toy()
    pol = policy(vision={"mode": "partial", "k": 1}, connector={"mode": "full"}, llm={"mode": "lora"})
    apply_policy(v, pol, OPT)
    assert [s[1].training for s in v.encoder.stages] == [False, False, True]  # frozen blocks' BatchNorm held
    v.train()  # what model.train() does: everything in train mode ...
    set_train_modes(v, pol)  # ... and what every training step does next
    assert [s[1].training for s in v.encoder.stages] == [False, False, True]
    assert v.encoder.training  # the container stays in train mode (HF checkpoints only in train mode)
    assert v.connector.training and v.connector[1].training
    llm = v.language_model
    assert not llm.get_submodule("1").training  # LoRA freezes the base: its BatchNorm statistics are held
    assert llm.training and llm.get_submodule("2").training
    assert any(m.training for n, m in llm.named_modules() if n.endswith("lora_dropout.default"))
    assert [n.rsplit(".", 1)[0] for n in trained_buffer_names(v, pol)] == ["encoder.stages.2.1"] * 3 + ["connector.1"] * 3
    set_train_modes(v, policy(connector={"mode": "full"}))
    assert not v.encoder.training and not any(m.training for m in v.encoder.modules())
    assert not v.language_model[1].training and not v.language_model[2].training  # frozen: BatchNorm, dropout held


def test_a_frozen_llm_is_still_gradient_checkpointed():
    """Stage 1 trains the connector through the frozen LLM: HF recomputes a layer only in train mode, so holding
    the frozen LLM in eval mode silently switched gradient checkpointing off (84 GiB per GPU, `vlm plan`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2))
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    v = Toy()
    v.language_model = lm
    v.llm = SimpleNamespace(model=lm)
    apply_policy(v, policy(connector={"mode": "full"}), OPT)
    v.train()
    set_train_modes(v, policy(connector={"mode": "full"}))

    def saved_tensors() -> int:
        """Tensors autograd keeps for backward: a checkpointed layer keeps its input only."""
        n = [0]

        def pack(t):
            n[0] += 1
            return t

        emb = lm.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = lm(inputs_embeds=emb, use_cache=False).logits.sum()
        out.backward()
        assert emb.grad is not None
        return n[0]

    held = saved_tensors()
    lm.eval()  # what holding the whole frozen LLM in eval mode did: HF skips checkpointing
    assert held * 4 < saved_tensors()


def test_trained_buffer_names_cover_full_modules_and_partial_blocks_only():
    v = Toy()
    bn = ("running_mean", "running_var", "num_batches_tracked")
    full = policy(vision={"mode": "full"}, connector={"mode": "full"}, llm={"mode": "full"})
    assert sorted(trained_buffer_names(v, full)) == sorted(
        [f"encoder.stages.{i}.1.{b}" for i in range(3) for b in bn] + [f"connector.1.{b}" for b in bn]
        + [f"language_model.1.{b}" for b in bn])
    assert trained_buffer_names(v, policy(connector={"mode": "full"}, llm={"mode": "lora"})) == \
        [f"connector.1.{b}" for b in bn]

"""Freeze policies on the tiny real-architecture VLM: trainable sets, param groups, partial, LoRA inject/merge."""
from __future__ import annotations

import copy

import pytest
import torch

from vlm.errors import UserError
from vlm.recipe.freeze import apply_policy, count_trainable, merge_lora, module_of, partial_blocks
from vlm.recipe.schema import RECIPES_ROOT, compose
from vlm.train.run_dir import build_model

MODEL = compose(RECIPES_ROOT / "models" / "tiny.yaml")


def policy(vision="frozen", connector="full", llm="frozen", **extra):
    def p(mode):
        base = {"mode": mode, "lr": None, "weight_decay": None, "r": 4, "alpha": 8.0, "dropout": 0.0,
                "target_modules": None, "k": 1}
        return {**base, **extra.get(mode, {})} if isinstance(mode, str) else {**base, **mode}
    return {"vision": p(vision), "connector": p(connector), "llm": p(llm)}


OPTIM = {"lr": 1e-3, "weight_decay": 0.1}


@pytest.fixture(scope="module")
def base_vlm():
    return build_model({"run": {"seed": 0}, "model": MODEL["model"]})


@pytest.fixture()
def vlm(base_vlm):
    return copy.deepcopy(base_vlm)


def test_align_policy_trains_only_the_connector(vlm):
    groups = apply_policy(vlm, policy(), OPTIM)
    assert count_trainable(vlm) == count_trainable(vlm.connector) == sum(p.numel() for p in vlm.connector.parameters())
    assert {g["name"] for g in groups} == {"connector", "connector.no_decay"}
    decay = next(g for g in groups if g["name"] == "connector")
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in next(g for g in groups if g["name"].endswith("no_decay"))["params"])
    assert not vlm.encoder.training and vlm.connector.training
    # the frozen LLM computes as in eval mode but stays in train mode, so HF's gradient checkpointing engages
    assert vlm.language_model.training and not any(
        m.training for m in vlm.language_model.modules() if isinstance(m, torch.nn.Dropout))


def test_per_module_lr_and_weight_decay(vlm):
    groups = apply_policy(vlm, policy(llm={"mode": "full", "lr": 2e-5, "weight_decay": 0.0}), OPTIM)
    by = {g["name"]: g for g in groups}
    assert by["llm"]["lr"] == 2e-5 and by["llm"]["weight_decay"] == 0.0 and by["connector"]["lr"] == 1e-3
    n = sum(len(g["params"]) for g in groups)
    assert n == sum(1 for p in vlm.parameters() if p.requires_grad)


def test_partial_trains_the_last_k_used_blocks(vlm):
    apply_policy(vlm, policy(vision={"mode": "partial", "k": 1}, llm={"mode": "partial", "k": 1}), OPTIM)
    llm_blocks = vlm.language_model.model.layers
    assert not any(p.requires_grad for p in llm_blocks[0].parameters())
    assert all(p.requires_grad for p in llm_blocks[-1].parameters())
    assert not vlm.language_model.lm_head.weight.requires_grad
    # the tiny CLIP has 2 layers and selects the penultimate hidden state: only layer 0 feeds the output
    enc_layers = next(m for m in vlm.encoder.model.modules() if isinstance(m, torch.nn.ModuleList))
    assert len(enc_layers) == 2 and list(vlm.encoder.blocks()) == [enc_layers[0]]
    assert partial_blocks(vlm.encoder, 1, "t") == [enc_layers[0]]
    assert all(p.requires_grad for p in enc_layers[0].parameters())
    assert not any(p.requires_grad for p in enc_layers[1].parameters())
    with pytest.raises(UserError, match="partial k=2 but the module has only 1 blocks"):
        apply_policy(vlm, policy(vision={"mode": "partial", "k": 2}), OPTIM)
    with pytest.raises(UserError, match="needs a module with stacked blocks"):
        apply_policy(vlm, policy(connector="partial", llm="full"), OPTIM)


def test_lora_injects_trains_and_merges_to_the_same_function(vlm):
    apply_policy(vlm, policy(llm={"mode": "lora", "target_modules": ["q_proj", "v_proj"]}), OPTIM)
    llm = module_of(vlm, "llm")
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    with torch.no_grad():  # make the adapters non-trivial (lora_B starts at zero)
        for n, p in llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    vlm.eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        before = vlm(ids).logits
        merge_lora(llm)
        after = vlm(ids).logits
    assert not any("lora_" in n for n, _ in llm.named_parameters())
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)


def test_lora_dropped_without_merge_restores_the_base(vlm):
    ids = torch.tensor([[3, 4, 5]])
    vlm.eval()
    with torch.no_grad():
        ref = vlm(ids).logits
    apply_policy(vlm, policy(llm="lora"), OPTIM)
    for n, p in module_of(vlm, "llm").named_parameters():
        if "lora_B" in n:
            p.data.fill_(1.0)
    merge_lora(module_of(vlm, "llm"), merge=False)
    vlm.eval()
    with torch.no_grad():
        assert torch.equal(vlm(ids).logits, ref)


def test_lora_with_unknown_targets_is_a_user_error(vlm):
    with pytest.raises(UserError, match="lora target_modules \\['nope'\\] not found"):
        apply_policy(vlm, policy(llm={"mode": "lora", "target_modules": ["nope"]}), OPTIM)

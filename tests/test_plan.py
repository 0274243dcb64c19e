"""`vlm plan`: meta-device builds from the stored HF configs, parameter counts, image tokens, the FLOPs formula
(against torch's FlopCounterMode on a real CPU forward + backward), saved activations, and every shipped recipe
and grid through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from vlm.cli import main
from vlm.plan.cost import trace_sample
from vlm.plan.meta import build_meta_vlm
from vlm.plan.planner import Settings, plan_config, token_warnings
from vlm.recipe.freeze import apply_policy
from vlm.testing import tiny_vlm_config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CLIP_L = {"type": "clip", "path": "openai/clip-vit-large-patch14-336", "select_layer": -2, "select_tokens": "patch"}
SIGLIP = {"type": "siglip", "path": "google/siglip-so400m-patch14-384", "select_layer": -2, "select_tokens": "patch"}
DINO_L = {"type": "dinov2", "path": "facebook/dinov2-large", "select_layer": -2, "select_tokens": "patch"}
VICUNA = {"path": "lmsys/vicuna-7b-v1.5", "chat_template": "vicuna_v1", "dtype": "bfloat16"}
QWEN05 = {"path": "Qwen/Qwen2.5-0.5B-Instruct", "chat_template": None, "dtype": "bfloat16"}


def _policy(mode: str, **kw) -> dict:
    base = {"mode": mode, "lr": None, "weight_decay": None, "r": 8, "alpha": 16.0, "dropout": 0.0,
            "target_modules": None, "k": 1}
    return {**base, **kw}


def _freeze(vision="frozen", connector="full", llm="frozen", **kw) -> dict:
    return {"vision": _policy(vision, **kw.get("v", {})), "connector": _policy(connector),
            "llm": _policy(llm, **kw.get("l", {}))}


OPTIM = {"lr": 1e-3, "weight_decay": 0.0}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- real shapes, hand-checked
def test_llava15_parts_have_the_published_sizes() -> None:
    vlm = build_meta_vlm({"encoder": CLIP_L, "connector": {"type": "mlp2x_gelu"}, "llm": VICUNA})
    assert all(p.device.type == "meta" for p in vlm.parameters())
    # CLIP ViT-L/14-336 vision tower: 24 x 12.6M blocks + embeddings (577 positions) + two layer norms.
    assert _count(vlm.encoder) == 303_507_456
    # LLaVA-1.5's projector: 1024x4096 + 4096 and 4096x4096 + 4096.
    assert _count(vlm.connector) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096 == 20_979_712
    # Llama-2-7B / Vicuna-7B: 6,738,415,616, plus one embedding and one head row for <image> (32000 -> 32001).
    assert _count(vlm.language_model) == 6_738_415_616 + 2 * 4096
    assert vlm.num_image_tokens == 576
    assert next(vlm.language_model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("encoder,tokens,width", [
    (CLIP_L, 576, 1024),                                   # 336 / 14 = 24 -> 24 x 24
    (SIGLIP, 729, 1152),                                   # 384 / 14 = 27.4 -> HF floors: 27 x 27
    ({**DINO_L, "image_size": 336}, 576, 1024),
    ({"type": "fused", "mode": "channel", "encoders": [{**DINO_L, "image_size": 384}, SIGLIP]}, 729, 1024 + 1152),
])
def test_image_tokens_of_the_research_encoders(encoder: dict, tokens: int, width: int) -> None:
    vlm = build_meta_vlm({"encoder": encoder, "connector": {"type": "mlp2x_gelu"}, "llm": QWEN05})
    assert vlm.num_image_tokens == tokens
    assert vlm.encoder.hidden_size == width
    trace = trace_sample(vlm, 1024, torch.bfloat16)
    assert trace.image_tokens == tokens and trace.image_tokens + trace.labelled_tokens == 1024


def test_qwen_embedding_is_not_resized_and_tied_head_is_counted_once() -> None:
    vlm = build_meta_vlm({"encoder": CLIP_L, "connector": {"type": "mlp2x_gelu"}, "llm": QWEN05})
    lm = vlm.language_model
    # vocab 151936 already holds len(tokenizer) 151665 + <image>; Qwen2.5-0.5B has 494,032,768 parameters.
    assert lm.get_input_embeddings().num_embeddings == 151_936
    assert _count(lm) == 494_032_768


@pytest.mark.parametrize("hub_id,published,added", [
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512, 0),         # vocab 152064 already holds 151665 tokens + <image>
    ("meta-llama/Meta-Llama-3-8B", 8_030_261_248, 2 * 4096),  # 128256 tokens: an <image> row in embedding and head
])
def test_stored_llm_configs_give_the_published_sizes(hub_id: str, published: int, added: int) -> None:
    vlm = build_meta_vlm({"encoder": CLIP_L, "connector": {"type": "mlp2x_gelu"}, "llm": {"path": hub_id}})
    assert _count(vlm.language_model) == published + added


def test_unprepared_zoo_entry_plans_from_its_upstream_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path))  # an empty zoo: nothing is prepared
    vlm = build_meta_vlm({"encoder": {"type": "dinov2", "path": "zoo:dinov2-s", "image_size": 84},
                          "connector": {"type": "mlp"}, "llm": {"path": "zoo:smollm2-135m-instruct"}})
    assert _count(vlm.encoder) == 22_056_576  # DINOv2-S/14 at 518 px positions (ViT-S: 12 x 1.78M + embeddings)
    assert _count(vlm.language_model) == 134_515_008 + 576  # SmolLM2-135M (tied) + the <image> row
    assert vlm.num_image_tokens == 36


def test_missing_config_is_a_user_error() -> None:
    from vlm.errors import UserError

    with pytest.raises(UserError, match="no config for 'someone/unknown-model'"):
        build_meta_vlm({"encoder": CLIP_L, "connector": {"type": "mlp"}, "llm": {"path": "someone/unknown-model"}})


# --------------------------------------------------------------------------- FLOPs formula vs FlopCounterMode
def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode does not count CPU flash attention; count it with torch's own SDPA formulas."""
    def fwd(query, key, value, *args, out_val=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def _measured_flops(model_cfg: dict, freeze: dict, length: int, checkpointing: bool = False) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one real training sample on CPU, counted by FlopCounterMode."""
    from PIL import Image

    from vlm.model import build_vlm

    torch.manual_seed(0)
    vlm = build_vlm(model_cfg)
    apply_policy(vlm, freeze, OPTIM)
    if checkpointing:
        vlm.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n_img = vlm.num_image_tokens
    ids = torch.tensor([[vlm.image_token_id] * n_img + [5] * (length - n_img)])
    labels = ids.clone()
    labels[:, :n_img] = -100
    pixels = vlm.preprocess([Image.new("RGB", (40, 40), "gray")])
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping()) as counter:
        out = vlm(ids, pixels=pixels, labels=labels, label_loss_sum=True)
        forward = counter.get_total_flops()
        if out.loss.requires_grad:
            out.loss.backward()
    return forward, counter.get_total_flops()


FLOP_CASES = {
    "connector only (align)": _freeze(),
    "connector + llm (finetune)": _freeze(llm="full"),
    "everything": _freeze(vision="full", llm="full"),
    "llm lora": _freeze(llm="lora", l={"r": 4}),
    "vision partial k=2 + llm frozen": _freeze(vision="partial", v={"k": 2}),
    "llm only": _freeze(connector="frozen", llm="full"),
}


@pytest.mark.parametrize("case", list(FLOP_CASES))
def test_flops_formula_matches_flop_counter(case: str) -> None:
    cfg = tiny_vlm_config("clip", "qwen2", "chatml")
    freeze, length = FLOP_CASES[case], 48
    fwd_ref, total_ref = _measured_flops(cfg, freeze, length)
    vlm = build_meta_vlm(cfg)
    with torch.device("meta"):
        apply_policy(vlm, freeze, OPTIM)
    trace = trace_sample(vlm, length, torch.float32)
    assert trace.forward_flops() == fwd_ref
    assert trace.forward_flops() + trace.backward_flops() == total_ref


def test_frozen_llm_still_pays_activation_gradients_but_no_weight_gradients() -> None:
    cfg = tiny_vlm_config("clip", "qwen2", "chatml")
    vlm = build_meta_vlm(cfg)
    with torch.device("meta"):
        apply_policy(vlm, _freeze(), OPTIM)
    trace = trace_sample(vlm, 48, torch.float32)
    llm = [m for m in trace.matmuls if m.name.startswith("language_model.")]
    enc = [m for m in trace.matmuls if m.name.startswith("encoder.")]
    assert llm and all(m.input_grad and not m.weight_grad for m in llm)
    assert enc and not any(m.input_grad or m.weight_grad for m in enc)
    # So backward is ~1x forward of the LLM, not 2x (and not 6N-style 2x for every parameter).
    assert trace.backward_flops() < 1.2 * trace.forward_flops()


def test_recompute_flops_under_gradient_checkpointing_match_flop_counter() -> None:
    cfg = tiny_vlm_config("clip", "qwen2", "chatml")
    freeze = _freeze(llm="full")
    _, total_ref = _measured_flops(cfg, freeze, 48, checkpointing=True)
    vlm = build_meta_vlm(cfg)
    with torch.device("meta"):
        apply_policy(vlm, freeze, OPTIM)
    trace = trace_sample(vlm, 48, torch.float32)
    from vlm.plan.planner import _checkpointed

    ck = _checkpointed(vlm, {"gradient_checkpointing": True, "freeze": freeze})
    assert ck and all(b.startswith("language_model.") for b in ck)
    assert trace.forward_flops() + trace.backward_flops() + trace.recompute_flops(ck) == total_ref


def test_saved_activations_match_a_real_cpu_pass() -> None:
    """The trace's saved-for-backward bytes (fused attention) against autograd's saved tensors of a real pass."""
    from PIL import Image

    from vlm.model import build_vlm

    cfg = tiny_vlm_config("clip", "qwen2", "chatml")
    freeze, length = _freeze(llm="full"), 64
    torch.manual_seed(0)
    real = build_vlm(cfg)
    apply_policy(real, freeze, OPTIM)
    params = {p.untyped_storage()._cdata for p in (*real.parameters(), *real.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    n_img = real.num_image_tokens
    ids = torch.tensor([[real.image_token_id] * n_img + [5] * (length - n_img)])
    labels = ids.clone()
    labels[:, :n_img] = -100
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        real(ids, pixels=real.preprocess([Image.new("RGB", (40, 40))]), labels=labels, label_loss_sum=True)
    meta = build_meta_vlm(cfg)
    with torch.device("meta"):
        apply_policy(meta, freeze, OPTIM)
    planned = trace_sample(meta, length, torch.float32).saved_bytes()
    assert abs(planned - sum(saved.values())) / sum(saved.values()) < 0.15


# --------------------------------------------------------------------------- memory and hours
def _recipe(**over) -> dict:
    from vlm.recipe.schema import compose, validate

    return validate(compose(RECIPES / "smoke.yaml", [f"{k}={v}" for k, v in over.items()]), "test")


def test_memory_strategies_shard_what_they_should() -> None:
    cfg = _recipe()
    plans = {s: plan_config({**cfg, "distributed": {"strategy": s, "num_processes": 4}}, Settings())
             for s in ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp")}
    ddp, z2, z3, fsdp = (plans[s].stages[1].memory for s in ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"))
    stage = plans["ddp"].stages[1]
    nt = stage.params_trainable
    assert ddp["optimizer"] == 8 * nt and ddp["gradients"] == 4 * nt
    assert z2["optimizer"] == 2 * nt and z2["gradients"] == nt
    frozen = ddp["weights"] - 4 * nt  # smoke trains in fp32: compute copy 4 B, master 4 B
    assert z2["weights"] == 4 * nt + 4 * nt / 4 + frozen
    assert z3["weights"] == (8 * nt + frozen) / 4 and fsdp["weights"] == (4 * nt + frozen) / 4
    assert z3["optimizer"] == fsdp["optimizer"] == 2 * nt
    assert len({m["activations"] for m in (ddp, z2, z3, fsdp)}) == 1


def test_gpu_hours_follow_steps_batch_and_mfu() -> None:
    cfg = _recipe()
    a = plan_config(cfg, Settings(mfu=0.5, peak_flops=1e12))
    b = plan_config(cfg, Settings(mfu=0.25, peak_flops=1e12))
    s = a.stages[0]
    assert s.samples == s.steps * s.global_batch == 3 * 4
    assert s.gpu_hours == pytest.approx(s.samples * s.flops_per_sample / (0.5 * 1e12) / 3600)
    assert b.stages[0].gpu_hours == pytest.approx(2 * s.gpu_hours)


def test_token_warning_names_the_axis_and_counts() -> None:
    from vlm.plan.planner import PointPlan, StagePlan

    def point(enc: str, llm: str, tokens: int) -> PointPlan:
        st = StagePlan("s", 1, 1, {}, {}, tokens, 10, 1.0, 1.0, 0.0, {}, 1, 1, 1, 1, "", None, "k")
        return PointPlan(f"enc={enc},llm={llm}", {"enc": enc, "llm": llm}, "ddp", 1, {}, [st])

    plans = [point(e, l, t) for e, t in (("clip", 576), ("siglip", 729)) for l in ("a", "b")]
    warnings = token_warnings(plans, ["enc", "llm"])
    assert len(warnings) == 1 and "'enc'" in warnings[0] and "clip: 576" in warnings[0] and "siglip: 729" in warnings[0]


# --------------------------------------------------------------------------- every shipped recipe and grid
def _shipped() -> list[Path]:
    """Grids (files with `axes:`) and complete recipes (they compose to stages and a model)."""
    from vlm.recipe.schema import compose

    out = []
    for path in sorted(RECIPES.rglob("*.yaml")):
        body = yaml.safe_load(path.read_text()) or {}
        if "axes" in body:
            out.append(path)
            continue
        if path.parent.name in ("grids",):
            continue
        try:
            cfg = compose(path)
        except Exception:  # a fragment that only composes inside a recipe
            continue
        model = cfg.get("model") or {}
        if cfg.get("stages") and all(model.get(k) for k in ("encoder", "connector", "llm")):
            out.append(path)
    return out


def test_the_shipped_set_is_what_we_think() -> None:
    names = {str(p.relative_to(RECIPES)) for p in _shipped()}
    assert {"grids/fine_grained_knowledge.yaml", "grids/smoke.yaml", "grids/demo.yaml", "grids/demo_full.yaml",
            "smoke.yaml", "demo/base.yaml", "demo/quick.yaml"} <= names


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_and_grid_plans(path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    if yaml.safe_load(path.read_text()).get("survey"):  # models evaluated as they are: nothing to train or price
        assert out["points"] == [] and any("survey" in w for w in out["warnings"])
        return
    assert out["points"]
    for point in out["points"]:
        for st in point["stages"]:
            assert st["params_total"] > st["params_trainable"] > 0
            assert st["image_tokens"] > 0 and st["seq_len"] > st["image_tokens"]
            assert st["flops_per_sample"] > 0 and st["memory"]["total"] > 0
    if path.name == "fine_grained_knowledge.yaml":
        assert len(out["points"]) == 32
        assert {p["processes"] for p in out["points"]} == {8}
        assert {p["stages"][0]["image_tokens"] for p in out["points"]} == {576, 729}
        assert any("'enc'" in w for w in out["warnings"])
        assert out["total_gpu_hours"] > 0


def test_plan_table_and_errors(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(RECIPES / "grids/smoke.yaml")]) == 0
    out = capsys.readouterr().out
    assert "vlm plan" in out and "GPU-h" in out and "grid total" in out
    assert main(["plan", str(RECIPES / "smoke.yaml"), "--mfu", "2"]) == 2
    assert main(["plan", str(RECIPES / "smoke.yaml"), "--samples", "captions=x"]) == 2
    assert main(["plan", "no/such.yaml"]) == 2

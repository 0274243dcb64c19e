"""Vision encoders on tiny random configs of the real HF / timm architectures (CPU, no network)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipVisionConfig, SiglipVisionModel)

from encoders import build_encoder
from encoders.transforms import ImageTransform
from vlm.errors import UserError
from vlm.world.zoo import catalogue

REPO = Path(__file__).resolve().parents[1]
VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=7)
HF = {  # family → (random-init config, HF model class, HF config class)
    "clip": ({**VIT, "intermediate_size": 64}, CLIPVisionModel, CLIPVisionConfig),
    "siglip": ({**VIT, "intermediate_size": 64}, SiglipVisionModel, SiglipVisionConfig),
    "dinov2": ({**VIT, "mlp_ratio": 2}, Dinov2Model, Dinov2Config),
    "dinov2_reg": ({**VIT, "mlp_ratio": 2, "num_register_tokens": 4}, Dinov2WithRegistersModel, Dinov2WithRegistersConfig),
}
NUM_PATCHES = (28 // 7) ** 2


def enc(family: str, **kw):
    config = HF[family][0]
    return build_encoder({"type": family.removesuffix("_reg"), "config": config, **kw})


def pixels(n: int = 2, size: int = 28) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def hf_hidden(model, x: torch.Tensor, k: int, **kw) -> torch.Tensor:
    """The reference: HF's own hidden_states[k] with every hidden state returned."""
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True, **kw).hidden_states[k]


# ---------------------------------------------------------------- token counts and selection

@pytest.mark.parametrize("family,mode,expected", [
    ("clip", "patch", NUM_PATCHES), ("clip", "cls_patch", NUM_PATCHES + 1), ("clip", "cls", 1),
    ("siglip", "patch", NUM_PATCHES),
    ("dinov2", "patch", NUM_PATCHES), ("dinov2", "cls_patch", NUM_PATCHES + 1), ("dinov2", "cls", 1),
    ("dinov2_reg", "patch", NUM_PATCHES), ("dinov2_reg", "cls_patch", NUM_PATCHES + 1), ("dinov2_reg", "cls", 1),
])
def test_token_counts(family, mode, expected):
    e = enc(family, select_tokens=mode)
    with torch.no_grad():
        out = e(pixels())
    assert out.shape == (2, expected, 32)
    assert e.num_tokens == expected and e.hidden_size == 32
    assert e.patch_grid_size == ((4, 4) if mode == "patch" else None)
    # 3 layers, the penultimate hidden state selected: only the first 2 feed the output
    assert len(e.blocks()) == 2 and type(e.blocks()[0]).__name__.endswith("Layer")


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2", "dinov2_reg"])
@pytest.mark.parametrize("k", [0, 1, -1, -2])
def test_selected_layer_equals_hf_hidden_states(family, k):
    e = enc(family, select_layer=k, select_tokens="patch")
    x = pixels()
    ref = hf_hidden(e.model, x, k)
    prefix = {"clip": 1, "siglip": 0, "dinov2": 1, "dinov2_reg": 5}[family]
    assert ref.shape[1] == prefix + NUM_PATCHES
    with torch.no_grad():
        torch.testing.assert_close(e(x), ref[:, prefix:], rtol=0, atol=0)


def test_default_is_penultimate_layer_and_patch_tokens():
    e = enc("clip")
    assert (e.select_layer, e.select_tokens) == (-2, "patch")
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(e(x), hf_hidden(e.model, x, 2)[:, 1:], rtol=0, atol=0)


def test_siglip_keeps_every_patch():
    e = enc("siglip")
    assert e.has_cls is False
    x = pixels()
    ref = hf_hidden(e.model, x, -2)
    assert ref.shape[1] == NUM_PATCHES  # SigLIP's sequence is patches only: nothing to drop
    with torch.no_grad():
        torch.testing.assert_close(e(x), ref, rtol=0, atol=0)
    for mode in ("cls", "cls_patch"):
        with pytest.raises(UserError, match="CLS"):
            enc("siglip", select_tokens=mode)
    with pytest.raises(UserError, match="has_cls"):
        enc("siglip", has_cls=True)


def test_dinov2_registers_dropped_in_patch_mode():
    e = enc("dinov2_reg", select_layer=-1)
    assert isinstance(e.model, Dinov2WithRegistersModel) and e.num_register_tokens == 4
    x = pixels()
    ref = hf_hidden(e.model, x, -1)
    with torch.no_grad():
        torch.testing.assert_close(e(x), ref[:, 5:], rtol=0, atol=0)
        cls_patch = build_encoder({**e.cfg, "select_tokens": "cls_patch"})
        cls_patch.load_state_dict(e.state_dict())
        torch.testing.assert_close(cls_patch(x), torch.cat([ref[:, :1], ref[:, 5:]], 1), rtol=0, atol=0)
    # the top-level key alone picks the registers architecture for a random init
    e2 = build_encoder({"type": "dinov2", "config": HF["dinov2"][0], "num_register_tokens": 2})
    assert isinstance(e2.model, Dinov2WithRegistersModel) and e2.model.config.num_register_tokens == 2
    assert isinstance(enc("dinov2").model, Dinov2Model) and enc("dinov2").num_register_tokens == 0


def test_other_resolution_interpolates_position_embeddings():
    for family in ("clip", "siglip", "dinov2"):
        e = enc(family, image_size=42)
        assert e.num_tokens == 36 and e.patch_grid_size == (6, 6)
        x = e.preprocess([Image.new("RGB", (50, 40), (10, 200, 30))])
        assert x.shape == (1, 3, 42, 42)
        kw = {} if family == "dinov2" else {"interpolate_pos_encoding": True}
        with torch.no_grad():
            torch.testing.assert_close(e(x), hf_hidden(e.model, x, -2, **kw)[:, 0 if family == "siglip" else 1:])


def test_dtype_casts_weights_and_pixels():
    e = enc("siglip", dtype="bfloat16")
    assert e.model.dtype == torch.bfloat16
    x = pixels()
    with torch.no_grad():
        out = e(x)  # float32 pixels from preprocess are cast to the model's dtype
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, hf_hidden(e.model, x.to(torch.bfloat16), -2), rtol=0, atol=0)


# ---------------------------------------------------------------- loading (the real path)

def test_load_from_save_pretrained_dir(tmp_path):
    for family in ("clip", "siglip", "dinov2", "dinov2_reg"):
        config, model_cls, config_cls = HF[family]
        ref = model_cls(config_cls(**config)).eval()
        ref.save_pretrained(tmp_path / family)
        e = build_encoder({"type": family.removesuffix("_reg"), "path": str(tmp_path / family), "select_layer": 1})
        assert type(e.model) is model_cls
        x = pixels()
        prefix = {"clip": 1, "siglip": 0, "dinov2": 1, "dinov2_reg": 5}[family]
        with torch.no_grad():
            torch.testing.assert_close(e(x), hf_hidden(ref, x, 1)[:, prefix:], rtol=0, atol=0)


def test_load_vision_tower_of_a_two_tower_checkpoint(tmp_path):
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = CLIPModel(CLIPConfig(vision_config=HF["clip"][0], text_config=text, projection_dim=16)).eval()
    full.save_pretrained(tmp_path)
    e = build_encoder({"type": "clip", "path": str(tmp_path)})
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(e(x), hf_hidden(full.vision_model, x, -2)[:, 1:], rtol=0, atol=0)


def test_wrong_checkpoint_family_is_a_user_error(tmp_path):
    Dinov2Model(Dinov2Config(**HF["dinov2"][0])).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="dinov2"):
        build_encoder({"type": "clip", "path": str(tmp_path)})
    with pytest.raises(UserError, match="path"):
        build_encoder({"type": "clip", "path": str(tmp_path / "missing")})


def test_zoo_path_is_resolved_through_vlm_zoo(tmp_path, monkeypatch):
    CLIPVisionModel(CLIPVisionConfig(**HF["clip"][0])).save_pretrained(tmp_path)
    asked = []
    monkeypatch.setattr(catalogue, "resolve", lambda spec: asked.append(spec) or tmp_path)
    e = build_encoder({"type": "clip", "path": "zoo:tiny-clip"})
    assert asked == ["zoo:tiny-clip"] and e.num_tokens == NUM_PATCHES


# ---------------------------------------------------------------- bad configs

@pytest.mark.parametrize("extra,match", [
    ({"select_tokens": "cls_only"}, "select_tokens"),
    ({"select_layer": 4}, "select_layer"),
    ({"select_layer": -5}, "select_layer"),
    ({"image_size": 6}, "smaller than one patch"),
    ({"has_cls": False}, "has_cls"),
    ({"num_register_tokens": 2}, "num_register_tokens"),
    ({"resize": "squash"}, "resize"),
    ({"mean": [0.5, 0.5]}, "mean"),
    ({"dtype": "float8"}, "dtype"),
    ({"select_layers": -2}, r"unknown key select_layers\. did you mean select_layer\?"),
])
def test_bad_configs_are_user_errors(extra, match):
    with pytest.raises(UserError, match=f"(?i){match}"):
        enc("clip", **extra)


def test_missing_path_and_config_is_a_user_error():
    with pytest.raises(UserError, match="path"):
        build_encoder({"type": "clip"})
    with pytest.raises(UserError, match="unknown encoder type"):
        build_encoder({"type": "clipp", "config": {}})


# ---------------------------------------------------------------- transforms

def test_normalisation_numbers():
    t = ImageTransform(4, resize="resize", mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = t(Image.new("RGB", (4, 4), (255, 0, 51)))
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -1.0, 0.1]))


def test_family_default_normalisation():
    white = Image.new("RGB", (28, 28), (255, 255, 255))
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    torch.testing.assert_close(enc("clip").transform(white)[:, 0, 0], (1 - clip_mean) / clip_std)
    torch.testing.assert_close(enc("siglip").transform(white)[:, 0, 0], torch.ones(3))
    dino = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(enc("dinov2").transform(white)[:, 0, 0], dino)


def test_letterbox_keeps_aspect_and_pads_with_mean_colour():
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    t = ImageTransform(28, resize="letterbox", mean=mean, std=std, interpolation="nearest")
    x = t(Image.new("RGB", (56, 28), (255, 0, 0)))  # 2:1 → 7 pad rows top and bottom, image in rows 7..20
    pad = (torch.tensor([int(m * 255) for m in mean]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(mean)) / torch.tensor(std)
    for row in (0, 6, 21, 27):
        torch.testing.assert_close(x[:, row, :], pad[:, None].expand(3, 28))
    for row in (7, 14, 20):
        torch.testing.assert_close(x[:, row, :], red[:, None].expand(3, 28))
    assert abs(pad).max() < 0.02  # the padding is (up to 8-bit rounding) zero after normalisation


def test_center_crop_and_resize():
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 20))  # white middle third, black sides
    crop = ImageTransform(20, resize="center_crop", mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest")(img)
    assert crop.shape == (3, 20, 20) and torch.all(crop == 1.0)  # only the middle survives
    squash = ImageTransform(20, resize="resize", mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest")(img)
    assert squash[0, 10, 0] == 0 and squash[0, 10, 10] == 1 and squash[0, 10, 19] == 0
    tall = ImageTransform((10, 20), resize="center_crop", mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert tall.shape == (3, 10, 20)


def test_rgba_and_grayscale_become_rgb():
    t = ImageTransform(4, mean=(0, 0, 0), std=(1, 1, 1))
    gray = t(Image.new("L", (4, 4), 255))
    assert gray.shape == (3, 4, 4) and torch.all(gray == 1.0)
    transparent = t(Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert torch.all(transparent == 1.0)  # composited onto white
    opaque = t(Image.new("RGBA", (4, 4), (0, 0, 0, 255)))
    assert torch.all(opaque == 0.0)


# ---------------------------------------------------------------- fingerprint

def test_fingerprint_sensitivity():
    e = enc("clip")
    fp = e.fingerprint()
    assert fp == e.fingerprint()
    for change in ({"select_layer": -1}, {"select_tokens": "cls_patch"}, {"resize": "letterbox"},
                   {"mean": [0.5, 0.5, 0.5]}, {"image_size": 42}):
        other = build_encoder({**e.cfg, **change})
        other.load_state_dict(e.state_dict())
        assert other.fingerprint() != fp, change
    same = build_encoder(dict(e.cfg))
    same.load_state_dict(e.state_dict())
    assert same.fingerprint() == fp
    with torch.no_grad():
        e.blocks()[0].mlp.fc1.weight.add_(1.0)  # trained in place → different features → different key
    assert e.fingerprint() != fp


def test_fingerprint_stable_across_processes(tmp_path):
    SiglipVisionModel(SiglipVisionConfig(**HF["siglip"][0])).save_pretrained(tmp_path)
    cfg = {"type": "siglip", "path": str(tmp_path), "resize": "letterbox"}
    code = f"from encoders import build_encoder; print(build_encoder({cfg!r}).fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                              "PYTHONHASHSEED": "123"})
    assert out.stdout.strip().splitlines()[-1] == build_encoder(cfg).fingerprint()


# ---------------------------------------------------------------- timm

TIMM_VIT = dict(depth=3, embed_dim=32, num_heads=2, img_size=32, patch_size=8)


def hooked_output(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference: the module's output captured by a forward hook during timm's plain forward_features."""
    got = []
    handle = module.register_forward_hook(lambda m, i, o: got.append(o))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    return got[0]


@pytest.mark.parametrize("mode,regs,expected", [("patch", 0, 16), ("cls_patch", 0, 17), ("cls", 0, 1),
                                                ("patch", 2, 16), ("cls_patch", 2, 17)])
def test_timm_vit_tokens(mode, regs, expected):
    e = build_encoder({"type": "timm", "model": "vit_tiny_patch16_224", "config": {**TIMM_VIT, "reg_tokens": regs},
                       "select_tokens": mode})
    assert (e.has_cls, e.num_register_tokens, e.hidden_size, len(e.blocks())) == (True, regs, 32, 2)  # 2 of 3 feed
    x = pixels(2, 32)
    with torch.no_grad():
        out = e(x)
    assert out.shape == (2, expected, 32) and e.num_tokens == expected
    assert e.patch_grid_size == ((4, 4) if mode == "patch" else None)
    ref = hooked_output(e.model, e.model.blocks[1], x)  # select_layer -2 = output of the penultimate block
    want = {"patch": ref[:, 1 + regs:], "cls": ref[:, :1], "cls_patch": torch.cat([ref[:, :1], ref[:, 1 + regs:]], 1)}
    torch.testing.assert_close(out, want[mode], rtol=0, atol=0)


def test_timm_vit_without_class_token_keeps_every_token():
    e = build_encoder({"type": "timm", "model": "vit_tiny_patch16_224", "select_layer": 1,
                       "config": {**TIMM_VIT, "class_token": False, "global_pool": "avg"}})
    x = pixels(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(e(x), hooked_output(e.model, e.model.blocks[0], x), rtol=0, atol=0)
    with pytest.raises(UserError, match="CLS"):
        build_encoder({**e.cfg, "select_tokens": "cls"})
    with pytest.raises(UserError, match="img_size"):
        build_encoder({**e.cfg, "image_size": 48})


@pytest.mark.parametrize("name,k,stage,grid,channels", [
    ("resnet18", -2, "layer3", (4, 4), 256), ("resnet18", 1, "layer1", (16, 16), 64),
    ("efficientnet_b0", -1, "blocks.6", (2, 2), 320),
])
def test_timm_cnn_feature_map_becomes_tokens(name, k, stage, grid, channels):
    config = {"layers": [1, 1, 1, 1]} if name == "resnet18" else {}
    e = build_encoder({"type": "timm", "model": name, "config": config, "image_size": 64, "select_layer": k})
    assert (e.hidden_size, e.patch_grid_size, e.num_tokens, e.has_cls) == (channels, grid, grid[0] * grid[1], False)
    x = pixels(2, 64)
    with torch.no_grad():
        out = e(x)
    fmap = hooked_output(e.model, e.model.get_submodule(stage), x)  # [B, C, h, w]
    assert fmap.shape == (2, channels, *grid)
    torch.testing.assert_close(out, fmap.flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert out[0, 1].equal(fmap[0, :, 0, 1])  # row-major: token 1 is row 0, column 1
    assert e.transform.mean == (0.485, 0.456, 0.406)  # timm's pretrained_cfg normalisation
    if name == "resnet18" and k == 1:
        assert [type(b).__name__ for b in e.blocks()] == ["Sequential"]  # layer1 only feeds select_layer 1
        for bad in ({"select_tokens": "cls_patch"}, {"has_cls": True}, {"select_layer": 5}):
            with pytest.raises(UserError, match="CLS|has_cls|select_layer"):
                build_encoder({**e.cfg, **bad})


def test_timm_pretrained_path_and_model_dir(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_VIT).eval()  # with its classifier
    save_file(src.state_dict(), tmp_path / "vit.safetensors")
    e = build_encoder({"type": "timm", "model": "vit_tiny_patch16_224", "config": TIMM_VIT,
                       "pretrained_path": str(tmp_path / "vit.safetensors")})
    x = pixels(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(e(x), hooked_output(src, src.blocks[1], x)[:, 1:], rtol=0, atol=0)
    timm.models.save_for_hf(src, tmp_path / "dir", model_args=TIMM_VIT)
    d = build_encoder({"type": "timm", "path": str(tmp_path / "dir")})
    assert d.fingerprint() != e.fingerprint()  # different source, same weights
    with torch.no_grad():
        torch.testing.assert_close(d(x), e(x), rtol=0, atol=0)
    with pytest.raises(UserError, match="does not exist"):
        build_encoder({"type": "timm", "model": "resnet18", "pretrained_path": str(tmp_path / "nope.safetensors")})
    with pytest.raises(UserError, match="cannot create"):
        build_encoder({"type": "timm", "model": "no_such_net"})


# ---------------------------------------------------------------- fused

def fused_parts():
    a = {"type": "clip", "config": {**HF["clip"][0], "image_size": 32, "patch_size": 8}, "resize": "letterbox"}  # 4x4
    b = {"type": "dinov2", "config": HF["dinov2"][0] | {"patch_size": 14}}  # 2x2, own transform
    return a, b


def test_fused_channel_and_sequence():
    a, b = fused_parts()
    images = [Image.new("RGB", (40, 30), (9, 99, 199)), Image.new("RGB", (30, 40))]
    ch = build_encoder({"type": "fused", "encoders": [a, b], "mode": "channel"})
    seq = build_encoder({"type": "fused", "encoders": [a, b], "mode": "sequence"})
    seq.load_state_dict(ch.state_dict())
    px = ch.preprocess(images)
    assert px["enc0"].shape == (2, 3, 32, 32) and px["enc1"].shape == (2, 3, 28, 28)
    torch.testing.assert_close(px["enc0"], ch.encoders[0].preprocess(images))  # each keeps its own transform
    with torch.no_grad():
        out_c, out_s = ch(px), seq(px)
        fa, fb = ch.encoders[0](px["enc0"]), ch.encoders[1](px["enc1"])
    assert (out_c.shape, ch.num_tokens, ch.hidden_size, ch.patch_grid_size) == ((2, 4, 64), 4, 64, (2, 2))
    assert (out_s.shape, seq.num_tokens, seq.hidden_size, seq.patch_grid_size) == ((2, 8, 32), 8, 32, None)
    # the 4x4 grid is area-pooled to 2x2: token (0, 0) is the mean of the top-left 2x2 patches
    pooled = fa.reshape(2, 4, 4, 32)[:, :2, :2].mean(dim=(1, 2))
    torch.testing.assert_close(out_c[:, 0, :32], pooled)
    torch.testing.assert_close(out_c[:, :, 32:], fb)
    torch.testing.assert_close(out_s[:, 4:], fb)
    assert len(ch.blocks()) == 4 and [len(g) for g in ch.block_groups()] == [2, 2]  # penultimate of 3 layers each


def test_fused_upsamples_to_a_larger_grid_and_validates():
    a, b = fused_parts()
    e = build_encoder({"type": "fused", "encoders": [a, b], "patch_grid_size": 4})
    assert e.num_tokens == 16 and e.patch_grid_size == (4, 4)
    with torch.no_grad():
        px = e.preprocess([Image.new("RGB", (28, 28))])
        out = e(px)
        torch.testing.assert_close(out[:, :, :32], e.encoders[0](px["enc0"]))  # already 4x4: untouched
        tokens = e.encoders[1](px["enc1"])
        assert out.shape == (1, 16, 64)
        torch.testing.assert_close(out[0, 0, 32:], tokens[0, 0])  # bilinear 2→4: corner = nearest source token
    with pytest.raises(UserError, match="select_tokens"):
        build_encoder({"type": "fused", "encoders": [a, {**b, "select_tokens": "cls_patch"}]})
    with pytest.raises(UserError, match="equal widths"):
        wide = {**b, "config": {**b["config"], "hidden_size": 64}}
        build_encoder({"type": "fused", "encoders": [a, wide], "mode": "sequence"})
    with pytest.raises(UserError, match="at least two"):
        build_encoder({"type": "fused", "encoders": [a]})
    with pytest.raises(UserError, match="mode"):
        build_encoder({"type": "fused", "encoders": [a, b], "mode": "stack"})

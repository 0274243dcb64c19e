"""HF ViT encoders at image sizes that are not a multiple of the patch size (SigLIP-so400m-patch14-384,
DINOv2 at 384 px): every HF family floors (a stride-`patch` conv drops the last `size % patch` pixels) and
resamples its position embeddings to `size // patch`. Our encoder must give HF's own token count and values.
Tiny random configs of the real architectures; the pixel sizes are the real ones where that stays cheap.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from encoders import build_encoder
from vlm.errors import UserError
from vlm.plan.meta import meta_encoder_cfg
from vlm.recipe.schema import read_yaml

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
FAMILIES = {  # family → (encoder type, extra config kwargs, number of prefix tokens)
    "clip": ("clip", {"intermediate_size": 32}, 1),
    "siglip": ("siglip", {"intermediate_size": 32}, 0),
    "dinov2": ("dinov2", {"mlp_ratio": 2}, 1),
    "dinov2_reg": ("dinov2", {"mlp_ratio": 2, "num_register_tokens": 4}, 5),
}


def encoder(family: str, native: int, patch: int, **kw):
    kind, extra, _ = FAMILIES[family]
    return build_encoder({"type": kind, "config": {**TINY, **extra, "image_size": native, "patch_size": patch}, **kw})


def hf_reference(e, x: torch.Tensor, k: int, interpolate: bool) -> torch.Tensor:
    """HF's own forward with every hidden state returned; CLIP/SigLIP need the flag off their native size,
    DINOv2 always resamples (its forward has no flag)."""
    kw = {"interpolate_pos_encoding": True} if interpolate and e.family.name != "dinov2" else {}
    with torch.no_grad():
        return e.model(pixel_values=x, output_hidden_states=True, **kw).hidden_states[k]


def pixels(h: int, w: int) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("native,patch,size,grid", [
    (30, 7, None, (4, 4)),        # the config's own size is not a multiple: HF floors, no resampling
    (28, 7, 38, (5, 5)),          # another size, not a multiple: resampled to 38 // 7 = 5
    (28, 7, [30, 44], (4, 6)),    # non-square, neither side a multiple
])
def test_non_multiple_sizes_floor_like_hf(family, native, patch, size, grid):
    e = encoder(family, native, patch, **({} if size is None else {"image_size": size}), select_layer=-2)
    h, w = (native, native) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    n = grid[0] * grid[1]
    assert (e.num_tokens, e.num_patches, e.patch_grid_size) == (n, n, grid)
    x = pixels(h, w)
    ref = hf_reference(e, x, -2, interpolate=size is not None)
    prefix = FAMILIES[family][2]
    assert ref.shape[1] == prefix + n
    with torch.no_grad():
        out = e(x)
    assert out.shape == (2, n, 16)
    torch.testing.assert_close(out, ref[:, prefix:], rtol=0, atol=0)
    assert e.preprocess([Image.new("RGB", (50, 40))]).shape == (1, 3, h, w)  # pixels at image_size, as HF's processor


@pytest.mark.parametrize("family,native,size,tokens", [
    ("siglip", 384, None, 729),    # google/siglip-so400m-patch14-384: 27 x 27, as HF gives
    ("dinov2", 518, 384, 729),     # DINOv2 (518 px native) run at 384 px: 27 x 27
    ("dinov2_reg", 518, 384, 729),
    ("clip", 336, None, 576),      # CLIP-L/336: a multiple, unchanged
])
def test_real_resolutions(family, native, size, tokens):
    e = encoder(family, native, 14, **({} if size is None else {"image_size": size}))
    side = {729: 27, 576: 24}[tokens]
    assert e.num_tokens == tokens and e.patch_grid_size == (side, side)
    px = size or native
    x = pixels(px, px)[:1]
    with torch.no_grad():
        out = e(x)
    ref = hf_reference(e, x, -2, interpolate=size is not None)
    assert out.shape == (1, tokens, 16)
    torch.testing.assert_close(out, ref[:, FAMILIES[family][2]:], rtol=0, atol=0)


def test_size_that_floors_to_the_native_grid():
    """380 px on a 384 px / patch-14 model floors to the native 27 x 27 (HF then keeps its table); the last
    380 - 27 * 14 = 2 pixel rows and columns are never seen, exactly as in HF."""
    e = encoder("siglip", 384, 14, image_size=380)
    x = pixels(380, 380)[:1]
    with torch.no_grad():
        out = e(x)
        torch.testing.assert_close(out, hf_reference(e, x, -2, interpolate=True), rtol=0, atol=0)
        torch.testing.assert_close(out, e(x[..., :378, :378].contiguous()), rtol=0, atol=0)
    assert e.num_tokens == 729


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
def test_image_smaller_than_one_patch_is_a_user_error(family):
    with pytest.raises(UserError, match="(?i)smaller than one patch"):
        encoder(family, 28, 7, image_size=6)
    with pytest.raises(UserError, match="(?i)smaller than one patch"):
        encoder(family, 28, 7, image_size=[28, 5])


def test_fused_pair_at_real_sizes():
    """Prismatic's DINOv2 + SigLIP pair at 384 px: both 27 x 27, so channel fusion needs no resampling."""
    d = {"type": "dinov2", "config": {**TINY, "mlp_ratio": 2, "image_size": 518, "patch_size": 14}, "image_size": 384}
    s = {"type": "siglip", "config": {**TINY, "intermediate_size": 32, "image_size": 384, "patch_size": 14}}
    e = build_encoder({"type": "fused", "encoders": [d, s]})
    assert e.num_tokens == 729 and e.hidden_size == 32
    px = e.preprocess([Image.new("RGB", (64, 48), (30, 60, 90))])
    with torch.no_grad():
        out = e(px)
        torch.testing.assert_close(out, torch.cat([e.encoders[0](px["enc0"]), e.encoders[1](px["enc1"])], -1))
    assert out.shape == (1, 729, 32)


def test_research_grid_encoders_build_with_hf_token_counts():
    """Every encoder of recipes/grids/fine_grained_knowledge.yaml, from the real configs `vlm plan` stores, built
    on the meta device: SigLIP-so400m-384 and DINOv2-L at 384 px give HF's 27 x 27 (were refused)."""
    grid = read_yaml(Path(__file__).resolve().parents[1] / "recipes" / "grids" / "fine_grained_knowledge.yaml", "grid")
    expected = {"clip-l336": (576, 1024), "siglip": (729, 1152), "dinov2-l": (576, 1024), "dinosiglip": (729, 2176)}
    values = grid["axes"]["enc"]["values"]
    assert set(values) == set(expected)
    for name, cfg in values.items():
        with torch.device("meta"):
            e = build_encoder(meta_encoder_cfg(cfg))
        assert (e.num_tokens, e.hidden_size) == expected[name], name

"""Our image transforms against Hugging Face's image processors, built from the real processor configs of the hub
checkpoints the recipes name (encoders/preprocessor_configs/): the same resized size (HF truncates the long side),
the same crop offsets, the same pixels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BitImageProcessor, CLIPImageProcessor, SiglipImageProcessor
from transformers.image_transforms import get_resize_output_image_size
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from encoders import build_encoder

FACTS = Path(__file__).resolve().parents[1] / "encoders" / "preprocessor_configs"
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14)
# family -> (hub id whose processor config we hold, HF processor with PIL resampling, the default (torchvision)
# one, its output side, extra tiny-config keys)
FAMILIES = {
    "clip": ("openai/clip-vit-large-patch14-336", CLIPImageProcessorPil, CLIPImageProcessor, 336,
             {"intermediate_size": 64}),
    "siglip": ("google/siglip-so400m-patch14-384", SiglipImageProcessorPil, SiglipImageProcessor, 384,
               {"intermediate_size": 64}),
    "dinov2": ("facebook/dinov2-large", BitImageProcessorPil, BitImageProcessor, 224, {"mlp_ratio": 2}),
}
# (width, height): odd aspect ratios where rounding and truncating the long side differ (500x333 at 336: 504.5),
# both orientations, and a very wide one
SIZES = [(500, 333), (333, 500), (401, 299), (1000, 337), (640, 480)]


def processor_config(hub_id: str) -> dict:
    return json.loads((FACTS / hub_id.replace("/", "--") / "preprocessor_config.json").read_text())


def transform(family: str, **kw):
    """The transform our encoder of this family builds by default at its HF processor's output size."""
    _, _, _, side, extra = FAMILIES[family]
    return build_encoder({"type": family, "config": {**TINY, **extra, "image_size": side}, **kw}).transform


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour waves with sensor-like noise: a stand-in for a photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    waves = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(4 * (x + y))], -1)
    return Image.fromarray(np.clip(127.5 + 100 * waves + rng.normal(0, 8, waves.shape), 0, 255).astype(np.uint8))


def hf_pixels(processor, image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(processor(image, return_tensors="np")["pixel_values"][0]))


def test_resized_size_truncates_like_hf():
    """Before the crop: short side to the target (DINOv2: 256 for its 224 crop), long side `int(target * long /
    short)` as `get_resize_output_image_size`, for every size up to 120 px and the odd photo sizes."""
    sizes = [(h, w) for h in range(1, 121, 7) for w in range(1, 121, 5)] + [(h, w) for w, h in SIZES]
    for family, short in (("clip", 336), ("dinov2", 256)):
        t = transform(family)
        for h, w in sizes:
            want = get_resize_output_image_size(np.zeros((h, w, 3)), short, default_to_square=False,
                                                input_data_format="channels_last")
            assert t.cover_size(h, w) == tuple(want), (family, h, w)
    assert transform("clip").cover_size(333, 500) == (336, 504)  # rounding gave 505 and a crop one pixel off


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pixels_equal_the_hf_processor(family):
    hub_id, pil_processor, _, side, _ = FAMILIES[family]
    processor = pil_processor(**processor_config(hub_id))
    ours = transform(family)
    for w, h in SIZES:
        for image in (photo(w, h), Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), np.uint8))):
            x, y = ours(image), hf_pixels(processor, image)
            assert x.shape == y.shape == (3, side, side)
            # Both resample with PIL, so the 8-bit pixels are identical; what is left is float32 rounding of
            # (v / 255 - mean) / std done in another order: a few ulps of values up to |2.6|.
            assert torch.allclose(x, y, rtol=0, atol=2e-6), (family, w, h, (x - y).abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pixels_match_the_default_torchvision_processor(family):
    """transformers' default processor class resamples 8-bit tensors with torchvision's antialiased bicubic, which
    differs from PIL's by at most 2 grey levels on a photo-like image (measured; a crop one pixel off, or DINOv2 without
    its 256 -> 224 crop, moves values by over 3 in normalised units, 100 times this tolerance)."""
    hub_id, _, tv_processor, _, _ = FAMILIES[family]
    cfg = processor_config(hub_id)
    processor = tv_processor(**cfg)
    two_levels = 2.0 / 255 / min(cfg["image_std"]) + 1e-6
    ours = transform(family)
    for w, h in SIZES:
        image = photo(w, h, seed=1)
        x, y = ours(image), hf_pixels(processor, image)
        assert torch.allclose(x, y, rtol=0, atol=two_levels), (family, w, h, (x - y).abs().max())


def test_letterbox_equals_llava_pad_then_the_clip_processor():
    """LLaVA-1.5's `image_aspect_ratio: pad`: the image centred on a square of the 8-bit mean colour, then CLIP's
    processor."""
    cfg = processor_config("openai/clip-vit-large-patch14-336")
    processor = CLIPImageProcessorPil(**cfg)
    ours = transform("clip", resize="letterbox")
    fill = tuple(int(m * 255) for m in cfg["image_mean"])
    for w, h in SIZES:
        image = photo(w, h)
        square = Image.new("RGB", (max(w, h), max(w, h)), fill)
        square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        assert torch.allclose(ours(image), hf_pixels(processor, square), rtol=0, atol=2e-6), (w, h)

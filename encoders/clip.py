"""OpenAI CLIP's vision tower (HF `CLIPVisionModel`): CLS token + patches, LLaVA's default encoder.

    {type: clip, path: openai/clip-vit-large-patch14-336}   # select_layer -2, patch tokens (LLaVA-1.5)
"""
from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, CLIPVisionModel

from encoders import register_encoder
from encoders.hf_vit import HFFamily, HFViTEncoder

CLIP = HFFamily(
    name="clip", model_cls=CLIPVisionModel, config_cls=CLIPVisionConfig,
    mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
    resize="center_crop", interpolation="bicubic", has_cls=True, model_types=frozenset({"clip_vision_model"}),
)


@register_encoder("clip")
def build(cfg: dict[str, Any]) -> HFViTEncoder:
    return HFViTEncoder(cfg, CLIP)

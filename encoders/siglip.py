"""SigLIP's vision tower (HF `SiglipVisionModel`).

SigLIP has NO CLS token (it pools with an attention head), so every position of its sequence
is a patch: `patch` mode keeps all of them and `cls`/`cls_patch` are errors. Dropping the
first token as if it were CLS is the bug TinyLLaVA and vLLM shipped.

    {type: siglip, path: google/siglip-so400m-patch14-384}
"""
from __future__ import annotations

from typing import Any

from transformers import SiglipVisionConfig, SiglipVisionModel

from encoders import register_encoder
from encoders.hf_vit import HFFamily, HFViTEncoder

SIGLIP = HFFamily(
    name="siglip", model_cls=SiglipVisionModel, config_cls=SiglipVisionConfig,
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="resize", interpolation="bicubic", has_cls=False,
    model_types=frozenset({"siglip_vision_model"}),
)


@register_encoder("siglip")
def build(cfg: dict[str, Any]) -> HFViTEncoder:
    return HFViTEncoder(cfg, SIGLIP)

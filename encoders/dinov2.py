"""DINOv2 (HF `Dinov2Model`) and DINOv2 with registers (HF `Dinov2WithRegistersModel`).

The sequence is `[CLS][registers...][patches...]`; `patch` mode drops CLS and the registers.
The class is picked from the config: a `num_register_tokens > 0` (or a checkpoint of model type
`dinov2_with_registers`) selects the registers variant. DINOv2 always interpolates its position
embeddings, so any `image_size` works; like HF, a size that is not a multiple of the patch floors
(384 px at patch 14: 27 x 27 patches).

    {type: dinov2, path: facebook/dinov2-with-registers-small}
"""
from __future__ import annotations

from typing import Any

from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, PretrainedConfig

from encoders import register_encoder
from encoders.hf_vit import HFFamily, HFViTEncoder


def _pick(config: PretrainedConfig) -> tuple[Any, Any]:
    if config.model_type == "dinov2_with_registers" or getattr(config, "num_register_tokens", 0):
        return Dinov2WithRegistersModel, Dinov2WithRegistersConfig
    return Dinov2Model, Dinov2Config


DINOV2 = HFFamily(
    name="dinov2", model_cls=Dinov2Model, config_cls=Dinov2Config,
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize="center_crop", interpolation="bicubic",
    has_cls=True, interpolate_pos_encoding=False, pick=_pick,
    model_types=frozenset({"dinov2", "dinov2_with_registers"}),
    crop_fraction=224 / 256,  # its BitImageProcessor: short side to 256, then the centre 224 x 224
)


@register_encoder("dinov2")
def build(cfg: dict[str, Any]) -> HFViTEncoder:
    return HFViTEncoder(_with_registers(cfg), DINOV2)


def _with_registers(cfg: dict[str, Any]) -> dict[str, Any]:
    """For a random init, a top-level `num_register_tokens` sets the config's (the architecture follows it)."""
    regs = cfg.get("num_register_tokens")
    config = cfg.get("config")
    if cfg.get("path") is None and regs and isinstance(config, dict) and "num_register_tokens" not in config:
        cfg = {**cfg, "config": {**config, "num_register_tokens": regs}}
    return cfg

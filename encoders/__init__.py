"""Vision encoders, registered by short name and built from a config dict.

    from encoders import build_encoder
    enc = build_encoder({"type": "dinov2", "path": "facebook/dinov2-small"})
"""
from __future__ import annotations

from typing import Any, Mapping

from encoders.base import PixelInputs, VisionEncoder
from vlm.registry import Registry

ENCODERS: Registry[VisionEncoder] = Registry("encoder", plugins="encoders")
register_encoder = ENCODERS.register


def build_encoder(cfg: Mapping[str, Any], where: str | None = None) -> VisionEncoder:
    """`where`: the config's recipe path (e.g. `model.encoder`), named in error messages."""
    return ENCODERS.build(cfg, where)


__all__ = ["ENCODERS", "PixelInputs", "VisionEncoder", "build_encoder", "register_encoder"]

"""Vision encoders, registered by short name and built from a config dict.

    from encoders import build_encoder
    enc = build_encoder({"type": "dinov2", "path": "facebook/dinov2-small"})
"""
from __future__ import annotations

from typing import Any, Mapping

from encoders.base import PixelInputs, VisionEncoder
from vlm.registry import Registry

ENCODERS: Registry[VisionEncoder] = Registry("encoder")
register_encoder = ENCODERS.register


def build_encoder(cfg: Mapping[str, Any]) -> VisionEncoder:
    _import_families()
    return ENCODERS.build(cfg)


def _import_families() -> None:
    import importlib
    import pkgutil

    import encoders

    for mod in pkgutil.iter_modules(encoders.__path__):
        if mod.name not in {"base"}:
            importlib.import_module(f"encoders.{mod.name}")


__all__ = ["ENCODERS", "PixelInputs", "VisionEncoder", "build_encoder", "register_encoder"]

"""Connectors (projectors and token reducers): `[B, N, Dv] → [B, N', Dllm]`.

    from connectors import build_connector
    proj = build_connector({"type": "mlp", "depth": 2}, vision_dim=1024, llm_dim=4096, num_tokens=576, patch_grid_size=(24, 24))
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from vlm.registry import Registry

CONNECTORS: Registry[nn.Module] = Registry("connector", plugins="connectors")
register_connector = CONNECTORS.register


# what `build_connector` passes every builder besides the config's own options (the builder's other keyword
# parameters are the options a config may set, checked against the signature: `vlm.config.check`)
CONTEXT = ("vision_dim", "llm_dim", "num_tokens", "patch_grid_size")


def build_connector(cfg: Mapping[str, Any], *, vision_dim: int, llm_dim: int, num_tokens: int,
                    patch_grid_size: tuple[int, int] | None = None, where: str | None = None) -> nn.Module:
    """Every connector module exposes `num_output_tokens: int` after construction. `where`: the config's path."""
    return CONNECTORS.build(cfg, where, vision_dim=vision_dim, llm_dim=llm_dim, num_tokens=num_tokens,
                            patch_grid_size=patch_grid_size)


def check_connector(cfg: Mapping[str, Any], where: str = "connector") -> dict[str, Any]:
    """A connector config checked against its builder's signature without building it."""
    return CONNECTORS.check(cfg, where, CONTEXT)


__all__ = ["CONNECTORS", "build_connector", "check_connector", "register_connector"]

"""Shared by the 2-D token reducers: patch-grid validation and the projector that follows a reducer."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from connectors import build_connector
from vlm.errors import UserError


def check_patch_grid(name: str, patch_grid_size: tuple[int, int] | None, num_tokens: int, factor: Any) -> tuple[int, int]:
    """The (rows, cols) grid a reducer pools over; rejects what it cannot pool."""
    if not isinstance(factor, int) or factor < 1:
        raise UserError(f"connector {name}: factor must be an integer >= 1, got {factor!r}.")
    if patch_grid_size is None:
        raise UserError(f"connector {name} needs a 2-D patch grid, but the encoder reports none "
                        f"(patch_grid_size=None, {num_tokens} tokens). Use select_tokens: patch, or a 1-D connector (mlp, resampler).")
    rows, cols = int(patch_grid_size[0]), int(patch_grid_size[1])
    if rows * cols != num_tokens:
        raise UserError(f"connector {name}: grid {rows}x{cols} does not match the encoder's {num_tokens} tokens "
                        f"(a CLS or register token kept?). Use select_tokens: patch.")
    if rows % factor or cols % factor:
        raise UserError(f"connector {name}: patch grid {rows}x{cols} is not divisible by factor={factor}; "
                        f"choose a factor dividing both sides or change the encoder's image_size.")
    return rows, cols


def build_projector(cfg: Mapping[str, Any] | None, *, in_dim: int, llm_dim: int, num_tokens: int,
                    patch_grid_size: tuple[int, int] | None, where: str) -> nn.Module:
    """The projector a reducer feeds (key `projector`, default `{type: mlp, depth: 2}`)."""
    return build_connector(dict(cfg or {"type": "mlp", "depth": 2}), vision_dim=in_dim, llm_dim=llm_dim,
                           num_tokens=num_tokens, patch_grid_size=patch_grid_size, where=where)

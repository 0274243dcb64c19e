"""`pixel_shuffle`: space-to-depth by `factor` (default 2), then project (InternVL / Idefics3 style).

Each `factor`×`factor` neighbourhood of the patch grid becomes one token whose channels are the
neighbours' features concatenated in row-major order: [B, r·c, D] → [B, (r/f)·(c/f), f²·D].
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from connectors import register_connector
from vlm.config import Positive
from connectors._patch_grid import build_projector, check_patch_grid


class PixelShuffleConnector(nn.Module):
    def __init__(self, patch_grid: tuple[int, int], factor: int, projector: nn.Module) -> None:
        super().__init__()
        self.patch_grid, self.factor = patch_grid, factor
        self.projector = projector
        self.num_output_tokens = projector.num_output_tokens

    def space_to_depth(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        (rows, cols), f = self.patch_grid, self.factor
        x = x.reshape(b, rows // f, f, cols // f, f, d).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (rows // f) * (cols // f), f * f * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.space_to_depth(x))


@register_connector("pixel_shuffle")
def build(*, vision_dim: int, llm_dim: int, num_tokens: int, patch_grid_size: tuple[int, int] | None = None,
          where: str, factor: Positive = 2, projector: Optional[dict[str, Any]] = None) -> nn.Module:
    """Pool each `factor`×`factor` block of the patch grid, then `projector` (default `{type: mlp, depth: 2}`)."""
    rows, cols = check_patch_grid("pixel_shuffle", patch_grid_size, num_tokens, factor)
    out_grid = (rows // factor, cols // factor)
    proj = build_projector(projector, in_dim=vision_dim * factor * factor, llm_dim=llm_dim,
                                num_tokens=out_grid[0] * out_grid[1], patch_grid_size=out_grid,
                                where=f"{where}.projector")
    return PixelShuffleConnector((rows, cols), factor, proj)

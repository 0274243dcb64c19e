"""`avgpool`: average-pool the patch grid by `factor`×`factor` (default 2×2), then project.

N = rows·cols tokens in row-major order become (rows/f)·(cols/f) tokens.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from connectors import register_connector
from vlm.config import Positive
from connectors._patch_grid import build_projector, check_patch_grid


class AvgPoolConnector(nn.Module):
    def __init__(self, patch_grid: tuple[int, int], factor: int, projector: nn.Module) -> None:
        super().__init__()
        self.patch_grid, self.factor = patch_grid, factor
        self.projector = projector
        self.num_output_tokens = projector.num_output_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        rows, cols = self.patch_grid
        grid = x.transpose(1, 2).reshape(b, d, rows, cols)
        pooled = F.avg_pool2d(grid, kernel_size=self.factor, stride=self.factor)
        return self.projector(pooled.flatten(2).transpose(1, 2))


@register_connector("avgpool")
def build(*, vision_dim: int, llm_dim: int, num_tokens: int, patch_grid_size: tuple[int, int] | None = None,
          where: str, factor: Positive = 2, projector: Optional[dict[str, Any]] = None) -> nn.Module:
    """Pool each `factor`×`factor` block of the patch grid, then `projector` (default `{type: mlp, depth: 2}`)."""
    rows, cols = check_patch_grid("avgpool", patch_grid_size, num_tokens, factor)
    out_grid = (rows // factor, cols // factor)
    proj = build_projector(projector, in_dim=vision_dim, llm_dim=llm_dim,
                                num_tokens=out_grid[0] * out_grid[1], patch_grid_size=out_grid,
                                where=f"{where}.projector")
    return AvgPoolConnector((rows, cols), factor, proj)

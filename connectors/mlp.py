"""`mlp` (depth n, GELU between layers) and `mlp2x_gelu` (depth 2: LLaVA-1.5's projector).

`layers` is an `nn.Sequential` of [Linear, GELU, Linear, GELU, ..., Linear]; HF LLaVA's
`multi_modal_projector.linear_1/linear_2` map to `layers.0/layers.2`.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from connectors import register_connector
from vlm.config import Positive
from vlm.errors import UserError


class MLPConnector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, num_tokens: int, depth: int = 2) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise UserError(f"connector mlp: depth must be an integer >= 1, got {depth!r}.")
        mods: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
        for _ in range(depth - 1):
            mods += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        self.layers = nn.Sequential(*mods)
        self.num_output_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_connector("mlp")
def build(*, vision_dim: int, llm_dim: int, num_tokens: int, patch_grid_size: tuple[int, int] | None = None,
          depth: Positive = 2) -> nn.Module:
    """`depth` linear layers with GELU between them."""
    return MLPConnector(vision_dim, llm_dim, num_tokens, depth=depth)


@register_connector("mlp2x_gelu")
def build_mlp2x_gelu(*, vision_dim: int, llm_dim: int, num_tokens: int,
                     patch_grid_size: tuple[int, int] | None = None, depth: Literal[2] = 2) -> nn.Module:
    """LLaVA-1.5's projector: depth 2 by definition (`type: mlp` for other depths)."""
    return MLPConnector(vision_dim, llm_dim, num_tokens, depth=2)

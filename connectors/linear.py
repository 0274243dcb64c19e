"""`linear`: one affine map Dv → Dllm per token (LLaVA-1.0's projector)."""
from __future__ import annotations

import torch
from torch import nn

from connectors import register_connector


class LinearConnector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_dim, llm_dim)
        self.num_output_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@register_connector("linear")
def build(*, vision_dim: int, llm_dim: int, num_tokens: int,
          patch_grid_size: tuple[int, int] | None = None) -> nn.Module:
    return LinearConnector(vision_dim, llm_dim, num_tokens)

"""`fused_gelu_mlp`: Prismatic's projector for fused (channel-concatenated) encoders.

Prismatic (Karamcheti et al., 2024, `FusedMLPProjector`): Linear(Dv, 4·Dv) → GELU →
Linear(4·Dv, Dllm) → GELU → Linear(Dllm, Dllm), where Dv is the fused (summed) width.
"""
from __future__ import annotations


import torch
from torch import nn

from connectors import register_connector


class FusedGeluMLP(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, num_tokens: int) -> None:
        super().__init__()
        hidden = 4 * vision_dim
        self.layers = nn.Sequential(
            nn.Linear(vision_dim, hidden), nn.GELU(),
            nn.Linear(hidden, llm_dim), nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )
        self.num_output_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_connector("fused_gelu_mlp")
def build(*, vision_dim: int, llm_dim: int, num_tokens: int,
          patch_grid_size: tuple[int, int] | None = None) -> nn.Module:
    return FusedGeluMLP(vision_dim, llm_dim, num_tokens)

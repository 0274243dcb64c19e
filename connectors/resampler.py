"""`resampler`: Perceiver-style resampler (Flamingo / Qwen-VL): `num_queries` learned queries
cross-attend to the image tokens through `depth` blocks, giving a fixed N' = num_queries.

Keys: `num_queries` (64), `depth` (2), `heads` (8), `dim` (width inside, default the LLM width).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from connectors import register_connector
from vlm.config import Positive
from vlm.errors import UserError


class ResamplerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        q = q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class Resampler(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, *, num_queries: int, depth: int, heads: int, dim: int) -> None:
        super().__init__()
        self.input_proj = nn.Linear(vision_dim, dim)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim ** -0.5)
        self.blocks = nn.ModuleList(ResamplerBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.output_proj = nn.Linear(dim, llm_dim)
        self.num_output_tokens = num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.input_proj(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1).to(kv.dtype)
        for block in self.blocks:
            q = block(q, kv)
        return self.output_proj(self.norm_out(q))


@register_connector("resampler")
def build(*, vision_dim: int, llm_dim: int, num_tokens: int, patch_grid_size: tuple[int, int] | None = None,
          num_queries: Positive = 64, depth: Positive = 2, heads: Positive = 8, dim: Optional[Positive] = None) -> nn.Module:
    """`num_queries` learned queries cross-attend to the tokens through `depth` blocks of width `dim` (default:
    the LLM's width)."""
    dim = llm_dim if dim is None else dim
    if dim % heads:
        raise UserError(f"connector resampler: width dim={dim} is not divisible by heads={heads}; "
                        f"set `heads` to a divisor of {dim} or set `dim`.")
    return Resampler(vision_dim, llm_dim, num_queries=num_queries, depth=depth, heads=heads, dim=dim)

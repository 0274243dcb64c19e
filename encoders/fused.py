"""Fused encoder: several encoders on the same image, token grids resampled to one size, then joined.

    {type: fused, mode: channel, encoders: [{type: dinov2, path: ...}, {type: siglip, path: ...}]}

Each sub-encoder keeps its own transform, so `preprocess` returns `{"enc0": pixels, "enc1": ...}`.
Every sub-encoder must return a patch grid (`select_tokens: patch`). Grids are resampled to
`patch_grid_size` (default: the smallest grid) by adaptive average pooling when shrinking and bilinear
interpolation otherwise. `mode: channel` concatenates features (Prismatic's DINOv2+SigLIP:
`D = D0 + D1`, `N = rows * cols`); `mode: sequence` concatenates tokens (`N = k * rows * cols`,
all widths must match).
"""
from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from encoders import build_encoder, register_encoder
from encoders.base import PixelInputs, VisionEncoder
from encoders.common import as_hw, check_keys
from vlm.errors import UserError

KEYS = {"type", "encoders", "mode", "patch_grid_size"}
MODES = ("channel", "sequence")


def resample_patch_grid(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """`[B, h*w, D]` tokens on a `grid` → `[B, H*W, D]` on `target` (area pooling down, bilinear up)."""
    if grid == target:
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    if target[0] <= grid[0] and target[1] <= grid[1]:
        x = F.adaptive_avg_pool2d(x, target)
    else:
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


class FusedEncoder(VisionEncoder):
    """Runs every sub-encoder, brings their grids to a common size and concatenates."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        check_keys(cfg, KEYS, "fused")
        self.cfg = dict(cfg)
        subs = cfg.get("encoders")
        if isinstance(subs, str) or not isinstance(subs, Sequence) or len(subs) < 2 \
                or not all(isinstance(s, Mapping) for s in subs):
            raise UserError("encoder 'fused': 'encoders' must be a list of at least two encoder configs.")
        self.mode = cfg.get("mode", "channel")
        if self.mode not in MODES:
            raise UserError(f"encoder 'fused': mode {self.mode!r} is not one of {', '.join(MODES)}.")
        self.encoders = nn.ModuleList([build_encoder(dict(s)) for s in subs])
        for i, e in enumerate(self.encoders):
            if e.patch_grid_size is None:
                raise UserError(f"encoder 'fused': encoders[{i}] ({e.cfg.get('type')}) returns no patch grid "
                                f"(select_tokens={e.select_tokens!r}); fused encoders need select_tokens: patch.")
        grids = [e.patch_grid_size for e in self.encoders]
        smallest = min(grids, key=lambda g: g[0] * g[1])
        self.target = as_hw(cfg["patch_grid_size"], "fused", "patch_grid_size") if cfg.get("patch_grid_size") is not None else smallest
        widths = [e.hidden_size for e in self.encoders]
        if self.mode == "sequence" and len(set(widths)) > 1:
            raise UserError(f"encoder 'fused': mode 'sequence' needs equal widths, got {widths}; use mode: channel.")
        self.hidden_size = sum(widths) if self.mode == "channel" else widths[0]
        self.has_cls, self.num_register_tokens, self.select_tokens = False, 0, "patch"
        self.select_layer = None  # each sub-encoder has its own

    @property
    def keys(self) -> list[str]:
        return [f"enc{i}" for i in range(len(self.encoders))]

    def preprocess(self, images: Sequence[Any]) -> PixelInputs:
        return {key: e.preprocess(images) for key, e in zip(self.keys, self.encoders)}

    def forward(self, pixels: PixelInputs) -> torch.Tensor:
        if not isinstance(pixels, Mapping) or set(pixels) != set(self.keys):
            raise ValueError(f"fused encoder expects a dict with keys {self.keys} (from its preprocess)")
        feats = [resample_patch_grid(e(pixels[k]), e.patch_grid_size, self.target) for k, e in zip(self.keys, self.encoders)]
        dtype = functools.reduce(torch.promote_types, [f.dtype for f in feats])
        feats = [f.to(dtype) for f in feats]
        return torch.cat(feats, dim=-1 if self.mode == "channel" else 1)

    @property
    def num_tokens(self) -> int:
        n = self.target[0] * self.target[1]
        return n if self.mode == "channel" else n * len(self.encoders)

    @property
    def patch_grid_size(self) -> tuple[int, int] | None:
        return self.target if self.mode == "channel" else None

    def blocks(self) -> nn.ModuleList:
        """The sub-encoders' blocks that feed their selected features, in order (first encoder's first)."""
        return nn.ModuleList([b for group in self.block_groups() for b in group])

    def block_groups(self) -> list[nn.ModuleList]:
        """One block list per sub-encoder: `partial` trains the last k blocks of each, not of the concatenation."""
        return [e.blocks() for e in self.encoders]

    def fingerprint(self) -> str:
        ident = {"family": "fused", "mode": self.mode, "grid": list(self.target),
                 "encoders": [e.fingerprint() for e in self.encoders]}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@register_encoder("fused")
def build(cfg: dict[str, Any]) -> FusedEncoder:
    return FusedEncoder(cfg)

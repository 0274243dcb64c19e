"""The vision-encoder interface every family implements.

An encoder turns images into a token sequence `[B, N, D]`. Its token semantics are
explicit (`has_cls`, `num_register_tokens`, `select_layer`, `select_tokens`) and it owns
its image transform, so a VLM never guesses how an encoder wants its pixels.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence, Union

import torch
from torch import nn

PixelInputs = Union[torch.Tensor, dict[str, torch.Tensor]]
"""What `preprocess` returns: a `[B, 3, H, W]` tensor, or one per sub-encoder (fused)."""

SELECT_TOKENS = ("patch", "cls_patch", "cls")


class VisionEncoder(nn.Module):
    """Base class. Subclasses set the attributes below in `__init__`.

    Attributes:
        cfg: the config dict it was built from (JSON-serialisable).
        hidden_size: D, the channel width of the returned tokens.
        has_cls: the backbone emits a CLS token first.
        num_register_tokens: register tokens that follow CLS (DINOv2-reg); dropped in `patch` mode.
        select_layer: index into the backbone's hidden states (HF semantics: 0 = embeddings,
            -1 = last layer, default -2 = penultimate).
        select_tokens: `patch` | `cls_patch` | `cls`.
        transform: callable PIL image → `[3, H, W]` float tensor.
    """

    cfg: dict[str, Any]
    hidden_size: int
    has_cls: bool
    num_register_tokens: int
    select_layer: int
    select_tokens: str

    def preprocess(self, images: Sequence[Any]) -> PixelInputs:
        """PIL images → the pixel input `forward` takes (batched)."""
        return torch.stack([self.transform(im) for im in images])

    def forward(self, pixels: PixelInputs) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        """N, the number of tokens `forward` returns per image."""
        raise NotImplementedError

    @property
    def patch_grid_size(self) -> tuple[int, int] | None:
        """(rows, cols) of the patch grid when the tokens form one (needed by 2-D reducers)."""
        return None

    def blocks(self) -> nn.ModuleList:
        """The backbone's stacked blocks that feed the returned features, in order (the unit of a `partial` freeze
        policy). Blocks after the selected layer/stage are left out: they never receive a gradient."""
        raise NotImplementedError

    def block_groups(self) -> list[nn.ModuleList]:
        """`blocks()` per member backbone (one group unless fused): `partial` with k trains the last k of each."""
        return [self.blocks()]

    def fingerprint(self) -> str:
        """Stable id of (weights source, architecture, transform, token selection): the feature-cache key."""
        return hashlib.sha256(json.dumps(self.cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def select_from_sequence(hidden: torch.Tensor, *, has_cls: bool, num_register_tokens: int, select_tokens: str) -> torch.Tensor:
    """Pick tokens from a ViT sequence laid out as [CLS][registers...][patches...]."""
    if select_tokens not in SELECT_TOKENS:
        raise ValueError(f"select_tokens must be one of {SELECT_TOKENS}, got {select_tokens!r}")
    n_prefix = int(has_cls) + num_register_tokens
    patches = hidden[:, n_prefix:]
    if select_tokens == "patch":
        return patches
    if not has_cls:
        raise ValueError("select_tokens='cls' or 'cls_patch' needs an encoder with a CLS token (has_cls=True)")
    cls = hidden[:, :1]
    return cls if select_tokens == "cls" else torch.cat([cls, patches], dim=1)

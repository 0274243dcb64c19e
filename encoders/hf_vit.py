"""Shared machinery of the Hugging Face ViT families (CLIP, SigLIP, DINOv2).

A family file declares an `HFFamily` (its config/model classes, its own normalisation and
token layout) and registers a builder returning `HFViTEncoder(cfg, family)`. Tokens come from HF's own
`hidden_states[select_layer]`, then CLS/register tokens are kept or dropped by `select_tokens`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from encoders.base import VisionEncoder, select_from_sequence
from encoders.common import (COMMON_KEYS, DigestCache, as_hw, check_declared, check_keys, check_select_layer,
                             check_select_tokens, resolve_path, torch_dtype)
from encoders.transforms import ImageTransform
from vlm.errors import UserError

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}


@dataclass(frozen=True)
class HFFamily:
    """What distinguishes one HF ViT family from another."""

    name: str
    model_cls: Callable[[PretrainedConfig], PreTrainedModel]
    config_cls: type[PretrainedConfig]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    interpolation: str
    has_cls: bool
    """Whether the backbone prepends a CLS token (SigLIP does not)."""
    interpolate_pos_encoding: bool = True
    """Pass `interpolate_pos_encoding=True` when the resolution differs from the config's (CLIP, SigLIP)."""
    pick: Callable[[PretrainedConfig], tuple[Any, Any]] | None = None
    """Optional: config → (model class, config class), e.g. DINOv2 with or without registers."""
    model_types: frozenset[str] = field(default_factory=frozenset)
    """`model_type`s of the vision config this family loads (a checkpoint of another family is an error)."""
    extra_keys: frozenset[str] = field(default_factory=frozenset)
    crop_fraction: float = 1.0
    """`center_crop`'s crop over the resized short side, as the family's HF processor does it (DINOv2: 224 of 256)."""


def load_config(path: str, family: HFFamily) -> PretrainedConfig:
    """The vision config at `path`; a full two-tower checkpoint (CLIPModel, SiglipModel) yields its `vision_config`."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"encoder '{family.name}': cannot load a model config from path {path!r} ({e}). "
                        "Give a local dir written by save_pretrained, a hub id, or zoo:<name>.") from e
    return getattr(config, "vision_config", None) or config


def build_backbone(cfg: Mapping[str, Any], family: HFFamily) -> tuple[PreTrainedModel, str]:
    """The HF model from `path` (real weights) or from `config` (random init); also returns the weights source."""
    path = resolve_path(cfg.get("path"), family.name)
    overrides = cfg.get("config") or {}
    dtype = torch_dtype(cfg.get("dtype"), family.name)
    if path is None:
        if not isinstance(overrides, Mapping) or not overrides:
            raise UserError(f"encoder '{family.name}': give 'path' (hub id, local dir or zoo:<name>) or, for a random "
                            "init of the real architecture, a non-empty 'config' dict of HF config kwargs.")
        config = family.config_cls(**dict(overrides))
        model_cls = family.model_cls
        if family.pick is not None:
            model_cls, config_cls = family.pick(config)
            config = config_cls(**dict(overrides))
        model = model_cls(config)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval(), "random-init"
    if overrides:
        raise UserError(f"encoder '{family.name}': 'config' is for random init and cannot be combined with path {path!r}; "
                        "remove one of them.")
    config = load_config(path, family)
    if family.model_types and config.model_type not in family.model_types:
        raise UserError(f"encoder '{family.name}': the checkpoint at {path!r} is a {config.model_type!r} model, not "
                        f"{' or '.join(sorted(family.model_types))}; set the encoder type that matches it.")
    model_cls = family.pick(config)[0] if family.pick is not None else family.model_cls
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model, info = model_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"encoder '{family.name}': cannot load {model_cls.__name__} weights from {path!r} ({e}).") from e
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise UserError(f"encoder '{family.name}': the checkpoint at {path!r} lacks {len(missing)} weights of "
                        f"{model_cls.__name__} (e.g. {missing[:3]}); they would be random. Is it the right checkpoint?")
    return model.eval(), path


class HFViTEncoder(VisionEncoder):
    """A Hugging Face ViT backbone returning `hidden_states[select_layer]` with CLS/registers selected."""

    def __init__(self, cfg: dict[str, Any], family: HFFamily) -> None:
        super().__init__()
        check_keys(cfg, COMMON_KEYS | family.extra_keys, family.name)
        self.cfg, self.family = dict(cfg), family
        self.model, self.weights_source = build_backbone(cfg, family)
        config = self.model.config
        self.hidden_size = int(config.hidden_size)
        self.patch_size = int(config.patch_size)
        self.has_cls = check_declared(cfg, "has_cls", family.has_cls, family.name,
                                      f"{family.name} {'prepends' if family.has_cls else 'has no'} CLS token")
        regs = int(getattr(config, "num_register_tokens", 0) or 0)
        self.num_register_tokens = check_declared(cfg, "num_register_tokens", regs, family.name, "from the model config")
        self.select_layer = check_select_layer(cfg, int(config.num_hidden_layers), family.name)
        self.select_tokens = check_select_tokens(cfg, self.has_cls, family.name)
        native = as_hw(config.image_size, family.name)
        self.image_size = as_hw(cfg.get("image_size", config.image_size), family.name)
        # Like HF (stride-`patch` conv, position embeddings resampled to `size // patch`), a size that is not a
        # multiple of the patch floors: SigLIP-so400m-patch14-384 gives 27 x 27 patches, its last 6 pixels unseen.
        if min(self.image_size) < self.patch_size:
            raise UserError(f"encoder '{family.name}': image_size {list(self.image_size)} is smaller than one patch "
                            f"({self.patch_size} px); use at least {self.patch_size}.")
        self.interpolate = family.interpolate_pos_encoding and self.image_size != native
        self.transform = ImageTransform(self.image_size, resize=cfg.get("resize", family.resize),
                                        mean=cfg.get("mean", family.mean), std=cfg.get("std", family.std),
                                        interpolation=cfg.get("interpolation", family.interpolation),
                                        crop_fraction=family.crop_fraction)
        self._digest = DigestCache()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)

    @property
    def num_tokens(self) -> int:
        return {"patch": self.num_patches, "cls_patch": 1 + self.num_patches, "cls": 1}[self.select_tokens]

    @property
    def patch_grid_size(self) -> tuple[int, int] | None:
        if self.select_tokens != "patch":
            return None
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    def blocks(self) -> nn.ModuleList:
        """The transformer layers that feed `hidden_states[select_layer]` (layer i outputs hidden state i + 1), from
        HF's stack (`encoder.layers`, `encoder.layer` or `layers`, whatever HF named it). The layers after it run but
        never see a gradient, so `partial` must not count them."""
        n = self.model.config.num_hidden_layers
        stack = next(m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) == n)
        used = self.select_layer if self.select_layer >= 0 else n + 1 + self.select_layer
        return nn.ModuleList(list(stack)[:used])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
            got = getattr(pixels, "shape", type(pixels))
            raise ValueError(f"{self.family.name} encoder expects a [B, 3, H, W] tensor, got {got}")
        first = next(self.model.parameters())
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        # A list `output_hidden_states` keeps only that hidden state (the others are None; same indexing).
        out = self.model(pixel_values=pixels.to(first.device, first.dtype),
                         output_hidden_states=[self.select_layer], **kwargs)
        hidden = out.hidden_states[self.select_layer]
        return select_from_sequence(hidden, has_cls=self.has_cls, num_register_tokens=self.num_register_tokens,
                                    select_tokens=self.select_tokens)

    def fingerprint(self) -> str:
        """Weights (source and exact bytes), architecture, transform and token selection."""
        ident = {
            "family": self.family.name, "weights_source": self.weights_source, "weights": self._digest.get(self.model),
            "config": {k: v for k, v in self.model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS},
            "transform": self.transform.describe(), "select_layer": self.select_layer,
            "select_tokens": self.select_tokens, "image_size": list(self.image_size),
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]

"""Any timm model as a vision encoder: ViT-style (token sequence) or CNN (feature map → tokens).

Tokens come from timm's own `forward_intermediates` (un-normalised, stopping after the selected
block/stage). `select_layer` keeps HF's `hidden_states` indexing:
- ViT: `k >= 1` is the output of block `k - 1`, `-1` the last block, `-2` the penultimate (the
  embeddings, `k = 0`, are not exposed by timm). CLS/register tokens follow `num_prefix_tokens`.
- CNN: an index into `feature_info` (0 = stem, then the stages; `-2` = penultimate stage); the
  `[B, C, h, w]` map becomes `[B, h*w, C]` tokens, row-major.

Weights: `model` + optional `pretrained_path` (a local .safetensors/.pth, loaded by timm with
`weights_only=True`), or `path` = a timm model dir (config.json + weights; also `zoo:<name>`) /
`hf-hub:<id>`. `config` holds `timm.create_model` kwargs (e.g. `depth`, `embed_dim`, `img_size`).

    {type: timm, model: vit_base_patch16_clip_224.openai, pretrained_path: /ckpt/vit_b16.safetensors}
    {type: timm, model: convnext_tiny, pretrained_path: /ckpt/convnext.safetensors, select_layer: -1}
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from encoders import register_encoder
from encoders.base import VisionEncoder, select_from_sequence
from encoders.common import (COMMON_KEYS, DigestCache, as_hw, check_declared, check_keys, check_select_layer,
                             check_select_tokens, resolve_path, torch_dtype)
from encoders.transforms import ImageTransform
from vlm.errors import UserError

KEYS = COMMON_KEYS | {"model", "pretrained_path"}


def create_model(cfg: Mapping[str, Any]) -> tuple[nn.Module, str]:
    """The timm model (classifier removed) and a description of where its weights come from."""
    path, name = resolve_path(cfg.get("path"), "timm"), cfg.get("model")
    kwargs = dict(cfg.get("config") or {})
    weights = cfg.get("pretrained_path")
    if (path is None) == (name is None):
        raise UserError("encoder 'timm': give exactly one of 'model' (a timm architecture name, with optional "
                        "'pretrained_path') or 'path' (a timm model dir with config.json, zoo:<name>, or hf-hub:<id>).")
    if path is not None:
        if weights is not None:
            raise UserError("encoder 'timm': 'pretrained_path' goes with 'model'; a 'path' dir carries its own weights.")
        if not path.startswith("hf-hub:"):
            if not (Path(path) / "config.json").is_file():
                raise UserError(f"encoder 'timm': path {path!r} is not a timm model dir (no config.json); "
                                "give 'model' + 'pretrained_path' for a bare checkpoint file.")
            path = f"local-dir:{path}"
        name, source, kwargs["pretrained"] = path, path, True
    elif weights is not None:
        if not Path(weights).is_file():
            raise UserError(f"encoder 'timm': pretrained_path {weights!r} does not exist.")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
        source = f"file:{weights}"
    else:
        kwargs["pretrained"], source = False, "random-init"
    try:
        model = timm.create_model(name, num_classes=0, **kwargs)
    except (RuntimeError, TypeError, OSError, ValueError) as e:
        raise UserError(f"encoder 'timm': cannot create {name!r} with {kwargs} ({e}). Check the model name "
                        "(timm.list_models()), its kwargs, and that the checkpoint matches the architecture.") from e
    dtype = torch_dtype(cfg.get("dtype"), "timm")
    if dtype is not None:
        model = model.to(dtype)
    if not hasattr(model, "forward_intermediates"):
        raise UserError(f"encoder 'timm': {name!r} has no forward_intermediates(), so its features cannot be selected.")
    return model.eval(), source


class TimmEncoder(VisionEncoder):
    """A timm backbone; `is_sequence` tells a ViT-like model (prefix + patch tokens) from a CNN."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        check_keys(cfg, KEYS, "timm")
        self.cfg = dict(cfg)
        self.model, self.weights_source = create_model(cfg)
        self.is_sequence = getattr(self.model, "num_prefix_tokens", None) is not None
        data_cfg = timm.data.resolve_model_data_config(self.model)
        if self.is_sequence:
            self._init_sequence(cfg)
        else:
            self._init_feature_map(cfg)
            self.image_size = as_hw(cfg.get("image_size", list(data_cfg["input_size"][1:])), "timm")
        self.select_tokens = check_select_tokens(cfg, self.has_cls, "timm")
        self.transform = ImageTransform(self.image_size, resize=cfg.get("resize", "center_crop"),
                                        mean=cfg.get("mean", data_cfg["mean"]), std=cfg.get("std", data_cfg["std"]),
                                        interpolation=cfg.get("interpolation", data_cfg.get("interpolation", "bicubic")))
        self._probe()
        self._digest = DigestCache()

    def _init_sequence(self, cfg: Mapping[str, Any]) -> None:
        m = self.model
        prefix = int(m.num_prefix_tokens)
        has_cls = bool(getattr(m, "has_class_token", getattr(m, "cls_token", None) is not None))
        self.has_cls = check_declared(cfg, "has_cls", has_cls, "timm", "timm's class token")
        self.num_register_tokens = check_declared(cfg, "num_register_tokens", prefix - int(has_cls), "timm",
                                                  f"num_prefix_tokens={prefix} minus the class token")
        num_blocks = len(m.blocks)
        k = check_select_layer(cfg, num_blocks, "timm", allow_zero=False)
        self.select_layer, self._take = k, (k - 1 if k > 0 else num_blocks + k)
        native = as_hw(list(m.patch_embed.img_size), "timm")
        self.image_size = as_hw(cfg.get("image_size", list(native)), "timm")
        if self.image_size != native and not getattr(m, "dynamic_img_size", False):
            raise UserError(f"encoder 'timm': image_size {list(self.image_size)} differs from the model's {list(native)}; "
                            f"set config: {{img_size: {self.image_size[0]}}} (timm resamples the position embeddings) "
                            "or config: {dynamic_img_size: true}.")

    def _init_feature_map(self, cfg: Mapping[str, Any]) -> None:
        self.has_cls = check_declared(cfg, "has_cls", False, "timm", "a CNN feature map has no CLS token")
        self.num_register_tokens = check_declared(cfg, "num_register_tokens", 0, "timm", "a CNN has no register tokens")
        num_features = len(self.model.feature_info)
        k = check_select_layer(cfg, num_features - 1, "timm")
        self.select_layer, self._take = k, k % num_features

    def _probe(self) -> None:
        """One dry forward pass on a blank image gives D, N and the grid exactly, for any architecture."""
        first = next(self.model.parameters())
        blank = torch.zeros(1, 3, *self.image_size, device=first.device, dtype=first.dtype)
        with torch.no_grad():
            tokens = self._backbone_tokens(blank)
            h, w = (self.model.patch_embed.dynamic_feat_size(self.image_size) if self.is_sequence
                    else self._feature_map(blank).shape[-2:])
        self.hidden_size = int(tokens.shape[-1])
        self._num_patches = int(tokens.shape[1]) - (int(self.has_cls) + self.num_register_tokens)
        if h * w != self._num_patches:
            raise UserError(f"encoder 'timm': {self._num_patches} patch tokens do not form the expected {h}x{w} grid; "
                            "check has_cls / num_register_tokens.")
        self._patch_grid = (int(h), int(w))

    def _backbone_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, prefix + patches, D]` (ViT) or `[B, h*w, C]` (CNN) at the selected block/stage."""
        if self.is_sequence:
            out = self.model.forward_intermediates(x, indices=[self._take], return_prefix_tokens=True, norm=False,
                                                   stop_early=True, output_fmt="NLC", intermediates_only=True)[0]
            return torch.cat([out[1], out[0]], dim=1) if isinstance(out, tuple) else out
        return self._feature_map(x).flatten(2).transpose(1, 2)

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(x, indices=[self._take], stop_early=True, intermediates_only=True)[0]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        first = next(self.model.parameters())
        tokens = self._backbone_tokens(pixels.to(first.device, first.dtype))
        return select_from_sequence(tokens, has_cls=self.has_cls, num_register_tokens=self.num_register_tokens,
                                    select_tokens=self.select_tokens)

    @property
    def num_tokens(self) -> int:
        return {"patch": self._num_patches, "cls_patch": 1 + self._num_patches, "cls": 1}[self.select_tokens]

    @property
    def patch_grid_size(self) -> tuple[int, int] | None:
        return self._patch_grid if self.select_tokens == "patch" else None

    def blocks(self) -> nn.ModuleList:
        """The blocks that feed the selected features, in order: ViT blocks up to the selected one; for a CNN the
        entries of its stage container (`blocks`/`stages`/`layers`, else its `feature_info` stages) up to the one
        holding the selected feature map. Later blocks never see a gradient, so `partial` must not count them."""
        if self.is_sequence:
            return nn.ModuleList(list(self.model.blocks)[: self._take + 1])
        named = self._candidate_blocks()
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        feature = self.model.feature_info[self._take]["module"]
        return nn.ModuleList([m for name, m in named if order[name] <= order[feature]])

    def _candidate_blocks(self) -> list[tuple[str, nn.Module]]:
        """A CNN's stacked blocks, named as in `named_modules()`."""
        for attr in ("blocks", "stages", "layers"):
            seq = getattr(self.model, attr, None)
            if isinstance(seq, (nn.Sequential, nn.ModuleList)):
                return [(f"{attr}.{i}", m) for i, m in enumerate(seq)]
        return [(info["module"], self.model.get_submodule(info["module"])) for info in self.model.feature_info[1:]]

    def fingerprint(self) -> str:
        ident = {
            "family": "timm", "model": self.cfg.get("model"), "config": self.cfg.get("config"),
            "weights_source": self.weights_source, "weights": self._digest.get(self.model),
            "transform": self.transform.describe(), "select_layer": self.select_layer,
            "select_tokens": self.select_tokens, "image_size": list(self.image_size),
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


@register_encoder("timm")
def build(cfg: dict[str, Any]) -> TimmEncoder:
    return TimmEncoder(cfg)

"""Image transforms: PIL image → normalised `[3, H, W]` float tensor.

Three ways to reach the encoder's resolution:
- `resize`: stretch to `H x W` (SigLIP's processor; the aspect ratio is not kept).
- `center_crop`: scale the image to cover `H / crop_fraction x W / crop_fraction`, then crop `H x W` from the
  centre (CLIP's processor: `crop_fraction` 1, the short side to the crop size; DINOv2's `BitImageProcessor`:
  short side 256, crop 224, so `crop_fraction` 224/256).
- `letterbox`: pad the image to the target aspect ratio with the mean colour, then resize (LLaVA-1.5's
  `image_aspect_ratio: pad`, whose `expand2square` pads with `tuple(int(m * 255) for m in mean)`).

Sizes and offsets follow Hugging Face's image processors exactly (`transformers.image_transforms.
get_resize_output_image_size` and `center_crop`): the long side is truncated, `int(short_target * long / short)`,
never rounded, and the crop starts at `(size - crop) // 2`; resampling is PIL's, as in their PIL backend, so the
pixels equal theirs (tests/test_transforms_hf.py, against the processor configs in encoders/preprocessor_configs/).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vlm.errors import UserError

RESIZE_MODES = ("resize", "center_crop", "letterbox")
INTERPOLATIONS = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR,
                  "nearest": TF.InterpolationMode.NEAREST, "lanczos": TF.InterpolationMode.LANCZOS}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL image; transparent pixels are composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P") and (image.mode != "P" or "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """Callable PIL → tensor with an encoder's resolution, resize mode and normalisation."""

    def __init__(self, image_size: int | Sequence[int], resize: str = "resize", mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), interpolation: str = "bicubic",
                 crop_fraction: float = 1.0) -> None:
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.size = (int(image_size[0]), int(image_size[1]))
        if resize not in RESIZE_MODES:
            raise UserError(f"image transform: resize {resize!r} is not one of {', '.join(RESIZE_MODES)}.")
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"image transform: interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}.")
        for name, values in (("mean", mean), ("std", std)):
            if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
                raise UserError(f"image transform: {name} must be 3 numbers (one per RGB channel), got {list(values)!r}.")
        if min(std) <= 0:
            raise UserError(f"image transform: std must be positive, got {list(std)!r}.")
        if not 0 < crop_fraction <= 1:
            raise UserError(f"image transform: crop_fraction must be in (0, 1] (the crop's share of the resized "
                            f"image's side), got {crop_fraction!r}.")
        self.resize, self.interpolation, self.crop_fraction = resize, interpolation, float(crop_fraction)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, image: Any) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise UserError(f"image transform: expected a PIL image, got {type(image).__name__}.")
        image = to_rgb(image)
        h, w = self.size
        mode = INTERPOLATIONS[self.interpolation]
        if self.resize == "letterbox":
            image = self._pad_to_aspect(image)
        if self.resize == "center_crop":
            new_h, new_w = self.cover_size(image.height, image.width)
            image = TF.resize(image, [new_h, new_w], interpolation=mode)
            image = TF.crop(image, (new_h - h) // 2, (new_w - w) // 2, h, w)
        else:
            image = TF.resize(image, [h, w], interpolation=mode)
        x = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std))

    def cover_size(self, height: int, width: int) -> tuple[int, int]:
        """The size `center_crop` resizes a `height x width` image to before cropping: the binding side exactly at
        the target over `crop_fraction` (floored, as timm's `crop_pct`), the other side truncated like HF's
        `get_resize_output_image_size` (rounding makes it one pixel larger on odd ratios: 500x333 at 336 gives
        504, not 505, and shifts every pixel of the crop)."""
        h, w = (math.floor(s / self.crop_fraction) for s in self.size)
        if h * width >= w * height:  # scaling the height to h covers w
            return h, h * width // height
        return w * height // width, w

    def _pad_to_aspect(self, image: Image.Image) -> Image.Image:
        """Centre `image` on a canvas of the target aspect ratio filled with the mean colour."""
        h, w = self.size
        iw, ih = image.size
        if iw * h == ih * w:
            return image
        cw, ch = (round(ih * w / h), ih) if iw * h < ih * w else (iw, round(iw * h / w))
        canvas = Image.new("RGB", (cw, ch), tuple(int(m * 255) for m in self.mean))
        canvas.paste(image, ((cw - iw) // 2, (ch - ih) // 2))
        return canvas

    def describe(self) -> dict[str, Any]:
        """Everything that determines the output (part of an encoder's fingerprint)."""
        out = {"size": list(self.size), "resize": self.resize, "interpolation": self.interpolation,
               "mean": list(self.mean), "std": list(self.std)}
        if self.resize == "center_crop":  # also marks the HF-exact geometry: caches of the rounded one are stale
            out["crop_fraction"] = self.crop_fraction
        return out

    def __repr__(self) -> str:
        return f"ImageTransform({self.describe()})"

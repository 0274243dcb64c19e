"""Image transforms: PIL image → normalised `[3, H, W]` float tensor.

Three ways to reach the encoder's resolution:
- `resize`: stretch to `H x W` (SigLIP's processor; the aspect ratio is not kept).
- `center_crop`: scale the short side to fit, then crop the centre (CLIP's and DINOv2's processors).
- `letterbox`: pad the image to the target aspect ratio with the mean colour, then resize (LLaVA-1.5's
  `image_aspect_ratio: pad`, whose `expand2square` pads with `tuple(int(m * 255) for m in mean)`).
"""
from __future__ import annotations

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
                 std: Sequence[float] = (0.5, 0.5, 0.5), interpolation: str = "bicubic") -> None:
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
        self.resize, self.interpolation = resize, interpolation
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
            scale = max(h / image.height, w / image.width)
            new = (max(h, round(image.height * scale)), max(w, round(image.width * scale)))
            image = TF.center_crop(TF.resize(image, list(new), interpolation=mode), [h, w])
        else:
            image = TF.resize(image, [h, w], interpolation=mode)
        x = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        return TF.normalize(x, list(self.mean), list(self.std))

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
        return {"size": list(self.size), "resize": self.resize, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}

    def __repr__(self) -> str:
        return f"ImageTransform({self.describe()})"

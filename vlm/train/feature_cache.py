"""Content-addressed cache of frozen-encoder features:
`<root>/<encoder fingerprint>-<dtype>/<ab>/<image sha256>.safetensors`.

The fingerprint covers the encoder's weights source, architecture, transform and token selection, the dtype is
the stage's compute dtype (features are stored in it: half the bytes of fp32 under bf16, and the connector
computes in it anyway), the image key is the hash of the image file's bytes, so entries are valid across epochs,
stages and runs. Only used while the vision module is frozen, and by the training loop only where an entry is read
again (`vlm.train.steps`): at LLaVA scale fp32 CLIP-L/336 features take 2.36 MB an image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file

from vlm.io import atomic_save_safetensors


def default_root() -> Path:
    return Path(os.environ.get("VLM_FEATURE_CACHE", "~/.cache/vlm-ablate/features")).expanduser()


class FeatureCache:
    def __init__(self, root: str | os.PathLike, fingerprint: str, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.dir = Path(root).expanduser() / f"{fingerprint}-{str(dtype).removeprefix('torch.')}"
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get_or_compute(self, keys: Sequence[str], images: Sequence[Any],
                       compute: Callable[[list[Any]], torch.Tensor]) -> torch.Tensor:
        """Features `[len(keys), N, D]` in the cache's dtype, in order; `compute(images)` runs once for the misses."""
        found: dict[int, torch.Tensor] = {}
        for i, k in enumerate(keys):
            p = self._path(k)
            if p.is_file():
                found[i] = load_file(str(p))["features"]
        missing = [i for i in range(len(keys)) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                feats = compute([images[i] for i in missing]).detach().to(self.dtype)
            for j, i in enumerate(missing):
                found[i] = feats[j].cpu()
                atomic_save_safetensors(self._path(keys[i]), {"features": feats[j].contiguous()})
        return torch.stack([found[i] for i in range(len(keys))])

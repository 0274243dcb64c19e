"""Config parsing shared by the encoder families: keys, paths, dtypes, layer/token selection, digests.

Every check raises `UserError` naming the encoder family and the offending key, so a bad
recipe fails at build time with a message instead of deep inside a forward pass.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from encoders.base import SELECT_TOKENS
from vlm import config
from vlm.config import DTYPES
from vlm.errors import UserError
from vlm.world.zoo.catalogue import maybe_resolve

COMMON_KEYS = frozenset({
    "type", "path", "config", "image_size", "resize", "interpolation", "mean", "std",
    "select_layer", "select_tokens", "has_cls", "num_register_tokens", "dtype",
})


def check_keys(cfg: Mapping[str, Any], allowed: Iterable[str], family: str) -> None:
    """Reject unknown keys (a typo would otherwise be ignored silently), through `vlm.config.check_keys`."""
    try:
        config.check_keys(cfg, sorted(allowed), "")
    except UserError as e:
        raise UserError(f"encoder '{family}': {e}") from None


def resolve_path(path: Any, family: str) -> str | None:
    """`None`, a hub id, a local dir, or `zoo:<name>` (resolved by the offline zoo to a local dir)."""
    if path is None:
        return None
    if not isinstance(path, (str, Path)):
        raise UserError(f"encoder '{family}': 'path' must be a string (hub id, local dir or zoo:<name>), got {path!r}.")
    return str(maybe_resolve(str(path)))


def torch_dtype(name: Any, family: str) -> torch.dtype | None:
    """`dtype` key → torch dtype (`None` keeps the checkpoint's / float32)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"encoder '{family}': dtype {name!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def as_hw(size: Any, family: str, key: str = "image_size") -> tuple[int, int]:
    """An int or a `[height, width]` pair → `(height, width)`."""
    if isinstance(size, bool):
        size = None
    if isinstance(size, int):
        size = (size, size)
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2 \
            and all(type(s) is int and s > 0 for s in size):
        return int(size[0]), int(size[1])
    raise UserError(f"encoder '{family}': {key} must be a positive int or [height, width], got {size!r}.")


def check_select_tokens(cfg: Mapping[str, Any], has_cls: bool, family: str) -> str:
    """`select_tokens` (default `patch`), checked against the presence of a CLS token."""
    mode = cfg.get("select_tokens", "patch")
    if mode not in SELECT_TOKENS:
        raise UserError(f"encoder '{family}': select_tokens {mode!r} is not one of {', '.join(SELECT_TOKENS)}.")
    if mode != "patch" and not has_cls:
        raise UserError(
            f"encoder '{family}': select_tokens={mode!r} needs a CLS token, but this model has none "
            f"(e.g. SigLIP pools with an attention head instead). Use select_tokens: patch."
        )
    return mode


def check_select_layer(cfg: Mapping[str, Any], num_layers: int, family: str, allow_zero: bool = True) -> int:
    """`select_layer` (default -2) as an index into the `num_layers + 1` HF hidden states (0 = embeddings)."""
    k = cfg.get("select_layer", -2)
    lo = -(num_layers + 1) if allow_zero else -num_layers
    lo_ok = 0 if allow_zero else 1
    if isinstance(k, bool) or not isinstance(k, int) or not (lo <= k <= num_layers) or (0 <= k < lo_ok):
        valid = f"{lo}..-1 or {lo_ok}..{num_layers}"
        raise UserError(
            f"encoder '{family}': select_layer {k!r} is out of range for a model with {num_layers} layers; "
            f"valid: {valid} (HF hidden_states indexing: 0 = embeddings, -1 = last layer, -2 = penultimate)."
        )
    return k


def check_declared(cfg: Mapping[str, Any], key: str, actual: Any, family: str, why: str) -> Any:
    """A user-declared `has_cls` / `num_register_tokens` must agree with the model; returns the actual value."""
    if key in cfg and cfg[key] is not None and cfg[key] != actual:
        raise UserError(f"encoder '{family}': {key}={cfg[key]!r} contradicts the model, which has {key}={actual!r} "
                        f"({why}). Remove the key or fix it.")
    return actual


def weights_digest(module: nn.Module) -> str:
    """sha256 over parameter/buffer names, dtypes, shapes and bytes (exact identity of the weights)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class DigestCache:
    """Memoises `weights_digest`, recomputed when any tensor was modified in place (torch `_version`)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._digest = ""

    def get(self, module: nn.Module) -> str:
        key = tuple((id(t), t._version) for t in module.state_dict(keep_vars=True).values())
        if key != self._key:
            self._digest, self._key = weights_digest(module), key
        return self._digest

"""A tiny name → builder registry, one per kind of swappable part."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Mapping, TypeVar

from vlm.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a short name (the `type` key of a config dict) to a builder."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, *names: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(builder: Callable[..., T]) -> Callable[..., T]:
            for name in names:
                if name in self._builders:
                    raise ValueError(f"{self.kind} {name!r} registered twice")
                self._builders[name] = builder
            return builder

        return deco

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._builders:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown {self.kind} type {name!r}.{hint} Known: {', '.join(self.names())}.")
        return self._builders[name]

    def build(self, cfg: Mapping[str, Any], **kwargs: Any) -> T:
        if "type" not in cfg:
            raise UserError(f"{self.kind} config {dict(cfg)!r} has no 'type' key; one of: {', '.join(self.names())}.")
        return self.get(cfg["type"])(dict(cfg), **kwargs)

"""A tiny name → builder registry, one per kind of swappable part.

A registry may name the package whose modules register its builders (`plugins=`): every module of that package
is imported the first time a name is looked up, so a new encoder, connector or eval task is one new file.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Generic, Mapping, TypeVar

from vlm.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a short name (the `type` key of a config dict) to a builder."""

    def __init__(self, kind: str, plugins: str | None = None, skip: tuple[str, ...] = ()) -> None:
        """`plugins`: the package whose modules register builders; modules whose names start with one of `skip`
        (a tuple of prefixes) are not imported."""
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}
        self._plugins, self._skip, self._loaded = plugins, skip, plugins is None

    def _load_plugins(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # before importing: a plugin module may look names up while it loads
        package = importlib.import_module(self._plugins)
        for mod in pkgutil.iter_modules(package.__path__):
            if not mod.name.startswith(("__", *self._skip)):
                importlib.import_module(f"{self._plugins}.{mod.name}")

    def register(self, *names: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(builder: Callable[..., T]) -> Callable[..., T]:
            for name in names:
                if name in self._builders:
                    raise ValueError(f"{self.kind} {name!r} registered twice")
                self._builders[name] = builder
            return builder

        return deco

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._builders)

    def get(self, name: str) -> Callable[..., T]:
        self._load_plugins()
        if name not in self._builders:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown {self.kind} type {name!r}.{hint} Known: {', '.join(self.names())}.")
        return self._builders[name]

    def build(self, cfg: Mapping[str, Any], **kwargs: Any) -> T:
        if "type" not in cfg:
            raise UserError(f"{self.kind} config {dict(cfg)!r} has no 'type' key; one of: {', '.join(self.names())}.")
        return self.get(cfg["type"])(dict(cfg), **kwargs)

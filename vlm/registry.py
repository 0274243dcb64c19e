"""A tiny name → builder registry, one per kind of swappable part.

A builder either takes its options as keyword parameters, whose signature is then the config's schema (checked by
`vlm.config.check` before the call), or the whole config dict as `cfg`: then its `config_schema()` (name -> type
hint), when it has one, is checked the same way (eval tasks); encoder families check their keys themselves.
A registry may name the package whose modules register its builders (`plugins=`): every module of that package
is imported the first time a name is looked up, so a new encoder, connector or eval task is one new file.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

from vlm.config import check
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

    def _builder(self, cfg: Mapping[str, Any], where: str) -> Callable[..., T]:
        if not isinstance(cfg, Mapping):
            raise UserError(f"{where} must be a mapping with a 'type' key (one of: {', '.join(self.names())}), "
                            f"got {cfg!r}.")
        if "type" not in cfg:
            raise UserError(f"{where} has no 'type' key; one of: {', '.join(self.names())}.")
        try:
            return self.get(cfg["type"])
        except UserError as e:
            raise UserError(f"{where}.type: {e}") from None

    def check(self, cfg: Mapping[str, Any], where: str, context: Iterable[str] = ()) -> dict[str, Any]:
        """The options of `cfg` checked against its builder's keyword parameters (`vlm.config.check`); `context`
        names the parameters the caller passes itself. A builder that takes the whole dict (`cfg`) is checked
        against its `config_schema()` when it has one, else it checks the dict itself when built."""
        builder = self._builder(cfg, where)
        if hasattr(builder, "config_schema"):
            return check(cfg, builder.config_schema(), where)
        if _takes_dict(builder):
            return dict(cfg)
        options = {k: v for k, v in cfg.items() if k != "type"}
        return check(options, builder, where, skip={*context, "where"})

    def build(self, cfg: Mapping[str, Any], where: str | None = None, **context: Any) -> T:
        """Build from `cfg`: a builder with keyword options gets them checked (`check`), plus `context` and, when it
        asks for it, `where` (the config's path, for nested configs); a builder taking `cfg` gets the dict.
        With `where`, a `UserError` the builder raises is prefixed with it (the recipe path of the config)."""
        path = where or self.kind
        builder = self._builder(cfg, path)
        if _takes_dict(builder):
            self.check(cfg, path, context)
            args, kwargs = (dict(cfg),), context
        else:
            kwargs = {**self.check(cfg, path, context), **context}
            if "where" in inspect.signature(builder).parameters:
                kwargs["where"] = path
            args = ()
        try:
            return builder(*args, **kwargs)
        except UserError as e:
            if where is None or str(e).startswith(where):
                raise
            raise UserError(f"{where}: {e}") from None


def _takes_dict(builder: Callable[..., Any]) -> bool:
    params = list(inspect.signature(builder).parameters.values())
    return bool(params) and params[0].name == "cfg" and params[0].kind is not inspect.Parameter.KEYWORD_ONLY

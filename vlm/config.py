"""The one way user configuration is checked: against the signature of the builder that consumes it.

A builder's keyword parameters (or a dataclass's fields) are the keys a config may hold; their type hints are the
types it must have (`Optional`, `Literal`, `list`, `dict`, nested dataclasses, and `Annotated[..., Range(...)]` or
`Annotated[..., Check(...)]` for ranges and named values); their defaults are filled in; a parameter without a
default is required. Every error is a `UserError` naming the key's full recipe path (`model.connector.dpeth`),
suggesting the nearest valid key for a misspelt one, and listing the valid keys.

    def build(*, vision_dim: int, depth: Annotated[int, Range(ge=1)] = 2) -> nn.Module: ...
    check({"dpeth": 3}, build, "model.connector", skip={"vision_dim"})   # UserError: ... model.connector.dpeth ...

Used by the recipe schema (`vlm.recipe.schema`), encoders, connectors and the LLM (through their registries and
builders), datasets, eval tasks and grid files.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable, Literal, Mapping, Sequence

import torch

from vlm.errors import UserError

MISSING = inspect.Parameter.empty

# dtype names a config may use -> torch dtypes (the one table: LLM, encoders and training precision)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DtypeName = Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]


@dataclass(frozen=True)
class Range:
    """A numeric bound for `Annotated[int | float, Range(...)]`; `None` = unbounded."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __call__(self, value: Any) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        parts = [f"{op} {b:g}" for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if b is not None]
        return " and ".join(parts)


@dataclass(frozen=True)
class Check:
    """A named predicate for `Annotated[T, Check(pred, "what it must be", choices)]`; `choices()` feeds the hint."""

    pred: Callable[[Any], bool]
    expected: str
    choices: Callable[[], Iterable[str]] | None = None


Positive = Annotated[int, Range(ge=1)]
NonNegative = Annotated[float, Range(ge=0)]


def torch_dtype(name: str, where: str) -> torch.dtype:
    """A dtype name of a config → the torch dtype."""
    if name not in DTYPES:
        raise UserError(f"{where} = {name!r} is not a dtype; one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def _hint(value: Any, options: Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        return _type_name(typing.get_args(tp)[0])
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against the type hint `tp` (and its `Range` / `Check` annotations); ints become floats where
    a float is wanted, and a YAML string such as `1e-3` a float. Raises `UserError` naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        value = check_value(value, args[0], where)
        for meta in args[1:]:
            if value is None:
                break
            if isinstance(meta, Range) and not meta(value):
                raise UserError(f"{where} = {value!r} is out of range: it must be {meta.describe()}.")
            if isinstance(meta, Check) and not meta.pred(value):
                hint = _hint(value, meta.choices()) if meta.choices else ""
                known = f" Known: {', '.join(sorted(meta.choices()))}." if meta.choices else ""
                raise UserError(f"{where} = {value!r} is not {meta.expected}.{hint}{known}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return check_value(value, inner[0], where)
        errors = []
        for a in inner:
            try:
                return check_value(value, a, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(f"{where} = {value!r} is none of {', '.join(_type_name(a) for a in inner)}: {errors[0]}")
    if value is None:
        raise UserError(f"{where} must not be null (expected {_type_name(tp)}).")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where} = {value!r} is not one of {', '.join(map(repr, args))}.{_hint(value, args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise UserError(f"{where} must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, "
                            f"got {value!r}.")
        return check(value, tp, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise UserError(f"{where} must be a list, got {type(value).__name__} {value!r}.")
        item = args[0] if args else Any
        return [check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{where} must be a mapping, got {type(value).__name__} {value!r}.")
        item = args[1] if args else Any
        return {str(k): check_value(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise UserError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}.")
    return value


def fields(schema: Any, skip: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """The keys a config for `schema` may hold: name -> (type hint, default or MISSING).

    `schema`: a dataclass (its fields), a callable (its keyword parameters; `skip` names those the caller passes
    itself, e.g. dimensions), or a mapping name -> type hint (every key optional)."""
    skip = set(skip)
    if isinstance(schema, Mapping):
        return {k: (tp, None) for k, tp in schema.items() if k not in skip}
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema, include_extras=True)
        out = {}
        for f in dataclasses.fields(schema):
            if f.name in skip:
                continue
            default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else MISSING if f.default is dataclasses.MISSING else f.default)
            out[f.name] = (hints[f.name], default)
        return out
    hints = typing.get_type_hints(schema, include_extras=True)
    out = {}
    for name, p in inspect.signature(schema).parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.kind is p.POSITIONAL_ONLY:
            continue
        out[name] = (hints.get(name, Any), p.default)
    return out


def check_keys(cfg: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Refuse a key that is not in `allowed`, naming its path and the nearest valid key."""
    allowed = list(allowed)
    prefix = f"{where}." if where else ""
    for key in cfg:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise UserError(f"unknown key {prefix}{key}.{hint} Valid keys here: {', '.join(allowed) or 'none'}.")


def check(cfg: Mapping[str, Any], schema: Any, where: str, *, skip: Iterable[str] = (),
          extra: Iterable[str] = ()) -> dict[str, Any]:
    """`cfg` checked against `schema` (see `fields`): unknown keys refused, types and ranges checked, defaults filled
    in (except for a mapping schema), required keys demanded. `extra`: keys allowed but not checked (e.g. `type`)."""
    spec = fields(schema, skip)
    extra = list(extra)
    check_keys(cfg, [*extra, *spec], where)
    prefix = f"{where}." if where else ""
    out = {k: cfg[k] for k in extra if k in cfg}
    for name, (tp, default) in spec.items():
        sub = prefix + name
        if name in cfg:
            value = cfg[name]
        elif default is MISSING or default == "???":
            raise UserError(f"{sub} is required.")
        elif isinstance(schema, Mapping):
            continue
        else:
            value = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        if value == "???":
            raise UserError(f"{sub} is required.")
        out[name] = check_value(value, tp, sub)
    return out

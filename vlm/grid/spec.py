"""Grid files: a base recipe plus axes over recipe keys, expanded into named points.

```yaml
name: my-grid
base: ../smoke.yaml               # the recipe every point starts from (relative to this file), or a list of
                                  # recipe files merged in order (like a recipe's `defaults:`)
set: {run.seed: 0}                # overrides applied to every point (dotted recipe keys)
axes:                             # order here = order in run ids
  enc:                            # axis name, used in run ids: enc=<label>
    key: model.encoder            # the recipe key this axis sets
    values: {clip: {...}, dinov2: {...}}   # label -> value (named presets) ...
  lr:
    key: stages.1.optim.lr
    values: [1.0e-4, 2.0e-4]      # ... or a list of literals (label = the value)
  pt:                             # no `key`: each value is a mapping of dotted keys -> values
    values:
      llava558k: {stages.0.data: ...}
zip: [[llm, tmpl]]                # axes in one group advance together; groups and other axes are crossed
exclude: [{enc: clip, lr: 2.0e-4}]    # drop points matching every listed axis label
points: [{match: {enc: dinov2}, set: {stages.1.batch_size: 8}}]  # per-point overrides
slurm: {partition: gpu, timeout_min: 1440}   # submitit parameters of the training jobs (--executor slurm)
slurm_eval: {timeout_min: 120, gpus_per_node: 1}  # evaluate in jobs of their own, one per eval task
workers: 2                        # local executor: points run at the same time (`vlm grid --workers` overrides it)
```
"""
from __future__ import annotations

import hashlib
import json
import itertools
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from vlm.config import Positive, check
from vlm.errors import UserError
from vlm.grid.survey import parse_survey
from vlm.io import atomic_write_text

# the keys of a grid file and of one axis, checked with `vlm.config.check` (see the module docstring)
GRID_KEYS: dict[str, Any] = {
    "name": Optional[str], "base": Optional[Union[str, list[str]]], "set": Optional[dict[str, Any]], "axes": dict[str, Any],
    "survey": Optional[dict[str, Any]],  # a survey grid: models evaluated, nothing trained (vlm.grid.survey)
    "zip": Optional[list[list[str]]], "exclude": Optional[list[dict[str, Any]]], "points": Optional[list[dict[str, Any]]],
    "slurm": Optional[dict[str, Any]],
    "slurm_eval": Optional[dict[str, Any]],  # evaluation in jobs of its own, one per eval task (vlm.grid.slurm)
    "workers": Optional[Positive],  # `vlm grid` (local executor): points at a time unless --workers is given
}
AXIS_KEYS: dict[str, Any] = {"key": Optional[str], "values": Union[list[Any], dict[str, Any]]}
_LABEL_OK = re.compile(r"[^A-Za-z0-9._+\-]+")


@dataclass(frozen=True)
class Point:
    """One grid point: its run id, axis labels (in axis order) and recipe overrides (dotted key -> value)."""

    id: str
    labels: dict[str, str]
    overrides: dict[str, Any]


@dataclass
class Grid:
    path: Path
    name: str
    base: Path | None  # one recipe file (a list of bases is composed into one, see `compose_base`); None: a survey
    axes: dict[str, dict[str, Any]]  # axis -> {"key": str|None, "values": {label: value}}
    groups: list[list[str]]  # crossed factors; each a list of zipped axes
    common: dict[str, Any] = field(default_factory=dict)
    exclude: list[dict[str, str]] = field(default_factory=list)
    point_overrides: list[dict[str, Any]] = field(default_factory=list)
    slurm: dict[str, Any] = field(default_factory=dict)
    slurm_eval: dict[str, Any] = field(default_factory=dict)  # empty: eval runs in the training job
    workers: int = 1  # the grid file's `workers:`, the local executor's default
    raw: dict[str, Any] = field(default_factory=dict)
    survey: dict[str, Any] | None = None  # a survey grid's `survey:` section (vlm.grid.survey)

    def points(self) -> list[Point]:
        return expand(self)


def label_of(value: Any) -> str:
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return _LABEL_OK.sub("_", text).strip("_") or "_"


def _err(path: Path, where: str, what: str) -> UserError:
    return UserError(f"grid {path}: {where}: {what}")


def _mapping(obj: Any, path: Path, where: str) -> dict:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise _err(path, where, f"expected a mapping, got {type(obj).__name__} {obj!r}")
    return obj


def _parse_axis(name: str, spec: Any, path: Path) -> dict[str, Any]:
    where = f"axes.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_.+\-]+", str(name)):
        raise _err(path, where, "axis names may only use letters, digits and . _ + - (they appear in run ids)")
    spec = _mapping(spec, path, where)
    try:
        check(spec, AXIS_KEYS, where)
    except UserError as e:
        raise UserError(f"grid {path}: {e}") from None
    key, values = spec.get("key"), spec.get("values")
    if isinstance(values, list):
        labelled = {label_of(v): v for v in values}
        if len(labelled) != len(values):
            raise _err(path, where, f"values {values} give duplicate labels; use a mapping label: value")
    elif isinstance(values, dict):
        labelled = {label_of(k): v for k, v in values.items()}
        if [label_of(k) for k in values] != [str(k) for k in values]:
            bad = [k for k in values if label_of(k) != str(k)]
            raise _err(path, where, f"labels {bad} must use only letters, digits and . _ + -")
    else:
        raise _err(path, where, "`values` must be a list of literals or a mapping label -> value")
    if not labelled:
        raise _err(path, where, "`values` is empty")
    if key is None:
        for label, v in labelled.items():
            if not isinstance(v, dict) or not v:
                raise _err(path, f"{where}.values.{label}", "an axis without `key` needs each value to be a mapping of dotted recipe keys -> values")
    elif not isinstance(key, str) or not key:
        raise _err(path, where, "`key` must be a dotted recipe key such as model.encoder")
    return {"key": key, "values": labelled}


def load_grid(path: str | Path) -> Grid:
    """Parse and check a grid file (not the recipes: see `vlm.grid.points.resolve_point`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid file {path} does not exist; pass the path of a grid YAML such as recipes/grids/smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"grid {path} is not valid YAML: {e}") from None
    raw = _mapping(raw, path, "top level")
    survey = parse_survey(raw, path) if "survey" in raw else None
    if survey is None and "base" not in raw:
        raise _err(path, "top level", "missing `base`: the recipe every point starts from")
    try:
        check(raw, GRID_KEYS, "")
    except UserError as e:
        raise UserError(f"grid {path}: {e}") from None
    base = None
    if survey is None:
        bases = raw["base"] if isinstance(raw["base"], list) else [raw["base"]]
        files = [(path.parent / str(b)).resolve() for b in bases]
        for f in files:
            if not f.is_file():
                raise _err(path, "base", f"recipe {f} does not exist (paths are relative to the grid file)")
        base = files[0] if len(files) == 1 else compose_base(files, Path(tempfile.gettempdir()))
    raw_axes = _mapping(raw.get("axes"), path, "axes")
    if survey is not None:  # the survey's one axis sets the model spec
        raw_axes = {"model": {"key": "model", **_mapping(raw_axes["model"], path, "axes.model")}}
    axes = {str(k): _parse_axis(str(k), v, path) for k, v in raw_axes.items()}
    if not axes:
        raise _err(path, "axes", "a grid needs at least one axis")
    groups = _groups(raw.get("zip") or [], axes, path)
    exclude = []
    for i, ex in enumerate(raw.get("exclude") or []):
        exclude.append(_check_match(ex, axes, path, f"exclude[{i}]"))
    point_overrides = []
    for i, po in enumerate(raw.get("points") or []):
        po = _mapping(po, path, f"points[{i}]")
        if set(po) - {"match", "set"} or "set" not in po:
            raise _err(path, f"points[{i}]", "each entry needs `match` (axis: label, ...) and `set` (dotted key: value, ...)")
        point_overrides.append({"match": _check_match(po.get("match") or {}, axes, path, f"points[{i}].match"),
                                "set": _mapping(po["set"], path, f"points[{i}].set")})
    return Grid(path=path, name=str(raw.get("name") or path.stem), base=base, axes=axes, groups=groups,
                common=_mapping(raw.get("set"), path, "set"), exclude=exclude, point_overrides=point_overrides,
                slurm=_mapping(raw.get("slurm"), path, "slurm"),
                slurm_eval=_mapping(raw.get("slurm_eval"), path, "slurm_eval"), workers=int(raw.get("workers") or 1), raw=raw,
                survey=survey)


def compose_base(files: list[Path], folder: Path) -> Path:
    """A list of base recipes becomes one recipe whose `defaults:` are those files, merged in order."""
    text = "defaults:\n" + "".join(f"  - {json.dumps(str(f))}\n" for f in files)
    out = Path(folder) / f"grid-base-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    if not out.exists():
        atomic_write_text(out, text)
    return out


def _groups(zips: Any, axes: dict, path: Path) -> list[list[str]]:
    if not isinstance(zips, list) or not all(isinstance(z, list) and len(z) >= 2 for z in zips):
        raise _err(path, "zip", "expected a list of lists of at least two axis names, e.g. [[llm, template]]")
    seen: set[str] = set()
    for z in zips:
        for a in z:
            if a not in axes:
                raise _err(path, "zip", f"unknown axis {a!r}; axes are {list(axes)}")
            if a in seen:
                raise _err(path, "zip", f"axis {a!r} appears in more than one zip group")
            seen.add(a)
        lengths = {a: len(axes[a]["values"]) for a in z}
        if len(set(lengths.values())) != 1:
            raise _err(path, "zip", f"zipped axes must have the same number of values, got {lengths}")
    by_axis = {a: z for z in zips for a in z}
    groups, done = [], set()
    for a in axes:  # keep axis order; a zip group sits where its first axis is
        if a in done:
            continue
        g = [x for x in axes if x in by_axis[a]] if a in by_axis else [a]
        done.update(g)
        groups.append(g)
    return groups


def _check_match(match: Any, axes: dict, path: Path, where: str) -> dict[str, str]:
    match = _mapping(match, path, where)
    out = {}
    for a, label in match.items():
        if a not in axes:
            raise _err(path, where, f"unknown axis {a!r}; axes are {list(axes)}")
        labels = list(axes[a]["values"])
        if label_of(label) not in labels:
            raise _err(path, where, f"axis {a!r} has no value {label!r}; its labels are {labels}")
        out[a] = label_of(label)
    return out


def _matches(labels: dict[str, str], match: dict[str, str]) -> bool:
    return all(labels[a] == v for a, v in match.items())


def point_id(labels: dict[str, str]) -> str:
    return ",".join(f"{a}={v}" for a, v in labels.items())


def expand(grid: Grid) -> list[Point]:
    """All points, in a deterministic order: the product over groups, zipped axes advancing together."""
    per_group = []
    for g in grid.groups:
        n = len(grid.axes[g[0]]["values"])
        per_group.append([{a: list(grid.axes[a]["values"])[i] for a in g} for i in range(n)])
    points = []
    for combo in itertools.product(*per_group):
        chosen = {k: v for part in combo for k, v in part.items()}
        labels = {a: chosen[a] for a in grid.axes}
        if any(_matches(labels, ex) for ex in grid.exclude):
            continue
        overrides = dict(grid.common)
        for a, label in labels.items():
            value = grid.axes[a]["values"][label]
            key = grid.axes[a]["key"]
            overrides.update({key: value} if key else value)
        for po in grid.point_overrides:
            if _matches(labels, po["match"]):
                overrides.update(po["set"])
        points.append(Point(id=point_id(labels), labels=labels, overrides=overrides))
    if not points:
        raise _err(grid.path, "exclude", "every point is excluded; the grid is empty")
    return points

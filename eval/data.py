"""Reading benchmark data: HF datasets (hub id or a `save_to_disk` folder) and local files, with
images kept as lazy references until a batch needs them."""
from __future__ import annotations

import base64
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vlm.errors import UserError


@dataclass(frozen=True)
class HFImage:
    """A lazy image in an HF dataset column (decoded only when opened)."""

    ds: Any
    index: int
    column: str


@dataclass(frozen=True)
class B64Image:
    data: str


def open_image(ref: Any, root: str | Path | None = None):
    """PIL image (RGB) from a reference: PIL image, path (relative to `root`), HFImage, B64Image,
    an HF `{bytes, path}` dict, a list of those, or None."""
    from PIL import Image

    if ref is None:
        return None
    if isinstance(ref, (list, tuple)):
        return [open_image(r, root) for r in ref]
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, HFImage):
        return open_image(ref.ds[ref.index][ref.column], root)
    if isinstance(ref, B64Image):
        return Image.open(io.BytesIO(base64.b64decode(ref.data))).convert("RGB")
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return Image.open(io.BytesIO(ref["bytes"])).convert("RGB")
        return open_image(ref.get("path"), root)
    path = Path(ref)
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if not path.exists():
        raise UserError(f"image {path} does not exist; check the task's image root / data files.")
    with Image.open(path) as im:
        return im.convert("RGB")


PARQUET_REVISION = "refs/convert/parquet"


def _script_help(source: str, config: str | None) -> str:
    sub = f"{config or 'default'}/" if config else "default/"
    return (f"HF dataset {source!r} is a loading-script dataset, which the installed `datasets` no longer runs. "
            f"Use the hub's parquet conversion instead: download it with `huggingface-cli download {source} "
            f"--repo-type dataset --revision {PARQUET_REVISION} --local-dir DIR` (or `snapshot_download(..., "
            f"revision='{PARQUET_REVISION}')`) and set the task's `hf: DIR` (its files are DIR/{sub}<split>/*.parquet); "
            "online, `hf: <id>` reads that revision directly when the script fails.")


def _parquet_snapshot(path: Path, split: str | None, config: str | None):
    """A local copy of a repo's parquet conversion: <config>/<split>/*.parquet (or <config>/*-<split>.parquet,
    <config>/partial-<split>/*.parquet); `config` defaults to the only one (or `default`)."""
    import datasets

    configs = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.rglob("*.parquet")))
    if not configs:
        return None
    cfg = config or ("default" if "default" in configs else configs[0] if len(configs) == 1 else None)
    if cfg not in configs:
        raise UserError(f"parquet snapshot {path} has configs {configs}; set the task's `config` to one of them.")
    files: dict[str, list[str]] = {}
    for f in sorted((path / cfg).rglob("*.parquet")):
        rel = f.relative_to(path / cfg).parts
        name = rel[0] if len(rel) > 1 else f.stem.rsplit("-", 1)[-1]
        name = name[len("partial-"):] if name.startswith("partial-") else name
        files.setdefault(name, []).append(str(f))
    if split not in files:
        raise UserError(f"parquet snapshot {path / cfg} has splits {sorted(files)}, not {split!r}; set `split`.")
    return datasets.load_dataset("parquet", data_files={split: files[split]}, split=split)


def find_image(name: str, roots: Sequence[str | Path]) -> Path:
    """The path of image `name` in the first of `roots` that holds it (a benchmark piece may draw on
    several source folders, e.g. COCO train2014 and val2014)."""
    for root in roots:
        path = Path(root) / name
        if path.exists():
            return path.resolve()
    raise UserError(f"image {name!r} is in none of the image folders {[str(r) for r in roots]}; check the "
                    "task's image_root(s).")


def load_hf(source: str, split: str | None, config: str | None = None):
    """An HF dataset split from a hub id, a local `save_to_disk` folder, or a local parquet snapshot.

    Repos that only hold a loading script (Winoground, Stanford Cars, FGVC-Aircraft) are read from their
    parquet conversion (`refs/convert/parquet`): online from the hub, offline from a downloaded copy of it.
    """
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"saved dataset {path} has splits {list(ds)}, not {split!r}; set `split`.")
            ds = ds[split]
        return ds
    if path.is_dir() and not any(path.glob("*.py")):
        ds = _parquet_snapshot(path, split, config)
        if ds is not None:
            return ds
    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:  # noqa: BLE001 - the hub/network error is reported to the user as-is
        if "scripts are no longer supported" not in str(e):
            raise UserError(f"could not load HF dataset {source!r} (config {config!r}, split {split!r}): {e}") from e
        if path.is_dir():
            raise UserError(f"{source} holds a loading script. " + _script_help(path.name, config)) from None
    try:
        return datasets.load_dataset(source, config, split=split, revision=PARQUET_REVISION)
    except Exception as e:  # noqa: BLE001 - offline or no conversion: say exactly what to do
        raise UserError(f"{_script_help(source, config)} (reading {PARQUET_REVISION} failed: "
                        f"{type(e).__name__}: {e})") from None


def _null_mask(ds, column: str, batch_size: int = 4096) -> list[bool]:
    """Which cells of `column` are empty, read from the Arrow data without decoding any image."""
    mask: list[bool] = []
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=batch_size):
        mask.extend(batch.column(column).is_null().to_pylist())
    return mask


def hf_rows(ds, image_columns: Sequence[str]) -> list[dict]:
    """Rows of an HF dataset as dicts, image columns replaced by lazy `HFImage` references; an empty
    image cell stays None (so "has an image" filters work on hub data)."""
    import datasets

    missing = [c for c in image_columns if c not in ds.column_names]
    if missing:
        raise UserError(f"HF dataset has no column(s) {missing}; its columns are {ds.column_names}.")
    meta = ds.remove_columns(list(image_columns)) if image_columns else ds
    lazy = ds.select_columns(list(image_columns))
    for c in image_columns:
        if isinstance(lazy.features[c], datasets.Image):
            lazy = lazy.cast_column(c, datasets.Image(decode=False))
    empty = {c: _null_mask(lazy, c) for c in image_columns}
    rows = meta.to_list()
    for i, row in enumerate(rows):
        for c in image_columns:
            row[c] = None if empty[c][i] else HFImage(lazy, i, c)
    return rows


def read_records(path: str | Path) -> list[dict]:
    """A local data file: .jsonl, .json (a list, or a dict of id → record), .csv or .tsv."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return [{"id": k, **v} if isinstance(v, dict) else {"id": k, "value": v} for k, v in data.items()]
        return list(data)
    if suffix in (".csv", ".tsv"):
        csv.field_size_limit(1 << 30)
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise UserError(f"data file {path}: unsupported format {suffix!r}; use .jsonl, .json, .csv or .tsv.")


def rows_from_source(cfg: dict[str, Any], image_columns: Sequence[str], default_split: str) -> tuple[list[dict], Path | None]:
    """Rows of a task's data: `hf` (+ `config`, `split`) or `data_file` (+ `image_root`).

    Returns (rows, image_root) where image_root resolves relative image paths of local files.
    """
    if cfg.get("hf"):
        ds = load_hf(cfg["hf"], cfg.get("split", default_split), cfg.get("config"))
        return hf_rows(ds, [c for c in image_columns if c in ds.column_names]), None
    if cfg.get("data_file"):
        path = Path(cfg["data_file"])
        root = Path(cfg["image_root"]) if cfg.get("image_root") else path.parent
        return read_records(path), root
    raise UserError(f"task {cfg.get('name')!r} needs a data source: `hf: <hub id or saved folder>` or "
                    "`data_file: <local file in the benchmark's format>`.")

"""Training data: sources (LLaVA JSON/JSONL, HF datasets, the synthetic world), mixtures, batching.

A source is a memory-mapped record table (`vlm.data.records`): parsed once into Arrow, then shared by every
rank and DataLoader worker without copies. Samples are tokenised, image-expanded and their images decoded in
the DataLoader workers (`TrainSet.__getitem__`). Broken samples raise a `UserError` naming the row, or with
`data.on_error: skip` are dropped *and counted*. Structural problems (bad JSON, missing image file, `<image>`
count mismatch) are found when a source is read; undecodable images when a sample is loaded. Over-long samples
are cut as LLaVA cuts them (`truncate`: text only, never an image's tokens) and counted, never an error. URL
images are fetched into a local cache before training; dead links are skipped and counted.

Batches are planned per epoch from a seed, so every process (and a resumed run) sees the same global
batches: a global batch = batch_size x world_size x grad_accum samples, sorted by length within
mega-batches when `group_by_length` (dynamic padding then wastes little).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from vlm.data.images import DeadLink, UrlCache, image_bytes, open_image
from vlm.data.records import (IMAGE_TOKEN, INDEX_VERSION, BrokenSample, RecordTable, Row, check_images,
                              data_cache_root, file_sha256, is_url, llava_table, place_images, resolve_image,
                              rows_table, to_messages)
from vlm.errors import UserError
from vlm.model.chat import tokenize_conversation
from vlm.model.vlm import expand_image_tokens
from vlm.world.synth.world import synth_dir

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN", "BrokenSample", "Mixture", "Record", "Source", "TrainSet", "build_mixture",
           "collate", "default_num_workers", "epoch_batches", "image_bytes", "load_source", "micro_batch",
           "open_image", "steps_per_epoch", "total_steps", "truncate"]

IGNORE_INDEX = -100


@dataclass
class Record:
    id: str
    messages: list[dict[str, str]]
    images: list[Any]  # absolute paths, URLs, or hf:<row>:<k> references into the source's HF dataset
    where: str  # "file:line (row i, id x)" or "dataset[split] row i", for error messages
    source: Any = field(default=None, repr=False, compare=False)  # the Source, for image references


@dataclass
class Source:
    """One named dataset: its record table, the usable rows, and the rows it dropped (counted)."""

    name: str
    table: RecordTable
    rows: np.ndarray  # usable row indices into `table`
    skipped: list[str] = field(default_factory=list)  # "where: why" of rows dropped at load (skip / dead link)
    identity: str = ""
    hf_images: Any = None  # the HF dataset's image column, for hf:<row>:<k> references
    urls: UrlCache | None = None

    @property
    def records(self) -> "Records":
        return Records(self)

    def record(self, i: int) -> Record:
        r = self.table.row(self.rows[i])
        return Record(r.id, r.messages, r.images, r.where, self)

    def image_bytes(self, ref: Any) -> bytes:
        return image_bytes(ref, hf_images=self.hf_images, urls=self.urls)


class Records(Sequence):
    """The usable records of a source, decoded on access."""

    def __init__(self, src: Source) -> None:
        self.src = src

    def __len__(self) -> int:
        return len(self.src.rows)

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.src.record(i % len(self))

    def lengths(self, num_image_tokens: int) -> np.ndarray:
        return self.src.table.length_estimate(num_image_tokens)[self.src.rows]


def _broken_error(b: BrokenSample) -> UserError:
    return UserError(f"broken training sample at {b.where}: {b.why}. Fix the data, or set data.on_error=skip to skip "
                     "such samples (they are counted in metrics.jsonl as skipped_samples).")


# --------------------------------------------------------------------------- sources
def _local_file(spec: str, where: str) -> Path:
    if spec.startswith("hf://"):
        parts = spec[len("hf://"):].split("/")
        if len(parts) < 3:
            raise UserError(f"{where}: {spec!r} must look like hf://<org>/<repo>/<file in the dataset repo>.")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), repo_type="dataset"))
        except Exception as e:  # offline, missing repo or file: all user-fixable
            raise UserError(f"{where}: cannot fetch {spec} from the Hugging Face hub ({type(e).__name__}: {e}). "
                            "Download the file and set the path to the local copy.") from None
    p = Path(spec).expanduser()
    if not p.is_file():
        raise UserError(f"{where}: file {p} not found; fix the path.")
    return p


def _hf_rows(ds: Any, ds_cfg: Mapping[str, Any], cols: Mapping[str, str], image_col: str | None,
             root: Path) -> Any:
    """Rows of an HF dataset, image columns read as references only (never their bytes)."""
    import pyarrow as pa

    position = ds_cfg.get("image_position", "front")
    meta_cols = [c for c in ds.column_names if c != image_col]
    counts: np.ndarray | None = None
    embedded = False
    if image_col is not None:
        col = ds.data.column(image_col)
        typ = col.type
        if pa.types.is_list(typ) or pa.types.is_large_list(typ):
            arr = col.combine_chunks()
            counts = np.where(arr.is_null().to_numpy(zero_copy_only=False), 0,
                              np.diff(arr.offsets.to_numpy()))
            embedded = pa.types.is_struct(typ.value_type)
        else:
            counts = (~col.is_null().to_numpy()).astype(np.int64) if hasattr(col, "to_numpy") else None
            counts = np.asarray([0 if v is None else 1 for v in col.to_pylist()]) if counts is None else counts
            embedded = pa.types.is_struct(typ)
        if not embedded:
            meta_cols.append(image_col)
    i = 0
    for batch in ds.select_columns(meta_cols).iter(batch_size=4096):
        n = len(next(iter(batch.values()))) if batch else 0
        for j in range(n):
            row = {c: batch[c][j] for c in batch}
            w = f"{ds_cfg['path']}[{ds_cfg['split']}] row {i}"
            try:
                if embedded:
                    refs = [f"hf:{i}:{k}" for k in range(int(counts[i]))]
                elif image_col is not None:
                    img = row.get(image_col)
                    refs = [] if img is None else list(img) if isinstance(img, list) else [img]
                    refs = [resolve_image(r, root, w) for r in refs]
                else:
                    refs = []
                if row.get(cols["conversations"]) is not None:
                    messages = to_messages(row[cols["conversations"]], w)
                elif row.get(cols["caption"]) is not None:
                    messages = [{"role": "user", "content": ds_cfg["prompt"]},
                                {"role": "assistant", "content": str(row[cols["caption"]])}]
                elif row.get(cols["question"]) is not None and row.get(cols["answer"]) is not None:
                    q = str(row[cols["question"]])
                    q = q if IMAGE_TOKEN in q or not refs else IMAGE_TOKEN + "\n" + q
                    messages = [{"role": "user", "content": q},
                                {"role": "assistant", "content": str(row[cols["answer"]])}]
                else:
                    raise BrokenSample(w, "row has none of the mapped conversations / caption / question+answer columns")
                messages = place_images(messages, position)
                check_images(messages, len(refs), w)
                yield Row(str(row.get(cols["id"], i) if row.get(cols["id"]) is not None else i), messages, refs, w)
            except BrokenSample as b:
                yield b
            i += 1


def _hf_source(name: str, ds_cfg: Mapping[str, Any], where: str, cache_root: Path) -> tuple[RecordTable, Any, str]:
    import datasets

    kw: dict[str, Any] = {"split": ds_cfg["split"]}
    if ds_cfg["name"]:
        kw["name"] = ds_cfg["name"]
    if ds_cfg["data_files"]:
        kw["data_files"] = [str(Path(f).expanduser()) for f in ds_cfg["data_files"]]
    try:
        ds = datasets.load_dataset(ds_cfg["path"], **kw)
    except Exception as e:  # missing hub dataset, bad files, offline: all user-fixable
        raise UserError(f"{where}: datasets.load_dataset({ds_cfg['path']!r}) failed ({type(e).__name__}: {e}). "
                        "Check the hub id / data_files, or point `path` at local files.") from None
    cols = {"image": "image", "conversations": "conversations", "caption": "caption", "question": "question",
            "answer": "answer", "id": "id", **ds_cfg["columns"]}
    for ours, col in ds_cfg["columns"].items():
        if ours not in cols or col not in ds.column_names:
            raise UserError(f"{where}.columns: {ours}: {col} — " + (
                f"{ours!r} is not one of {', '.join(sorted(cols))}" if ours not in cols else
                f"the dataset has no column {col!r}; its columns are {', '.join(ds.column_names)}") + ".")
    image_col = cols["image"] if cols["image"] in ds.column_names else None
    hf_images = None
    if image_col is not None:
        feat = ds.features[image_col]
        inner = getattr(feat, "feature", None)
        if isinstance(feat, datasets.Image):  # encoded bytes stay in the memory-mapped dataset until loaded
            hf_images = ds.select_columns([image_col]).cast_column(image_col, datasets.Image(decode=False))
        elif isinstance(inner, datasets.Image):
            hf_images = ds.select_columns([image_col]).cast_column(image_col, datasets.List(datasets.Image(decode=False)))
    root = Path(ds_cfg["image_root"]).expanduser() if ds_cfg["image_root"] else Path.cwd()
    identity = json.dumps({k: v for k, v in dict(ds_cfg).items()}, sort_keys=True, default=str)
    key = hashlib.sha256(json.dumps([INDEX_VERSION, "hf", ds._fingerprint, identity, str(root.resolve())]).encode()
                         ).hexdigest()[:32]
    table = rows_table(lambda: _hf_rows(ds, ds_cfg, cols, image_col, root), key, cache_root,
                       {"source": f"{ds_cfg['path']}[{ds_cfg['split']}]", "fingerprint": ds._fingerprint})
    return table, hf_images, identity


def _url_rows(table: RecordTable) -> tuple[np.ndarray, list[str]]:
    """(row index, url) of every URL image reference of the table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table._table.column("images").combine_chunks()
    if not len(col):
        return np.zeros(0, np.int64), []
    flat = col.flatten()
    mask = pc.or_(pc.starts_with(flat, "http://"), pc.starts_with(flat, "https://"))
    parents = pc.list_parent_indices(col).to_numpy()
    mask_np = mask.to_numpy(zero_copy_only=False)
    return parents[mask_np], flat.filter(pa.array(mask_np)).to_pylist()


def _prefetch(name: str, table: RecordTable, rows: np.ndarray, urls: UrlCache, skipped: list[str]) -> np.ndarray:
    """Fetch a source's URL images into the cache (once; one rank fetches, the others wait); drop rows with
    dead links, each counted in `skipped`."""
    import sys

    from filelock import FileLock

    if not table.meta.get("urls"):
        return rows
    where, links = _url_rows(table)
    urls.root.mkdir(parents=True, exist_ok=True)
    last = [0.0]

    def progress(k: int, n: int) -> None:
        import time

        if time.time() - last[0] > 10 or k == n:
            last[0] = time.time()
            print(f"datasets.{name}: fetched {k}/{n} images", file=sys.stderr, flush=True)

    with FileLock(str(urls.root / f".prefetch-{table.path.stem}.lock")):
        dead = urls.prefetch(links, progress)
    if not dead:
        return rows
    bad = {}
    for r, u in zip(where.tolist(), links):
        if u in dead and r not in bad:
            bad[r] = u
    keep = np.isin(rows, np.fromiter(bad, np.int64), invert=True)
    for r in rows[~keep].tolist():
        skipped.append(f"{table.row(r).where}: dead image link {bad[r]} ({dead[bad[r]]})")
    return rows[keep]


def load_source(name: str, ds_cfg: Mapping[str, Any], on_error: str, data_cfg: Mapping[str, Any] | None = None) -> Source:
    """Read (or map the cached table of) one dataset. `data_cfg`: the recipe's `data` section (cache dir, URL
    fetching); broken rows raise under `on_error: raise`, else they are listed in `Source.skipped`."""
    data_cfg = data_cfg or {}
    where = f"datasets.{name}"
    cache_root = data_cache_root(data_cfg.get("cache_dir"))
    position = ds_cfg.get("image_position", "front")
    hf_images = None
    if ds_cfg["type"] == "hf":
        table, hf_images, identity = _hf_source(name, ds_cfg, where, cache_root)
    else:
        if ds_cfg["type"] == "synth":
            world = synth_dir(ds_cfg)
            path = world / ds_cfg["file"]
            if not path.is_file():
                raise UserError(f"{where}.file: the synthetic world has no {ds_cfg['file']}; it has "
                                f"{', '.join(sorted(p.name for p in world.glob('*.json')))}.")
            root = world
        else:
            path = _local_file(ds_cfg["path"], f"{where}.path")
            root = Path(ds_cfg["image_root"]).expanduser() if ds_cfg["image_root"] else path.parent
        identity = file_sha256(path, cache_root)
        table = llava_table(path, root, position, cache_root, identity)
    if table.broken and on_error != "skip":
        raise _broken_error(table.broken[0])
    skipped = [str(b) for b in table.broken]
    urls = UrlCache(cache_root, timeout=float(data_cfg.get("url_timeout", 10.0)),
                    retries=int(data_cfg.get("url_retries", 3)), backoff=float(data_cfg.get("url_backoff", 1.0)),
                    threads=int(data_cfg.get("url_threads", 32)))
    rows = _prefetch(name, table, table.usable, urls, skipped)
    return Source(name, table, rows, skipped, identity, hf_images, urls)


# --------------------------------------------------------------------------- mixtures
class Mixture(Sequence):
    """The samples of a stage: (source, row) pairs as two integer arrays (no Python object per sample)."""

    def __init__(self, sources: list[Source], src: np.ndarray, idx: np.ndarray) -> None:
        self.sources, self.src, self.idx = sources, src, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> Record:  # type: ignore[override]
        return self.sources[int(self.src[i])].record(int(self.idx[i]))

    def lengths(self, num_image_tokens: int) -> np.ndarray:
        out = np.zeros(len(self), np.int64)
        for k, s in enumerate(self.sources):
            sel = self.src == k
            out[sel] = s.table.length_estimate(num_image_tokens)[s.rows[self.idx[sel]]]
        return out


def _subset(n: int, k: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(range(n), k))


def build_mixture(items: Sequence[Mapping[str, Any]], sources: Mapping[str, Source], seed: int) -> Mixture:
    """Cap each component to `max_samples` (seeded random subset), then weight it (repeat / subsample)."""
    used = list(dict.fromkeys(item["dataset"] for item in items))
    srcs, idx = [], []
    for i, item in enumerate(items):
        n = len(sources[item["dataset"]].rows)
        recs = np.arange(n, dtype=np.int64)
        rng = random.Random(f"{seed}-{i}-{item['dataset']}")
        if item["max_samples"] is not None and item["max_samples"] < n:
            recs = recs[_subset(n, item["max_samples"], rng)]
        whole, frac = divmod(float(item["weight"]), 1.0)
        picked = np.concatenate([np.tile(recs, int(whole)),
                                 recs[np.asarray(_subset(len(recs), round(frac * len(recs)), rng), np.int64)]])
        srcs.append(np.full(len(picked), used.index(item["dataset"]), np.int16))
        idx.append(picked)
    return Mixture([sources[d] for d in used], np.concatenate(srcs) if srcs else np.zeros(0, np.int16),
                   np.concatenate(idx) if idx else np.zeros(0, np.int64))


# --------------------------------------------------------------------------- samples
def default_num_workers(local_world_size: int = 1) -> int:
    """DataLoader workers per process when `data.num_workers` is unset: the CPUs this process may use, shared by
    the processes on the node, less one for the training loop itself; at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, local_world_size) - 1))


class TrainSet(torch.utils.data.Dataset):
    """Records → tokenised, image-expanded samples with decoded images (`{"broken": why}` for a skipped one).

    `records`: a `Mixture`, a source's `Records`, or any sequence of `Record`. Runs in the DataLoader workers.
    `transform` (the encoder's PIL → tensor transform): applied here too, so samples carry pixel tensors.
    """

    def __init__(self, records: Sequence[Record], tokenizer: Any, image_token_id: int, num_image_tokens: int,
                 max_length: int, on_error: str, chat_template: str | None = None,
                 transform: Callable[[Any], torch.Tensor] | None = None) -> None:
        self.records, self.tokenizer = records, tokenizer
        self.image_token_id, self.num_image_tokens = image_token_id, num_image_tokens
        self.max_length, self.on_error, self.chat_template = max_length, on_error, chat_template
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """A cheap length estimate per sample for grouping (characters / 4 + image tokens)."""
        if hasattr(self.records, "lengths"):
            return self.records.lengths(self.num_image_tokens).tolist()
        return [self.length(i) for i in range(len(self))]

    def length(self, i: int) -> int:
        r = self.records[i]
        return sum(len(m["content"]) for m in r.messages) // 4 + len(r.images) * self.num_image_tokens

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        try:
            try:
                ids, labels = tokenize_conversation(self.tokenizer, r.messages, sample_id=f"{r.id} ({r.where})",
                                                    chat_template=self.chat_template)
            except UserError as e:
                raise BrokenSample(r.where, str(e)) from None
            n_img = sum(1 for t in ids if t == self.image_token_id)
            if n_img != len(r.images):
                raise BrokenSample(r.where, f"{len(r.images)} image(s) but {n_img} image tokens after tokenisation")
            ids, labels = expand_image_tokens(list(ids), list(labels), self.image_token_id, self.num_image_tokens)
            ids, labels, kept, truncated = truncate(ids, labels, self.max_length, self.image_token_id,
                                                    self.num_image_tokens)
            images, keys = [], []
            for ref in r.images[:kept]:
                try:
                    data = r.source.image_bytes(ref) if r.source is not None else image_bytes(ref)
                    im = open_image(data)
                    images.append(self.transform(im) if self.transform is not None else im)
                except DeadLink as e:
                    raise BrokenSample(r.where, f"dead image link {ref} ({e})") from None
                except Exception as e:  # unreadable / truncated / not an image
                    raise BrokenSample(r.where, f"cannot read image {ref if isinstance(ref, str) else '<inline>'} "
                                       f"({type(e).__name__}: {e})") from None
                keys.append(hashlib.sha256(data).hexdigest())
        except BrokenSample as b:
            if self.on_error != "skip":
                raise _broken_error(b) from None
            return {"broken": str(b)}
        return {"input_ids": ids, "labels": labels, "images": images, "image_keys": keys, "id": r.id,
                "truncated": truncated}


def truncate(ids: list[int], labels: list[int], max_length: int, image_token_id: int,
             num_image_tokens: int) -> tuple[list[int], list[int], int, bool]:
    """LLaVA's cut of an over-long sample: keep its first `max_length` tokens, labels with them (LLaVA truncates the
    tokenised text and then the spliced sequence at `model_max_length`). Image tokens are never cut: an image whose
    tokens would not all fit is dropped whole, with everything after it. Returns (ids, labels, images kept, cut?)."""
    if len(ids) <= max_length:
        return ids, labels, ids.count(image_token_id) // max(num_image_tokens, 1), False
    cut, kept, i = max_length, 0, 0
    while i < cut:
        if ids[i] == image_token_id:  # an expanded image: num_image_tokens consecutive placeholders
            if i + num_image_tokens > cut:
                cut = i
                break
            kept += 1
            i += num_image_tokens
        else:
            i += 1
    return ids[:cut], labels[:cut], kept, True


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest sample (dynamic padding); images (PIL, or pixel tensors when the TrainSet has a
    transform) flattened in sample order."""
    good = [x for x in items if "broken" not in x]
    broken = [x["broken"] for x in items if "broken" in x]
    width = max([len(x["input_ids"]) for x in good], default=1)
    rows = max(len(good), 1)  # all broken: one pad row with no targets keeps every process's step in lockstep
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    mask[:, 0] = 1
    for b, x in enumerate(good):
        n = len(x["input_ids"])
        ids[b, :n] = torch.tensor(x["input_ids"])
        labels[b, :n] = torch.tensor(x["labels"])
        mask[b, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "images": [im for x in good for im in x["images"]], "image_keys": [k for x in good for k in x["image_keys"]],
            "num_samples": len(good), "broken": broken, "num_truncated": sum(bool(x.get("truncated")) for x in good),
            "num_target_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum())}


# --------------------------------------------------------------------------- batch plan
def epoch_batches(lengths: Sequence[int], global_batch: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """The epoch's global batches (drop-last), identical in every process for the same seed and epoch."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        mega = global_batch * 8
        perm = [i for s in range(0, len(perm), mega)
                for i in sorted(perm[s:s + mega], key=lambda j: -lengths[j])]
    batches = [perm[s:s + global_batch] for s in range(0, len(perm) - global_batch + 1, global_batch)]
    if group_by_length:
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in order]
    return batches


def micro_batch(global_batch: list[int], accum_index: int, rank: int, world: int, per_device: int) -> list[int]:
    start = (accum_index * world + rank) * per_device
    return global_batch[start:start + per_device]


def steps_per_epoch(n: int, global_batch: int) -> int:
    return n // global_batch


def total_steps(n: int, global_batch: int, epochs: float, max_steps: int | None) -> int:
    if max_steps is not None:
        return int(max_steps)
    return max(1, math.ceil(steps_per_epoch(n, global_batch) * epochs))

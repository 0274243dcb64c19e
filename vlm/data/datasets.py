"""Training data: sources (LLaVA JSON/JSONL, HF datasets, the synthetic world), mixtures, batching.

A source yields `Record`s (messages + image references + where it came from). Broken samples raise a
`UserError` naming the file and line, or with `data.on_error: skip` are dropped *and counted*.
Structural problems (bad JSON line, missing image file, `<image>` count mismatch) are found when a
source is read; undecodable images and over-long samples when a sample is loaded.

Batches are planned per epoch from a seed, so every process (and a resumed run) sees the same global
batches: a global batch = batch_size x world_size x grad_accum samples, sorted by length within
mega-batches when `group_by_length` (dynamic padding then wastes little).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from vlm.errors import UserError
from vlm.model.chat import tokenize_conversation
from vlm.model.vlm import expand_image_tokens
from vlm.world.synth.world import synth_dir

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Record:
    id: str
    messages: list[dict[str, str]]
    images: list[Any]  # absolute paths, URLs, PIL images or raw bytes
    where: str  # "file:line" or "dataset[split] row i", for error messages


@dataclass
class Source:
    name: str
    records: list[Record]
    skipped: list[str] = field(default_factory=list)  # "where: why" of samples dropped with on_error=skip
    identity: str = ""


class BrokenSample(Exception):
    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


def _broken_error(b: BrokenSample) -> UserError:
    return UserError(f"broken training sample at {b.where}: {b.why}. Fix the data, or set data.on_error=skip to skip "
                     "such samples (they are counted in metrics.jsonl as skipped_samples).")


# --------------------------------------------------------------------------- records
def _to_messages(conv: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(conv, list) or not conv:
        raise BrokenSample(where, "`conversations` must be a non-empty list of {from, value} turns")
    out = []
    for t in conv:
        if not isinstance(t, Mapping):
            raise BrokenSample(where, f"turn {t!r} is not a mapping")
        role = t.get("from", t.get("role"))
        text = t.get("value", t.get("content"))
        if role not in ROLES or not isinstance(text, str):
            raise BrokenSample(where, f"turn needs `from` in {sorted(ROLES)} and a string `value`, got {dict(t)!r}")
        out.append({"role": ROLES[role], "content": text})
    if not any(m["role"] == "assistant" for m in out):
        raise BrokenSample(where, "no assistant (gpt) turn to learn from")
    return out


def _check_images(messages: list[dict], images: list[Any], where: str) -> None:
    n_tok = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if images and n_tok == 0:
        raise BrokenSample(where, f"{len(images)} image(s) given but no {IMAGE_TOKEN} in the conversation")
    if n_tok != len(images):
        raise BrokenSample(where, f"{n_tok} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)")


def _resolve_image(ref: Any, root: Path, where: str) -> Any:
    if isinstance(ref, str) and not ref.startswith(("http://", "https://")):
        p = Path(ref).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise BrokenSample(where, f"image file {p} not found")
        return str(p)
    return ref


def record_from_llava(obj: Any, where: str, root: Path) -> Record:
    if not isinstance(obj, Mapping):
        raise BrokenSample(where, f"expected a JSON object, got {type(obj).__name__}")
    messages = _to_messages(obj.get("conversations"), where)
    img = obj.get("image")
    refs = [] if img is None else list(img) if isinstance(img, list) else [img]
    _check_images(messages, refs, where)
    images = [_resolve_image(r, root, where) for r in refs]
    return Record(id=str(obj.get("id", where)), messages=messages, images=images, where=where)


def _iter_json_items(path: Path):
    """Yield (line_no, obj | BrokenSample) for a JSON array or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or not stripped.startswith("["):
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, BrokenSample(f"{path}:{i}", f"invalid JSON ({e.msg} at column {e.colno})")
        return
    dec = json.JSONDecoder()
    pos = len(text) - len(stripped) + 1
    line = text.count("\n", 0, pos) + 1
    last = pos
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise UserError(f"{path}: the JSON array is not closed; fix the file.")
        if text[pos] == "]":
            return
        line += text.count("\n", last, pos)
        last = pos
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); the rest of the array "
                            "cannot be read, fix the file.") from None
        yield line, obj


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


def _collect(name: str, items, on_error: str) -> Source:
    src = Source(name, [])
    for item in items:
        if isinstance(item, BrokenSample):
            if on_error != "skip":
                raise _broken_error(item)
            src.skipped.append(str(item))
        else:
            src.records.append(item)
    return src


def _llava_records(path: Path, root: Path):
    for line, obj in _iter_json_items(path):
        if isinstance(obj, BrokenSample):
            yield obj
            continue
        try:
            yield record_from_llava(obj, f"{path}:{line}", root)
        except BrokenSample as b:
            yield b


def _hf_records(ds_cfg: Mapping[str, Any], where: str):
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
    if isinstance(ds.features.get(cols["image"]), datasets.Image):  # keep encoded bytes; decode when loaded
        ds = ds.cast_column(cols["image"], datasets.Image(decode=False))
    root = Path(ds_cfg["image_root"]).expanduser() if ds_cfg["image_root"] else Path.cwd()
    for i, row in enumerate(ds):
        w = f"{ds_cfg['path']}[{ds_cfg['split']}] row {i}"
        try:
            img = row.get(cols["image"])
            refs = [] if img is None else list(img) if isinstance(img, list) else [img]
            refs = [r["bytes"] if isinstance(r, Mapping) and r.get("bytes") else
                    r["path"] if isinstance(r, Mapping) else r for r in refs]
            if row.get(cols["conversations"]) is not None:
                messages = _to_messages(row[cols["conversations"]], w)
            elif row.get(cols["caption"]) is not None:
                messages = [{"role": "user", "content": ds_cfg["prompt"]},
                            {"role": "assistant", "content": str(row[cols["caption"]])}]
            elif row.get(cols["question"]) is not None and row.get(cols["answer"]) is not None:
                q = str(row[cols["question"]])
                q = q if IMAGE_TOKEN in q or not refs else IMAGE_TOKEN + "\n" + q
                messages = [{"role": "user", "content": q}, {"role": "assistant", "content": str(row[cols["answer"]])}]
            else:
                raise BrokenSample(w, "row has none of the mapped conversations / caption / question+answer columns")
            _check_images(messages, refs, w)
            yield Record(str(row.get(cols["id"], i)), messages, [_resolve_image(r, root, w) for r in refs], w)
        except BrokenSample as b:
            yield b




def load_source(name: str, ds_cfg: Mapping[str, Any], on_error: str) -> Source:
    where = f"datasets.{name}"
    if ds_cfg["type"] == "hf":
        src = _collect(name, _hf_records(ds_cfg, where), on_error)
        src.identity = json.dumps(dict(ds_cfg), sort_keys=True, default=str)
        return src
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
    src = _collect(name, _llava_records(path, root), on_error)
    src.identity = hashlib.sha256(path.read_bytes()).hexdigest()
    return src


# --------------------------------------------------------------------------- mixtures
def _subset(n: int, k: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(range(n), k))


def build_mixture(items: Sequence[Mapping[str, Any]], sources: Mapping[str, Source], seed: int) -> list[Record]:
    """Cap each component to `max_samples` (seeded random subset), then weight it (repeat / subsample)."""
    out: list[Record] = []
    for i, item in enumerate(items):
        recs = sources[item["dataset"]].records
        rng = random.Random(f"{seed}-{i}-{item['dataset']}")
        if item["max_samples"] is not None and item["max_samples"] < len(recs):
            recs = [recs[j] for j in _subset(len(recs), item["max_samples"], rng)]
        whole, frac = divmod(float(item["weight"]), 1.0)
        picked = recs * int(whole) + [recs[j] for j in _subset(len(recs), round(frac * len(recs)), rng)]
        out += picked
    return out


# --------------------------------------------------------------------------- samples
def image_bytes(ref: Any) -> bytes:
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if isinstance(ref, str) and ref.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(ref, timeout=30) as r:  # noqa: S310 - user-given dataset URLs
            return r.read()
    if isinstance(ref, str):
        return Path(ref).read_bytes()
    buf = io.BytesIO()  # a PIL image from an HF dataset
    ref.save(buf, format="PNG")
    return buf.getvalue()


def open_image(data: bytes) -> Any:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB")


def _tokenize(tokenizer: Any, messages: list[dict], sample_id: str, chat_template: str | None) -> tuple[list[int], list[int]]:
    return tokenize_conversation(tokenizer, messages, sample_id=sample_id, chat_template=chat_template)


class TrainSet(torch.utils.data.Dataset):
    """Records → tokenised, image-expanded samples (`None` for a skipped broken sample)."""

    def __init__(self, records: list[Record], tokenizer: Any, image_token_id: int, num_image_tokens: int,
                 max_length: int, on_error: str, chat_template: str | None = None) -> None:
        self.records, self.tokenizer = records, tokenizer
        self.image_token_id, self.num_image_tokens = image_token_id, num_image_tokens
        self.max_length, self.on_error, self.chat_template = max_length, on_error, chat_template

    def __len__(self) -> int:
        return len(self.records)

    def length(self, i: int) -> int:
        """A cheap length estimate for grouping (characters / 4 + image tokens)."""
        r = self.records[i]
        return sum(len(m["content"]) for m in r.messages) // 4 + len(r.images) * self.num_image_tokens

    def __getitem__(self, i: int) -> dict | None:
        r = self.records[i]
        try:
            try:
                ids, labels = _tokenize(self.tokenizer, r.messages, f"{r.id} ({r.where})", self.chat_template)
            except UserError as e:
                raise BrokenSample(r.where, str(e)) from None
            if list(ids).count(self.image_token_id) != len(r.images):
                raise BrokenSample(r.where, f"{len(r.images)} image(s) but {list(ids).count(self.image_token_id)} "
                                   "image tokens after tokenisation")
            ids, labels = expand_image_tokens(list(ids), list(labels), self.image_token_id, self.num_image_tokens)
            if len(ids) > self.max_length:
                raise BrokenSample(r.where, f"{len(ids)} tokens (with {len(r.images)} x {self.num_image_tokens} image "
                                   f"tokens) exceed max_length {self.max_length}; image tokens are never truncated")
            images, keys = [], []
            for ref in r.images:
                try:
                    data = image_bytes(ref)
                    images.append(open_image(data))
                except Exception as e:  # unreadable / truncated / not an image
                    raise BrokenSample(r.where, f"cannot read image {ref if isinstance(ref, str) else '<inline>'} "
                                       f"({type(e).__name__}: {e})") from None
                keys.append(hashlib.sha256(data).hexdigest())
        except BrokenSample as b:
            if self.on_error != "skip":
                raise _broken_error(b) from None
            return {"broken": str(b)}
        return {"input_ids": ids, "labels": labels, "images": images, "image_keys": keys, "id": r.id}


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest sample (dynamic padding); images flattened in sample order."""
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
            "num_samples": len(good), "broken": broken,
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

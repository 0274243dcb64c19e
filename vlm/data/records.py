"""Training records at LLaVA scale: parsed once into a memory-mapped Arrow table that every rank and every
DataLoader worker shares without copying.

A source file (LLaVA JSON array or JSONL) is streamed, each row checked and normalised (messages, image
paths, `<image>` placement), and written to `<cache>/<key>.arrow` (Arrow IPC, one column per field), where
the key hashes the file's bytes and every option that changes a row. Later loads memory-map that file: no
Python object per row is built up front, so a forked worker touching rows grows only by the rows it decodes.
Rows that cannot be used are listed (where + why) in `<key>.json` beside it and counted by the caller.

Where a row sits is named for people: `FILE:LINE` for JSONL, and for a JSON array also its index in the array
and its `id` (LLaVA-Pretrain's 558K file is one array on a single line, so its line number says nothing).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from vlm.errors import UserError
from vlm.io import atomic_write_json, read_json

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
INDEX_VERSION = 2
_CHUNK = 16 << 20  # characters read at a time from a JSON array
_BATCH = 1 << 16  # rows per Arrow record batch
_ID_RE = re.compile(r'"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


class BrokenSample(Exception):
    """A row that cannot be trained on; `where` names it, `why` says what is wrong."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


def data_cache_root(configured: str | None = None) -> Path:
    """Where parsed record tables and downloaded images are kept (`data.cache_dir`, $VLM_DATA_CACHE, or
    ~/.cache/vlm-ablate/data)."""
    root = configured or os.environ.get("VLM_DATA_CACHE") or (
        Path(os.environ["VLM_ABLATE_CACHE"]) / "data" if os.environ.get("VLM_ABLATE_CACHE")
        else "~/.cache/vlm-ablate/data")
    return Path(root).expanduser()


# --------------------------------------------------------------------------- one row
def to_messages(conv: Any, where: str) -> list[dict[str, str]]:
    """LLaVA `conversations` ([{from: human|gpt, value}]) or `{role, content}` turns → messages."""
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


def place_images(messages: list[dict[str, str]], position: str) -> list[dict[str, str]]:
    """`front` (LLaVA's and ShareGPT4V's training, the default): a turn holding `<image>` anywhere is trained as
    `<image>\\n` + its text with the placeholder removed (LLaVA's `preprocess_multimodal`; n placeholders give
    n `<image>\\n` lines). `keep`: the text is used as written."""
    if position == "keep":
        return messages
    out = []
    for m in messages:
        n = m["content"].count(IMAGE_TOKEN)
        if n:
            text = m["content"].replace(IMAGE_TOKEN, "").strip()
            m = {"role": m["role"], "content": (IMAGE_TOKEN + "\n") * n + text if text else
                 "\n".join([IMAGE_TOKEN] * n)}
        out.append(m)
    return out


def check_images(messages: list[dict[str, str]], n_images: int, where: str) -> None:
    n_tok = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n_images and n_tok == 0:
        raise BrokenSample(where, f"{n_images} image(s) given but no {IMAGE_TOKEN} in the conversation")
    if n_tok != n_images:
        raise BrokenSample(where, f"{n_tok} {IMAGE_TOKEN} placeholder(s) for {n_images} image(s)")


def is_url(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(("http://", "https://"))


def resolve_image(ref: Any, root: Path, where: str, missing: list[str] | None = None) -> str:
    """A local image path made absolute (relative to `root`); URLs pass through. A missing file is a broken
    row, or with `missing` given, is appended there for the caller to re-check."""
    if not isinstance(ref, str):
        raise BrokenSample(where, f"image reference {ref!r} is not a string path or URL")
    if is_url(ref):
        return ref
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        if missing is None:
            raise BrokenSample(where, f"image file {p} not found")
        missing.append(str(p))
    return str(p)


@dataclass
class Row:
    """A normalised training row as stored in the table."""

    id: str
    messages: list[dict[str, str]]
    images: list[str]  # absolute paths, URLs, or `hf:<row>:<k>` (image k of an HF dataset row)
    where: str


def llava_row(obj: Any, where: str, root: Path, image_position: str, missing: list[str] | None = None) -> Row:
    if not isinstance(obj, Mapping):
        raise BrokenSample(where, f"expected a JSON object, got {type(obj).__name__}")
    messages = place_images(to_messages(obj.get("conversations"), where), image_position)
    img = obj.get("image")
    refs = [] if img is None else list(img) if isinstance(img, list) else [img]
    check_images(messages, len(refs), where)
    return Row(str(obj.get("id", where)), messages, [resolve_image(r, root, where, missing) for r in refs], where)


# --------------------------------------------------------------------------- streaming a LLaVA file
def _where(path: Path, line: int, row: int | None, rid: Any) -> str:
    inner = ", ".join(([f"row {row}"] if row is not None else []) + ([f"id {rid!r}"] if rid is not None else []))
    return f"{path}:{line}" + (f" ({inner})" if inner else "")


def _peek_id(text: str) -> Any:
    m = _ID_RE.search(text[:4096])
    if not m:
        return None
    try:
        return json.loads(m.group(1))
    except json.JSONDecodeError:
        return None


def iter_json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, object | BrokenSample) for each row of a JSONL file or a JSON array, read in bounded chunks.

    In an array, invalid JSON ends the read (the rest cannot be parsed reliably): a `UserError` names the row.
    """
    with open(path, encoding="utf-8") as f:
        head = f.read(_CHUNK)
        first = head.lstrip()[:1]
        if path.suffix == ".jsonl" or first != "[":
            yield from _iter_jsonl(path, head, f)
            return
        yield from _iter_array(path, head, f)


def _iter_jsonl(path: Path, head: str, f: Any) -> Iterator[tuple[str, Any]]:
    rest = ""
    line_no = 0
    buf = head
    while True:
        lines = (rest + buf).split("\n")
        rest = lines.pop()
        for line in lines:
            line_no += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rid = _peek_id(line)
                yield _where(path, line_no, None, rid), BrokenSample(
                    _where(path, line_no, None, rid), f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            yield _where(path, line_no, None, obj.get("id") if isinstance(obj, dict) else None), obj
        buf = f.read(_CHUNK)
        if not buf:
            break
    if rest.strip():
        line_no += 1
        try:
            obj = json.loads(rest)
        except json.JSONDecodeError as e:
            w = _where(path, line_no, None, _peek_id(rest))
            yield w, BrokenSample(w, f"invalid JSON ({e.msg} at column {e.colno})")
            return
        yield _where(path, line_no, None, obj.get("id") if isinstance(obj, dict) else None), obj


def _iter_array(path: Path, buf: str, f: Any) -> Iterator[tuple[str, Any]]:
    dec = json.JSONDecoder()
    eof = False
    pos = len(buf) - len(buf.lstrip()) + 1  # just past "["
    line, counted = 1 + buf.count("\n", 0, pos), pos
    row = 0

    def more() -> bool:
        nonlocal buf, pos, counted, eof
        if eof:
            return False
        chunk = f.read(_CHUNK)
        eof = not chunk
        if chunk:
            buf, counted, pos = buf[pos:] + chunk, counted - pos, 0
        return bool(chunk)

    def skip_ws() -> None:
        nonlocal pos
        while True:
            n = len(buf)
            while pos < n and buf[pos] in " \t\r\n":
                pos += 1
            if pos < n or not more():
                return

    while True:
        skip_ws()
        if pos >= len(buf):
            raise UserError(f"{path}: the JSON array is not closed after row {row - 1}; the file is truncated, "
                            "fix or re-download it.")
        if buf[pos] == "]" and row == 0:
            return
        line += buf.count("\n", counted, pos)
        counted = pos
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:
                if more():
                    continue
                rid = _peek_id(buf[pos:])
                if not buf.rstrip().endswith("]"):
                    raise UserError(f"{_where(path, line, row, rid)}: the file ends inside array row {row}; the JSON "
                                    "array is not closed (the file is truncated), fix or re-download it.") from None
                raise UserError(f"{_where(path, line + buf.count(chr(10), pos, e.pos), row, rid)}: invalid JSON in "
                                f"array row {row} ({e.msg}); the rest of the array cannot be read, fix the file.") from None
        yield _where(path, line, row, obj.get("id") if isinstance(obj, dict) else None), obj
        row += 1
        pos = end
        skip_ws()
        if pos < len(buf) and buf[pos] == ",":
            pos += 1
            continue
        if pos < len(buf) and buf[pos] == "]":
            return
        if pos >= len(buf):
            raise UserError(f"{path}: the JSON array is not closed after row {row - 1}; the file is truncated, "
                            "fix or re-download it.")
        raise UserError(f"{_where(path, line, row - 1, None)}: expected ',' or ']' after array row {row - 1}; "
                        "the file is not a JSON array of rows, fix it.")


# --------------------------------------------------------------------------- the table
def _schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("messages", pa.string()), ("images", pa.list_(pa.string())),
                      ("where", pa.string()), ("text_chars", pa.int32())])


class RecordTable:
    """A memory-mapped table of normalised rows; `row(i)` decodes one.

    `usable` are the indices of rows that may be trained on; `broken` lists the rows that may not (found when
    the table was built, plus rows whose image files were missing then and still are).
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        import pyarrow as pa

        self.path, self.meta = path, meta
        self._table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        self._cols = {c: self._table.column(c) for c in ("id", "messages", "images", "where")}
        self.text_chars = self._table.column("text_chars").to_numpy()
        chunks = self._table.column("images").chunks  # per chunk: no copy of the strings
        self.num_images = np.concatenate([np.diff(c.offsets.to_numpy()) for c in chunks] or [np.zeros(0)]
                                         ).astype(np.int32)
        self.broken = [BrokenSample(w, why) for w, why in meta.get("broken", [])]
        self.usable = np.arange(len(self._table), dtype=np.int64)
        still = {int(i): [x for x in p if not Path(x).is_file()] for i, p in meta.get("missing", {}).items()}
        still = {i: p for i, p in still.items() if p}
        if still:
            self.usable = np.setdiff1d(self.usable, np.fromiter(still, np.int64))
            self.broken += [BrokenSample(self._cols["where"][i].as_py(), f"image file {p[0]} not found")
                            for i, p in sorted(still.items())]

    def __getstate__(self) -> dict[str, Any]:  # spawned workers map the file again instead of copying it
        return {"path": self.path, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["meta"])

    def __len__(self) -> int:
        return len(self._table)

    def row(self, i: int) -> Row:
        i = int(i)
        c = self._cols
        return Row(c["id"][i].as_py(), json.loads(c["messages"][i].as_py()), c["images"][i].as_py(),
                   c["where"][i].as_py())

    def length_estimate(self, num_image_tokens: int) -> np.ndarray:
        """Tokens per row for length grouping: characters / 4 + image tokens (no tokenisation)."""
        return self.text_chars // 4 + self.num_images * int(num_image_tokens)


def _write_table(out: Path, rows: Iterable[Row | BrokenSample]) -> dict[str, Any]:
    """Write rows to an Arrow IPC file (atomically); → metadata with the broken rows and missing images."""
    import pyarrow as pa

    schema = _schema()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    missing: dict[str, list[str]] = {}
    broken: list[list[str]] = []
    n = urls = 0
    cols: dict[str, list] = {k: [] for k in schema.names}
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            def flush() -> None:
                if cols["id"]:
                    writer.write_batch(pa.record_batch([pa.array(cols[k], type=schema.field(k).type)
                                                        for k in schema.names], schema=schema))
                    for v in cols.values():
                        v.clear()

            for r in rows:
                if isinstance(r, BrokenSample):
                    broken.append([r.where, r.why])
                    continue
                if getattr(r, "missing", None):
                    missing[str(n)] = r.missing  # type: ignore[attr-defined]
                urls += sum(is_url(x) for x in r.images)
                cols["id"].append(r.id)
                cols["messages"].append(json.dumps(r.messages, ensure_ascii=False))
                cols["images"].append(r.images)
                cols["where"].append(r.where)
                cols["text_chars"].append(sum(len(m["content"]) for m in r.messages))
                n += 1
                if len(cols["id"]) >= _BATCH:
                    flush()
            flush()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"rows": n, "broken": broken, "missing": missing, "urls": urls}


def _cached_table(cache_root: Path, key: str, build: Callable[[Path], dict[str, Any]]) -> RecordTable:
    """Build `<cache_root>/<key>.arrow` once (file-locked: one rank builds, the others wait) and map it."""
    from filelock import FileLock

    cache_root.mkdir(parents=True, exist_ok=True)
    out, meta_path = cache_root / f"{key}.arrow", cache_root / f"{key}.json"
    with FileLock(str(out) + ".lock"):
        if not (out.is_file() and meta_path.is_file()):
            atomic_write_json(meta_path, build(out))
    return RecordTable(out, read_json(meta_path))


def file_sha256(path: Path, cache_root: Path | None = None) -> str:
    """SHA-256 of a file's bytes. With `cache_root`, remembered per (path, size, mtime_ns, inode), as make and rsync
    decide a file is unchanged: hashing LLaVA's 1 GB mix takes seconds on every start and every rank otherwise."""
    st = path.stat()
    stamp = [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino]
    memo = None
    if cache_root is not None:
        memo = cache_root / "digests" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]}.json"
        if memo.is_file():
            try:
                known = read_json(memo)
                if known.get("stamp") == stamp:
                    return known["sha256"]
            except (OSError, ValueError):
                pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo, {"stamp": stamp, "sha256": h.hexdigest()})
    return h.hexdigest()


def llava_table(path: Path, root: Path, image_position: str, cache_root: Path, digest: str | None = None) -> RecordTable:
    """The record table of a LLaVA JSON/JSONL file: built on first use (keyed on the file's bytes, its image
    root and the row options), then memory-mapped. Image files missing at build time are re-checked per load."""
    digest = digest or file_sha256(path)
    key = hashlib.sha256(json.dumps([INDEX_VERSION, "llava", digest, str(Path(root).resolve()),
                                     image_position]).encode()).hexdigest()[:32]

    def rows() -> Iterator[Row | BrokenSample]:
        for where, obj in iter_json_rows(path):
            if isinstance(obj, BrokenSample):
                yield obj
                continue
            missing: list[str] = []
            try:
                r = llava_row(obj, where, root, image_position, missing)
            except BrokenSample as b:
                yield b
                continue
            r.missing = missing  # type: ignore[attr-defined]
            yield r

    return _cached_table(cache_root, key, lambda out: {**_write_table(out, rows()), "source": str(path),
                                                       "sha256": digest})


def rows_table(rows: Callable[[], Iterable[Row | BrokenSample]], key: str, cache_root: Path,
               identity: Mapping[str, Any]) -> RecordTable:
    """The record table of rows from another reader (an HF dataset), cached under `key`."""
    return _cached_table(cache_root, key, lambda out: {**_write_table(out, rows()), **identity})

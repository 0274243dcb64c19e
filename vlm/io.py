"""Atomic file writes and safe reads for run dirs (never pickle)."""
from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

_UMASK_LOCK = threading.Lock()


@functools.cache
def _umask() -> int:
    """The process umask (read once: `os.umask` can only be read by setting it, so the read is locked)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _atomic_replace(path: Path, write) -> None:
    """Write to a temp file in the same dir, fsync, rename into place. `mkstemp` creates the temp file 0600;
    it gets the mode any newly created file would get (0666 & ~umask) so colleagues on a shared cluster can read
    results as their umask intends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_replace(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, blob)


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line and fsync it; readers skip a torn last line."""
    append_jsonl_records(path, [record])


def append_jsonl_records(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Append JSON lines with one write and one fsync (an eval batch: one sync per batch, not per item, which
    matters on network file systems); a crash leaves at most a torn last line, which readers skip."""
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield records of a JSONL file written by `append_jsonl`; a torn final line is ignored."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i >= len(lines) - 2:
                return
            raise


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

"""Image bytes for training samples: local files, HF datasets' embedded images, and URLs through a local
content cache.

URL datasets (PixMo-Cap) are fetched once, in parallel, before training (`UrlCache.prefetch`): each URL is
downloaded with a timeout and retries (with backoff) on timeouts, connection errors and 5xx/429 answers,
checked to be an image, and stored under `<cache>/urls/<sha256[:2]>/<sha256>`. A link that stays dead (4xx,
not an image, retries used up) is recorded as `<sha256>.dead` holding the reason; its rows are skipped and
counted (never silently), and later runs do not fetch it again (delete the `.dead` files to retry).
"""
from __future__ import annotations

import hashlib
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from vlm.io import atomic_write_bytes, atomic_write_text

USER_AGENT = "vlm-ablate (+https://github.com/; dataset image fetch)"


class DeadLink(Exception):
    """A URL that gave no image after every retry."""


class UrlCache:
    def __init__(self, root: Path, *, timeout: float = 10.0, retries: int = 3, backoff: float = 1.0,
                 threads: int = 32) -> None:
        self.root = Path(root) / "urls"
        self.timeout, self.retries, self.backoff, self.threads = timeout, retries, backoff, threads

    def _path(self, url: str) -> Path:
        h = hashlib.sha256(url.encode()).hexdigest()
        return self.root / h[:2] / h

    def dead_reason(self, url: str) -> str | None:
        p = self._path(url).with_suffix(".dead")
        return p.read_text() if p.is_file() else None

    def get(self, url: str) -> bytes:
        """The image bytes of `url`, from the cache or downloaded now; `DeadLink` if it has none."""
        p = self._path(url)
        if p.is_file():
            return p.read_bytes()
        reason = self.dead_reason(url)
        if reason is not None:
            raise DeadLink(reason)
        return self._fetch(url)

    def _download(self, url: str) -> bytes:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 - dataset URLs
                    return r.read()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code < 500 and e.code != 429:  # gone / forbidden: retrying does not help
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise DeadLink(f"{last} after {attempt + 1} attempt(s)")

    def _fetch(self, url: str) -> bytes:
        p = self._path(url)
        try:
            data = self._download(url)
            _check_image(data)
        except DeadLink as e:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(p.with_suffix(".dead"), str(e))
            raise
        except Exception as e:  # noqa: BLE001 - any undecodable answer (HTML error page, truncated file)
            p.parent.mkdir(parents=True, exist_ok=True)
            reason = f"not an image ({type(e).__name__}: {e})"
            atomic_write_text(p.with_suffix(".dead"), reason)
            raise DeadLink(reason) from None
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(p, data)
        return data

    def prefetch(self, urls: Iterable[str], progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
        """Fetch every URL not yet cached, `threads` at a time; → {dead url: reason} (cached dead ones too)."""
        todo, dead = [], {}
        for u in dict.fromkeys(urls):
            if self._path(u).is_file():
                continue
            reason = self.dead_reason(u)
            if reason is not None:
                dead[u] = reason
            else:
                todo.append(u)

        def one(u: str) -> tuple[str, str | None]:
            try:
                self._fetch(u)
                return u, None
            except DeadLink as e:
                return u, str(e)

        if todo:
            with ThreadPoolExecutor(self.threads) as pool:
                for k, (u, reason) in enumerate(pool.map(one, todo), 1):
                    if reason is not None:
                        dead[u] = reason
                    if progress:
                        progress(k, len(todo))
        return dead


def _check_image(data: bytes) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.verify()


def image_bytes(ref: Any, *, hf_images: Any = None, urls: UrlCache | None = None) -> bytes:
    """Bytes of one image reference: a path, a URL (through `urls`), `hf:<row>:<k>` (image k of row `row` of
    the HF dataset column `hf_images`, read from its memory map now), raw bytes, or a PIL image."""
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if isinstance(ref, str) and ref.startswith(("http://", "https://")):
        if urls is None:
            raise DeadLink("no URL cache configured")
        return urls.get(ref)
    if isinstance(ref, str) and ref.startswith("hf:"):
        _, row, k = ref.split(":")
        (cell,) = hf_images[int(row)].values()
        cell = cell[int(k)] if isinstance(cell, list) else cell
        if cell.get("bytes"):
            return cell["bytes"]
        return Path(cell["path"]).read_bytes()
    if isinstance(ref, str):
        return Path(ref).read_bytes()
    buf = io.BytesIO()  # a PIL image
    ref.save(buf, format="PNG")
    return buf.getvalue()


def open_image(data: bytes) -> Any:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB")

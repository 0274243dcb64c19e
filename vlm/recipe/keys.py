"""Artifact keys: one hash per enabled stage of everything that determines its trained weights.

Runs (and grid points) whose first stages agree share those stages' artifacts in the artifact store.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig

from vlm.recipe.schema import enabled_stages, plain

_NOT_IN_KEY = ("enabled", "save_every", "feature_cache")


def _file_digest(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        return path
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dataset_identity(ds: dict) -> dict:
    ident = dict(ds)
    if ds["type"] == "llava" and ds["path"]:
        ident["content"] = _file_digest(ds["path"])
    if ds["type"] == "hf" and ds["data_files"]:
        ident["content"] = [_file_digest(f) for f in ds["data_files"]]
    return ident


def stage_keys(cfg: DictConfig | dict) -> list[str]:
    """One key per enabled stage: a hash of the model, the stage, its data, the seed, the process layout
    (`distributed.num_processes`, null = 1, so the global batch, and the strategy) and the previous key.
    `vlm train` writes the process count it was started with into the run's recipe."""
    c = plain(cfg)
    keys, prev = [], None
    world = int(c["distributed"]["num_processes"] or 1)
    for name in enabled_stages(c):
        st = {k: v for k, v in c["stages"][name].items() if k not in _NOT_IN_KEY}
        data = {item["dataset"]: _dataset_identity(c["datasets"][item["dataset"]]) for item in st["data"]}
        blob = json.dumps({"model": c["model"], "stage": st, "data": data, "on_error": c["data"]["on_error"],
                           "group_by_length": c["data"]["group_by_length"], "seed": c["run"]["seed"],
                           "world_size": world, "strategy": c["distributed"]["strategy"],
                           "global_batch": st["batch_size"] * st["grad_accum"] * world,
                           "prev": prev, "name": name}, sort_keys=True, default=str)
        prev = hashlib.sha256(blob.encode()).hexdigest()[:20]
        keys.append(prev)
    return keys

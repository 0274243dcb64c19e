"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint dir `step_00000012/` holds `trainable.safetensors` (parameters with requires_grad),
`optimizer.safetensors` + `optimizer.json`, `state.json` (scheduler, step, data position, python/numpy
RNG) and `rng.safetensors` (torch RNG). It is written under a temporary name and renamed into place, then
`latest.json` is replaced atomically, so a kill at any moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from vlm.io import atomic_save_safetensors, atomic_write_json, read_json


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_to_flat(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, kv in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(kv)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict, keep: int = 2) -> Path:
    """Write `ckpt_root/step_NNNNNNNN/` atomically and point `latest.json` at it."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    atomic_save_safetensors(tmp / "trainable.safetensors", trainable_state(model))
    ot, om = optimizer_to_flat(optimizer.state_dict())
    atomic_save_safetensors(tmp / "optimizer.safetensors", ot)
    atomic_write_json(tmp / "optimizer.json", om)
    rt, rm = rng_state()
    atomic_save_safetensors(tmp / "rng.safetensors", rt)
    atomic_write_json(tmp / "state.json", {**state, "step": step, "rng": rm, "scheduler": scheduler.state_dict()})
    final = ckpt_root / f"step_{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_json(ckpt_root / "latest.json", {"step": step, "dir": final.name})
    old = sorted(p for p in ckpt_root.glob("step_*") if p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(".tmp-*"):
        if p != tmp:
            shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    f = ckpt_root / "latest.json"
    if not f.is_file():
        return None
    d = ckpt_root / read_json(f)["dir"]
    return d if d.is_dir() else None


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; return `state.json` (step, data position, ...)."""
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    optimizer.load_state_dict(optimizer_from_flat(load_file(str(ckpt / "optimizer.safetensors")),
                                                  json.loads((ckpt / "optimizer.json").read_text())))
    state = read_json(ckpt / "state.json")
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_file(str(ckpt / "rng.safetensors")), state["rng"])
    return state

"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint dir `step_00000012/` holds `trainable.safetensors` (the full fp32 trained parameters, gathered from
every process under fsdp, and the trained modules' buffers, e.g. BatchNorm statistics), `optimizer.safetensors` +
`optimizer.json` (the full optimizer state), `state.json` (scheduler, step, data position, python/numpy RNG) and
`rng.safetensors` (torch RNG of the CPU and of this process's GPU). It is written under a temporary name and
renamed into place, then `latest.json` is replaced atomically, so a kill at any moment leaves the previous
checkpoint usable.

Under DeepSpeed ZeRO the optimizer state stays partitioned: instead of `optimizer.*`, every process writes its own
partition (and its own RNG), `partition.rankNNNNN.safetensors` + `.json` (`write_partition`), into the staging dir
`.tmp-step_NNNNNNNN` (`staging_dir`) before the main process completes and renames it (`save_checkpoint(...,
staged=)`); the checkpoint dir must then be on a filesystem every process sees.
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors.torch import load_file

from vlm.errors import UserError
from vlm.io import atomic_save_safetensors, atomic_write_json, read_json


def trainable_state(model: torch.nn.Module, buffers: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters and of the named buffers (`freeze.trained_buffer_names`)."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    named = dict(model.named_buffers())
    state.update({n: named[n].detach().cpu().clone() for n in buffers})
    return state


def load_trained_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved parameters and buffers (`trainable_state`) into the model in place."""
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = [n for n in tensors if n not in targets]
    if unknown:
        raise UserError(f"{where} does not fit this model (unknown parameters or buffers {unknown[:3]}...); "
                        "it was made by a different model config.")
    with torch.no_grad():
        for n, t in tensors.items():
            targets[n].copy_(t)


def optimizer_to_flat(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer state dict (parameters keyed by index, or by name as torch's full state dicts key them)
    as tensors `"<param>.<key>"` plus JSON."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.rsplit(".", 1)  # a parameter name holds dots, a state key ("exp_avg", "step") does not
        state.setdefault(_pid(pid), {})[k] = v
    for pid, kv in meta["scalars"].items():
        state.setdefault(_pid(pid), {}).update(kv)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _pid(s: str) -> int | str:
    return int(s) if s.isdigit() else s


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Torch (CPU and this process's current GPU only: reading every GPU's state would create a CUDA context on
    each visible GPU from every rank), python and numpy RNG state."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available() and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], torch.cuda.current_device())
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def staging_dir(ckpt_root: Path, step: int) -> Path:
    """Where the processes write their partitions of the checkpoint of `step` before it is renamed into place (a
    leftover of a killed attempt is overwritten file by file, then removed by the next completed checkpoint)."""
    return ckpt_root / f".tmp-step_{step:08d}"


def _partition_name(rank: int) -> str:
    return f"partition.rank{rank:05d}"


def write_partition(staged: Path, rank: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """This process's partition of a checkpoint (tensors in safetensors, the rest in JSON), into `staged`."""
    staged.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(staged / f"{_partition_name(rank)}.safetensors", tensors)
    atomic_write_json(staged / f"{_partition_name(rank)}.json", meta)


def read_partition(ckpt: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Process `rank`'s partition (`write_partition`) of checkpoint `ckpt`."""
    f = ckpt / f"{_partition_name(rank)}.json"
    if not f.is_file():
        n = len(list(ckpt.glob("partition.rank*.json")))
        raise UserError(f"checkpoint {ckpt} holds the partitions of {n} process(es), none of process {rank}; "
                        f"relaunch with the processes and strategy that wrote it, or delete {ckpt.parent} to start "
                        "the stage fresh.")
    return load_file(str(ckpt / f"{_partition_name(rank)}.safetensors")), read_json(f)


def save_checkpoint(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict | None,
                    state: dict, keep: int = 2, staged: Path | None = None) -> Path:
    """Write `ckpt_root/step_NNNNNNNN/` atomically and point `latest.json` at it. `weights`: the full trained
    parameters and buffers (`trainable_state`, or gathered from every process); `optimizer_state`: a full torch
    optimizer state dict, or None where each process wrote its partition into `staged` (`staging_dir`), which
    then becomes the checkpoint; `state`: JSON (scheduler, data position, ...)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = staged if staged is not None else Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    atomic_save_safetensors(tmp / "trainable.safetensors", weights)
    if optimizer_state is not None:
        ot, om = optimizer_to_flat(optimizer_state)
        atomic_save_safetensors(tmp / "optimizer.safetensors", ot)
        atomic_write_json(tmp / "optimizer.json", om)
    rt, rm = rng_state()
    atomic_save_safetensors(tmp / "rng.safetensors", rt)
    atomic_write_json(tmp / "state.json", {**state, "step": step, "rng": rm})
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


def read_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """(trained weights and buffers, optimizer state dict or None where it is partitioned (`read_partition`),
    `state.json` with `rng_state` = (tensors, meta) for `set_rng_state`)."""
    weights = load_file(str(ckpt / "trainable.safetensors"))
    optim = optimizer_from_flat(load_file(str(ckpt / "optimizer.safetensors")),
                                json.loads((ckpt / "optimizer.json").read_text())) \
        if (ckpt / "optimizer.json").is_file() else None
    state = read_json(ckpt / "state.json")
    state["rng_state"] = (load_file(str(ckpt / "rng.safetensors")), state["rng"])
    return weights, optim, state

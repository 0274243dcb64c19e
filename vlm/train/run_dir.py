"""Reading a run dir: rebuild its VLM from `recipe.yaml` and apply every finished stage's artifact.

A stage artifact (`weights.safetensors` + `artifact.json`) lives in the artifact store under its stage key
(`vlm.recipe.keys.stage_keys`); `RUN_DIR/stages/<name>/artifact.json` points at it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed as _accelerate_set_seed
from omegaconf import OmegaConf
from safetensors.torch import load_file

from vlm.errors import UserError
from vlm.io import read_json
from vlm.model.vlm import build_vlm
from vlm.recipe.freeze import MODULES, apply_policy, has_lora, merge_lora, module_of
from vlm.recipe.schema import enabled_stages, plain, validate
from vlm.train.checkpoint import load_trained_state


def set_seed(seed: int) -> None:
    _accelerate_set_seed(int(seed))


def build_model(cfg: Any) -> Any:
    """The VLM of a recipe, with the run's seed fixing any random init (so a resume rebuilds it exactly)."""
    set_seed(cfg["run"]["seed"])
    return build_vlm(plain(cfg["model"]))


def artifact_store(cfg: Any, run_dir: Path) -> Path:
    return Path(cfg["run"]["artifact_store"]).expanduser() if cfg["run"]["artifact_store"] else run_dir / "artifacts"


def artifact_complete(path: Path) -> bool:
    return (path / "artifact.json").is_file() and (path / "weights.safetensors").is_file()


def apply_artifact(vlm: Any, stage_cfg: dict, art: Path) -> None:
    """Bring a model at the stage's start to the stage's end: inject LoRA if any, load weights (and the trained
    modules' buffers, e.g. BatchNorm statistics), merge LoRA."""
    apply_policy(vlm, stage_cfg["freeze"], stage_cfg["optim"])
    load_trained_state(vlm, load_file(str(art / "weights.safetensors")), f"artifact {art}")
    for m in MODULES:
        if has_lora(module_of(vlm, m)):
            merge_lora(module_of(vlm, m))


def load_run(run_dir: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """Rebuild a run's VLM from its `recipe.yaml` and apply every finished stage's artifact (LoRA merged)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{run_dir} is not a run dir (no recipe.yaml); give the --out dir of `vlm train`.")
    cfg = validate(OmegaConf.to_container(OmegaConf.load(run_dir / "recipe.yaml"), resolve=True), str(run_dir))
    vlm = build_model(cfg)
    for name in enabled_stages(cfg):
        pointer = run_dir / "stages" / name / "artifact.json"
        if not pointer.is_file():
            raise UserError(f"run {run_dir}: stage {name!r} has not finished (no {pointer}); resume it with "
                            f"`vlm train {run_dir / 'recipe.yaml'} --out {run_dir}`.")
        apply_artifact(vlm, cfg["stages"][name], Path(read_json(pointer)["path"]))
    for p in vlm.parameters():
        p.requires_grad_(False)
    if device is not None or dtype is not None:
        vlm.to(device=device, dtype=dtype)
    return vlm.eval()

"""Build a recipe's model on the meta device: real shapes, no weights, nothing downloaded.

`vlm plan` must price the model the training would build, so the model goes through the training's own
builder (`build_vlm`) under `torch.device("meta")`. Only the *source* of each part changes: a `path`
(hub id, local dir or `zoo:<name>`) becomes a random-init `config` holding that checkpoint's
`config.json` facts, read from

1. the local dir itself (or the prepared zoo entry's dir), when it exists: its `config.json`; else
2. `vlm/plan/hf_configs/<org>--<name>/config.json`, the stored facts of the hub ids the shipped recipes
   name (README.md there says where each came from); a `zoo:` entry that is not prepared uses the
   stored config of its upstream model.

An LLM's embedding gets the rows `build_llm` would give it (`len(tokenizer)` after adding `<image>`): from
the tokenizer itself when it is on disk, else from the stored `tokenizer_facts.json`, with a built-in
tokenizer of the model's chat family standing in (only its chat template and special tokens are used).
This is for planning only: a meta model has no storage and cannot train.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from vlm.errors import UserError
from vlm.model import build_vlm
from vlm.model.llm import IMAGE_TOKEN, load_tokenizer
from vlm.world.zoo.catalogue import cache_dir, entry_status, get_entry

HF_CONFIGS = Path(__file__).resolve().parent / "hf_configs"
_DROP = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "auto_map"}
# Zoo entries that are not prepared locally: the upstream architecture they convert (same config).
ZOO_UPSTREAM = {
    "dinov2-s": ("hf", "facebook/dinov2-small"),
    "smollm2-135m-instruct": ("hf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "efficientnet-lite0": ("timm", "tf_efficientnet_lite0"),
}


def stored_dir(hub_id: str) -> Path:
    return HF_CONFIGS / hub_id.replace("/", "--")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _zoo_dir(spec: str) -> Path | None:
    """The prepared zoo entry's dir, or None when it is not prepared here."""
    name = spec.split(":", 1)[1]
    entry = get_entry(name)
    return cache_dir() / name if entry_status(entry) == "ready" else None


def config_source(path: str) -> tuple[str, Any]:
    """Where the facts of a `path` come from: ("dir", Path), ("hf", hub id) or ("timm", architecture name)."""
    if path.startswith("zoo:"):
        local = _zoo_dir(path)
        if local is not None:
            return "dir", local
        name = path.split(":", 1)[1]
        if name not in ZOO_UPSTREAM:
            raise UserError(f"vlm plan: zoo model {name!r} is not prepared and plan has no stored config for it; "
                            f"run `vlm zoo prepare {name}` (plan reads only its config.json).")
        return ZOO_UPSTREAM[name]
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return "dir", local
    if (stored_dir(path) / "config.json").is_file():
        return "hf", path
    known = sorted(p.name.replace("--", "/") for p in HF_CONFIGS.iterdir() if (p / "config.json").is_file())
    raise UserError(f"vlm plan: no config for {path!r}: it is not a local dir with config.json and not one of the "
                    f"stored hub configs ({', '.join(known)}). Download its config.json into a dir and point the "
                    f"recipe at it, or add vlm/plan/hf_configs/{path.replace('/', '--')}/config.json.")


def _config_dict(kind: str, where: Any) -> dict[str, Any]:
    return _read_json((Path(where) if kind == "dir" else stored_dir(where)) / "config.json")


def _vision_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """HF config kwargs of the vision tower (a two-tower checkpoint's `vision_config`)."""
    inner = config.get("vision_config") or config
    keep = {k: v for k, v in inner.items() if k not in _DROP}
    if (config.get("model_type") or inner.get("model_type")) == "dinov2_with_registers":
        keep.setdefault("num_register_tokens", 4)
    return keep


def meta_encoder_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """An encoder config with every `path` replaced by the random-init `config` of the same architecture."""
    cfg = copy.deepcopy(dict(cfg))
    if cfg.get("type") == "fused":
        cfg["encoders"] = [meta_encoder_cfg(sub) for sub in cfg.get("encoders") or []]
        return cfg
    path = cfg.get("path")
    if path is None:
        return cfg
    kind, where = config_source(str(path))
    cfg.pop("path")
    if cfg.get("type") == "timm":
        if kind == "timm":
            cfg["model"] = where
            return cfg
        if kind == "hf":
            raise UserError(f"vlm plan: timm encoder path {path!r} is not a local timm dir; plan cannot read it.")
        info = _config_dict(kind, where)
        cfg["model"] = info["architecture"]
        extra = {k: v for k, v in (info.get("model_args") or {}).items() if k not in {"num_classes", "global_pool"}}
        if extra:
            cfg["config"] = {**extra, **(cfg.get("config") or {})}
        return cfg
    if kind == "timm":
        raise UserError(f"vlm plan: encoder path {path!r} is a timm model but the encoder type is {cfg.get('type')!r}.")
    cfg["config"] = _vision_kwargs(_config_dict(kind, where))
    return cfg


def _tokenizer_facts(kind: str, where: Any) -> dict[str, Any]:
    f = stored_dir(where) / "tokenizer_facts.json"
    if not f.is_file():
        raise UserError(f"vlm plan: {where!r} has a stored config but no tokenizer_facts.json (vocabulary size); add "
                        f"it next to vlm/plan/hf_configs/{where.replace('/', '--')}/config.json.")
    return _read_json(f)


def _tokenizer_rows(spec: str) -> int | None:
    """Embedding rows `build_llm` ends with for this tokenizer: `len(tokenizer)` after adding `<image>`; None when
    the tokenizer is not on this machine."""
    if not spec.startswith("builtin:") and not Path(spec).expanduser().is_dir():
        return None
    tok = load_tokenizer(spec)
    return len(tok) + (0 if IMAGE_TOKEN in tok.get_vocab() else 1)


def meta_llm_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """An llm config for a random init of the same architecture. Its `vocab_size` already holds the rows the
    real tokenizer needs, so `build_llm` does not resize (its mean-initialised resize cannot run on meta)."""
    cfg = copy.deepcopy(dict(cfg))
    path = cfg.pop("path", None)
    if path is None:
        return cfg
    kind, where = config_source(str(path))
    config = {k: v for k, v in _config_dict(kind, where).items() if k not in _DROP - {"model_type"}}
    if "model_type" not in config or "vocab_size" not in config:
        raise UserError(f"vlm plan: the config of {path!r} has no model_type or vocab_size.")
    spec = cfg.get("tokenizer") or (str(where) if kind == "dir" else None)
    rows = _tokenizer_rows(str(spec)) if spec else None
    if rows is None:
        facts = _tokenizer_facts("hf", where if kind == "hf" else str(path))
        rows = int(facts["len"]) + 1  # <image> is in none of these vocabularies
        spec = f"builtin:{facts['family']}"  # stands in for the chat template and special tokens only
    cfg["tokenizer"] = spec
    config["vocab_size"] = max(int(config["vocab_size"]), rows)
    cfg["config"] = config
    return cfg


def meta_model_cfg(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {**dict(model_cfg), "encoder": meta_encoder_cfg(model_cfg["encoder"]), "llm": meta_llm_cfg(model_cfg["llm"])}


def build_meta_vlm(model_cfg: Mapping[str, Any]) -> Any:
    """The recipe's VLM with every parameter on the meta device, built by the training's `build_vlm`."""
    with torch.device("meta"):
        return build_vlm(meta_model_cfg(model_cfg))

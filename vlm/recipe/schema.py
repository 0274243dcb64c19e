"""Recipe schema: OmegaConf composition + typed dataclasses, validated before any compute.

A recipe file may list base files under `defaults:` (relative to the file, then to the project's
`recipes/` dir); they are merged in order, then the file's own body, then `key=value` overrides.
The merged tree is checked against the dataclasses below: unknown keys name the nearest valid key,
types and choices are enforced, defaults are filled in. `load_recipe` returns the resolved DictConfig.

    cfg = load_recipe("recipes/smoke.yaml", ["stages.align.optim.lr=1e-3"])
"""
from __future__ import annotations

import difflib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlm.config import Check, NonNegative, Positive, Range, check
from vlm.errors import UserError
from vlm.model.chat import TemplateName
from vlm.model.vlm import check_model_config
from vlm.recipe.freeze import check_policy_static
from vlm.world.synth.world import synth_dir

RECIPES_ROOT = Path(__file__).resolve().parents[2] / "recipes"


def _synth_world(preset: str = "tiny", seed: int = 0) -> str:
    """`${synth_world:tiny,0}`: the dir of the generated world (materialised once), e.g. for eval task paths."""
    return str(synth_dir({"preset": str(preset), "seed": int(seed), "cache_dir": None}))


if hasattr(OmegaConf, "register_resolver"):  # omegaconf >= 2.4
    OmegaConf.register_resolver("synth_world", _synth_world, replace=True)
else:
    OmegaConf.register_new_resolver("synth_world", _synth_world, replace=True)


# --------------------------------------------------------------------------- schema
@dataclass
class ModulePolicy:
    """How one module (`vision`, `connector`, `llm`) is trained in a stage. A bare string is `mode`."""

    mode: Literal["frozen", "full", "lora", "partial"] = "frozen"
    lr: Optional[NonNegative] = None  # default: the stage's optim.lr
    weight_decay: Optional[NonNegative] = None  # default: the stage's optim.weight_decay
    r: Positive = 8  # lora rank
    alpha: Annotated[float, Range(gt=0)] = 16.0  # lora alpha
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0  # lora dropout
    target_modules: Optional[list[str]] = None  # lora targets (peft names); null = all linear layers
    k: Positive = 1  # partial: train the last k blocks


@dataclass
class FreezePolicy:
    vision: ModulePolicy = field(default_factory=ModulePolicy)
    connector: ModulePolicy = field(default_factory=lambda: ModulePolicy(mode="full"))
    llm: ModulePolicy = field(default_factory=ModulePolicy)


@dataclass
class MixtureItem:
    """One component of a stage's data mixture. A bare string is `dataset`."""

    dataset: str = "???"  # a key of `datasets`
    weight: Annotated[float, Range(gt=0)] = 1.0  # sampling multiplier on the component's size (2.0 = every sample twice an epoch)
    max_samples: Optional[Positive] = None  # cap on the component before weighting


@dataclass
class Optim:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: Annotated[float, Range(gt=0)] = 1e-3
    weight_decay: NonNegative = 0.0
    betas: Annotated[list[Annotated[float, Range(ge=0, lt=1)]], Check(lambda b: len(b) == 2, "two numbers")] = \
        field(default_factory=lambda: [0.9, 0.999])
    eps: Annotated[float, Range(gt=0)] = 1e-8
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: Annotated[float, Range(ge=0, le=1)] = 0.03
    max_grad_norm: Optional[Annotated[float, Range(gt=0)]] = 1.0  # null = no clipping


@dataclass
class StageSection:
    """One entry of the recipe's `stages:` (not to be confused with a stage being trained, `vlm.train.steps`)."""

    enabled: bool = True
    data: list[MixtureItem] = field(default_factory=list)
    freeze: FreezePolicy = field(default_factory=FreezePolicy)
    optim: Optim = field(default_factory=Optim)
    max_steps: Optional[Positive] = None  # optimizer steps; null = `epochs` passes over the mixture
    epochs: Annotated[float, Range(gt=0)] = 1.0
    batch_size: Positive = 8  # per device, per micro-step
    grad_accum: Positive = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    max_length: Positive = 2048  # tokens after image expansion; longer text is cut (never image tokens) and counted
    chat_template: Optional[TemplateName] = None  # template for this stage's data (e.g. plain); null = the LLM's own
    save_every: Annotated[int, Range(ge=0)] = 0  # checkpoint every N optimizer steps (0 = only at the end)
    # frozen-encoder feature cache: null = where it pays (more than one pass over the images), true = also on one
    # pass (e.g. several runs' stages on the same images), false = never
    feature_cache: Optional[bool] = None


@dataclass
class Dataset:
    """A named data source. `type`: `llava` (JSON/JSONL conversations), `hf` (datasets.load_dataset), `synth`."""

    type: Literal["llava", "hf", "synth"] = "llava"
    path: Optional[str] = None  # llava: file or hf://<repo>/<file>; hf: hub id or builder (json, parquet, ...)
    image_root: Optional[str] = None  # dir image paths are relative to (default: the file's dir)
    name: Optional[str] = None  # hf config name
    split: str = "train"
    data_files: Optional[list[str]] = None  # hf: local files
    columns: dict[str, str] = field(default_factory=dict)  # hf: our field -> dataset column
    prompt: str = "<image>\nDescribe the image."  # hf caption datasets: the user turn
    # front: a turn holding <image> is trained as "<image>\n" + its text (LLaVA's preprocess_multimodal); keep: as written
    image_position: Literal["front", "keep"] = "front"
    seed: int = 0  # synth
    preset: str = "tiny"  # synth
    file: str = "captions_dense.json"  # synth: which file of the world
    cache_dir: Optional[str] = None  # synth: where worlds are materialised


@dataclass
class Data:
    on_error: Literal["raise", "skip"] = "raise"
    group_by_length: bool = True
    num_workers: Optional[int] = None  # DataLoader workers per process (tokenise, decode, transform); null = auto
    cache_dir: Optional[str] = None  # parsed record tables + URL images (default $VLM_DATA_CACHE, ~/.cache/vlm-ablate/data)
    url_timeout: float = 10.0  # URL images: seconds per request
    url_retries: int = 3  # URL images: retries after a timeout, connection error, 5xx or 429
    url_backoff: float = 1.0  # URL images: first retry delay (s), doubled per retry
    url_threads: int = 32  # URL images: parallel downloads


@dataclass
class Model:
    encoder: dict[str, Any] = field(default_factory=dict)
    connector: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)


@dataclass
class Distributed:
    strategy: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = "ddp"
    num_processes: Optional[Positive] = None  # processes the grid launcher starts per run (accelerate launch)


@dataclass
class Eval:
    tasks: list[Any] = field(default_factory=list)  # run after the last stage (eval.runner task specs)
    quick_tasks: list[Any] = field(default_factory=list)  # run every `every_steps` during training
    every_steps: Annotated[int, Range(ge=0)] = 0


@dataclass
class RunSection:
    """The recipe's `run:` section (not to be confused with a training run's state, `vlm.train.steps`)."""

    name: str = "run"
    seed: int = 0
    out_root: str = "runs"  # default parent of the run dir when `--out` is not given
    artifact_store: Optional[str] = None  # shared stage artifacts (default: RUN_DIR/artifacts)
    feature_cache_dir: Optional[str] = None  # default: ~/.cache/vlm-ablate/features
    log_every: Positive = 1
    progress: bool = True
    trackers: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    keep_final_checkpoints: bool = True  # false: drop a stage's checkpoints once its artifact is in place


@dataclass
class Recipe:
    run: RunSection = field(default_factory=RunSection)
    model: Model = field(default_factory=Model)
    datasets: dict[str, Dataset] = field(default_factory=dict)
    data: Data = field(default_factory=Data)
    stages: dict[str, StageSection] = field(default_factory=dict)
    distributed: Distributed = field(default_factory=Distributed)
    eval: Eval = field(default_factory=Eval)


# --------------------------------------------------------------------------- composition
def read_yaml(path: Path, where: str) -> dict:
    if not path.is_file():
        raise UserError(f"recipe file {path} not found ({where}); check the path.")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OmegaConfBaseException, Exception) as e:  # yaml.YAMLError and friends
        raise UserError(f"cannot parse recipe {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping at the top level, got {type(data).__name__}.")
    return data


def _find_base(entry: str, including: Path) -> Path:
    for root in (including.parent, RECIPES_ROOT):
        cand = (root / entry).resolve()
        if cand.is_file():
            return cand
    raise UserError(f"base file {entry!r} listed in `defaults` of {including} not found next to it or under "
                    f"{RECIPES_ROOT}; fix the path.")


def _normalise(layer: dict) -> dict:
    """Expand shorthands so layers merge key-wise: `llm: full` -> `llm: {mode: full}`; `data: x` -> list."""
    for stage in (layer.get("stages") or {}).values() if isinstance(layer.get("stages"), dict) else ():
        if not isinstance(stage, dict):
            continue
        fr = stage.get("freeze")
        if isinstance(fr, dict):
            for m, v in list(fr.items()):
                if isinstance(v, str):
                    fr[m] = {"mode": v}
        d = stage.get("data")
        if isinstance(d, str):
            d = [d]
        if isinstance(d, list):
            stage["data"] = [{"dataset": x} if isinstance(x, str) else x for x in d]
    return layer


def _compose_file(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    path = path.resolve()
    if path in seen:
        raise UserError(f"recipe {path} includes itself through `defaults`: {' -> '.join(map(str, seen + (path,)))}.")
    body = read_yaml(path, "recipe" if not seen else f"included from {seen[-1]}")
    defaults = body.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise UserError(f"`defaults` in {path} must be a list of file paths, got {defaults!r}.")
    layers: list[dict] = []
    for d in defaults:
        layers += _compose_file(_find_base(d, path), seen + (path,))
    return layers + [_normalise(body)]


def _apply_override(cfg: DictConfig, ov: str) -> None:
    """`key=value`: a mapping value replaces the node, anything else is set. `stages.<i>.` may index stages;
    a bare string for `stages.<s>.freeze.<module>` sets its mode only (keeping its lr and friends)."""
    if "=" not in ov:
        raise UserError(f"override {ov!r} is not of the form key=value (e.g. run.seed=1).")
    key = ov.split("=", 1)[0].strip()
    try:
        value: Any = OmegaConf.to_container(OmegaConf.from_dotlist([ov]))
    except OmegaConfBaseException as e:
        raise UserError(f"cannot parse override {ov!r}: {e}") from None
    parts = key.split(".")
    for part in parts:
        value = value[part]
    if len(parts) > 1 and parts[0] == "stages" and parts[1].isdigit():
        names = list(cfg.get("stages") or {})
        if int(parts[1]) >= len(names):
            raise UserError(f"override {ov!r}: stage index {parts[1]} but the recipe has {len(names)} stages "
                            f"({', '.join(names)}).")
        parts[1] = names[int(parts[1])]
    if len(parts) == 4 and parts[0] == "stages" and parts[2] == "freeze" and isinstance(value, str):
        parts.append("mode")
    if len(parts) == 3 and parts[0] == "stages" and parts[2] == "data":
        value = _normalise({"stages": {"s": {"data": value}}})["stages"]["s"]["data"]
    try:
        OmegaConf.update(cfg, ".".join(parts), value, merge=not isinstance(value, dict))
    except OmegaConfBaseException as e:
        raise UserError(f"cannot apply override {ov!r}: {e}") from None


def compose(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Merge base files and the recipe body, apply `key=value` overrides; a plain (unvalidated) dict."""
    try:
        merged = OmegaConf.merge(*[OmegaConf.create(layer) for layer in _compose_file(Path(path))])
    except OmegaConfBaseException as e:
        raise UserError(f"cannot compose recipe {path}: {e}") from None
    for ov in overrides:
        _apply_override(merged, ov)
    try:
        return _normalise(OmegaConf.to_container(merged, resolve=True))
    except OmegaConfBaseException as e:
        raise UserError(f"cannot resolve recipe {path}: {e}") from None


# --------------------------------------------------------------------------- validation
def _check_semantics(cfg: dict, where: str, check_files: bool = True) -> None:
    stages = cfg["stages"]
    if not stages or not any(s["enabled"] for s in stages.values()):
        raise UserError(f"recipe {where} has no enabled stage under `stages:`; add one (see docs/recipes.md).")
    check_model_config(cfg["model"], "model")
    used = {item["dataset"] for st in stages.values() if st["enabled"] for item in st["data"]}
    for name, ds in cfg["datasets"].items():
        if name in used and check_files:  # a data file may define more sources than a recipe uses
            _check_dataset(name, ds)
    for sname, st in stages.items():
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", sname):
            raise UserError(f"stage name {sname!r} may only hold letters, digits, '_' and '-'.")
        if not st["enabled"]:
            continue
        if not st["data"]:
            raise UserError(f"stages.{sname}.data is empty; list dataset names from `datasets:`.")
        for i, item in enumerate(st["data"]):
            if item["dataset"] not in cfg["datasets"]:
                close = difflib.get_close_matches(item["dataset"], list(cfg["datasets"]), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise UserError(f"stages.{sname}.data[{i}] names dataset {item['dataset']!r}, which is not defined "
                                f"under `datasets:`.{hint} Defined: {', '.join(cfg['datasets']) or 'none'}.")
        check_policy_static(st["freeze"], f"stages.{sname}.freeze")
    for tracker in cfg["run"]["trackers"]:
        pkgs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[tracker]
        if not any(importlib.util.find_spec(p) for p in pkgs):
            raise UserError(f"run.trackers lists {tracker}, but {pkgs[0]} is not installed; `pip install {pkgs[0]}` "
                            "or remove it from run.trackers.")
    _check_quantized_llm(cfg)
    if cfg["distributed"]["strategy"].startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"distributed.strategy = {cfg['distributed']['strategy']} needs DeepSpeed, which is not "
                            "installed; `pip install deepspeed` (or `.[deepspeed]`) or use ddp / fsdp.")
        on = [st for st in stages.values() if st["enabled"]]
        if any(st["grad_accum"] != 1 for st in on) or len({st["optim"]["max_grad_norm"] for st in on}) != 1 \
                or len({st["batch_size"] for st in on}) != 1:
            raise UserError(f"distributed.strategy {cfg['distributed']['strategy']}: DeepSpeed fixes the micro-batch, "
                            "accumulation and clipping for the whole run; use grad_accum: 1 and the same batch_size "
                            "and optim.max_grad_norm in every stage (or ddp / fsdp).")


def _check_quantized_llm(cfg: dict) -> None:
    """QLoRA: a 4-bit LLM trains only through LoRA adapters, and only under ddp or ZeRO-2 (bitsandbytes' packed
    weights are not sharded by FSDP or partitioned by ZeRO-3 here)."""
    q = cfg["model"]["llm"].get("quantization")
    if q is None:
        return
    for sname, st in cfg["stages"].items():
        mode = st["freeze"]["llm"]["mode"]
        if st["enabled"] and mode in ("full", "partial"):
            raise UserError(f"stages.{sname}.freeze.llm: {mode} cannot train a 4-bit LLM (model.llm.quantization: "
                            f"{q}); use mode: lora (QLoRA) or frozen.")
    strategy = cfg["distributed"]["strategy"]
    if strategy in ("fsdp", "deepspeed_zero3"):
        raise UserError(f"distributed.strategy: {strategy} cannot shard a 4-bit LLM (model.llm.quantization: "
                        f"{q}); use ddp or deepspeed_zero2 (the quantized LLM fits each GPU whole).")


def _check_dataset(name: str, ds: dict) -> None:
    where = f"datasets.{name}"
    if ds["type"] == "llava":
        p = ds["path"]
        if not p:
            raise UserError(f"{where}.path is required for a llava dataset (a .json/.jsonl file or hf://repo/file).")
        if not p.startswith("hf://") and not Path(p).expanduser().is_file():
            raise UserError(f"{where}.path: file {p} not found; fix the path (relative paths are relative to the "
                            "working directory).")
    elif ds["type"] == "hf":
        if not ds["path"]:
            raise UserError(f"{where}.path is required for an hf dataset (hub id, local dir, or a builder like json).")
        for f in ds["data_files"] or []:
            if not Path(f).expanduser().exists():
                raise UserError(f"{where}.data_files: {f} not found; fix the path.")
    if ds["image_root"] and not Path(ds["image_root"]).expanduser().is_dir():
        raise UserError(f"{where}.image_root: directory {ds['image_root']} not found; fix the path.")


def validate(raw: dict, where: str = "recipe", check_files: bool = True) -> dict:
    """Check a composed dict against the schema; return it with defaults filled in. `check_files=False` skips the
    checks that the datasets' files exist (`vlm plan` prices a recipe on a machine without its data)."""
    cfg = check(raw, Recipe, "")
    _check_semantics(cfg, where, check_files)
    return cfg


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose, resolve and validate a recipe (no model is built). Raises UserError on any problem."""
    return OmegaConf.create(validate(compose(path, overrides), str(path)))


def plain(cfg: Any) -> Any:
    """A recipe node as plain Python containers (a DictConfig is resolved; anything else is returned as is)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def enabled_stages(cfg: DictConfig | dict) -> list[str]:
    return [name for name, st in cfg["stages"].items() if st["enabled"]]

"""Training: run a recipe's stages into a run dir (the library side of `vlm train`), as named steps.

    train(cfg, run_dir)                      every stage, eval, manifest; resumes from the last checkpoint
      train_stage(run, vlm, name, st, ...)   one stage = setup_stage -> run_stage -> save_artifact -> finish
        setup_training(vlm, st, total, strategy)   freeze policy, fp32 master weights, wrapping, optimizer, schedule
        train_step(state, micro_batches)           one optimizer step (what benchmarks time)

Everything is validated (schema, freeze policies on the built model, data sources) before the run dir is
created. Each enabled stage starts from the previous stage's artifact; an artifact lives in the artifact store
under a key that hashes everything that determines it (`vlm.recipe.keys.stage_keys`, the process count
included), so runs sharing a stage reuse it, and a file lock keeps two runs from training the same one at once.

Precision: parameters a stage trains are held in fp32 (master weights, fp32 optimizer state) whatever dtype their
module is stored in (`llm.dtype`); the compute runs in the stage's `precision` (autocast, and FSDP's
mixed-precision policy). Frozen modules stay in their stored dtype. The artifact holds the fp32 master weights;
after the stage the model goes back to its stored dtypes, exactly as `load_run` rebuilds it.
"""
from __future__ import annotations

import functools
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from encoders.base import VisionEncoder
from eval.runner import check_recipe_tasks, evaluate
from vlm.data.datasets import (
    TrainSet, build_mixture, collate, default_num_workers, epoch_batches, load_source, micro_batch, steps_per_epoch,
    total_steps,
)
from vlm.config import DTYPES
from vlm.errors import UserError
from vlm.io import append_jsonl, atomic_save_safetensors, atomic_write_json, atomic_write_text, read_json, read_jsonl
from vlm.recipe.freeze import (MODULES, apply_policy, check_policy_model, has_lora, merge_lora, module_of,
                               set_train_modes, trained_buffer_names)
from vlm.recipe.keys import stage_keys
from vlm.recipe.schema import enabled_stages, plain
from vlm.train.checkpoint import (latest_checkpoint, load_trained_state, read_checkpoint, read_partition, rng_state,
                                  save_checkpoint, set_rng_state, staging_dir, write_partition)
from vlm.train.feature_cache import FeatureCache, default_root
from vlm.train import stop
from vlm.train.provenance import config_sha256, git_revision, hardware, versions
from vlm.train.run_dir import apply_artifact, artifact_complete, artifact_store, build_model, set_seed
from vlm.train.strategy import Strategy, build_optimizer, make_strategy
from vlm.train.sync import collective_lock


def autocast_dtype(precision: str) -> torch.dtype | None:
    """A stage's `precision` -> the autocast dtype (`None` for fp32: no autocast)."""
    return None if precision == "fp32" else DTYPES[precision]


__all__ = ["train", "train_stage", "setup_stage", "run_stage", "save_artifact", "setup_training", "train_step",
           "finish_training", "lr_lambda", "lr_schedule", "build_optimizer", "collective_lock", "Run", "TrainState",
           "StepStats", "autocast_dtype"]


# --------------------------------------------------------------------------- schedule
def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The LR multiplier at optimizer step `step`: linear warmup over `warmup` steps, then cosine, linear or
    constant."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


def lr_schedule(optimizer: torch.optim.Optimizer, optim: dict, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The stage's schedule (`optim`: a recipe's `Optim`; warmup = round(warmup_ratio x total))."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim["scheduler"], int(round(optim["warmup_ratio"] * total)), total))


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------- one optimizer step
@dataclass
class TrainState:
    """One stage set up for training: what `setup_training` builds and `train_step` advances."""

    vlm: Any  # the model (under fsdp: itself sharded in place)
    model: Any  # what the forward is called on: the vlm, its DDP wrapper or its DeepSpeed engine
    optimizer: Any
    scheduler: Any
    strategy: Strategy
    freeze: dict
    max_grad_norm: float | None
    dtype: torch.dtype | None  # compute dtype (autocast); None = fp32
    scaler: Any = None  # fp16 only
    storage: dict[str, torch.dtype] = field(default_factory=dict)  # upcast parameters -> their stored dtype
    checkpointed: list = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)  # saved with the trained parameters (BatchNorm statistics)


def _upcast_trained(vlm: Any, precision: str) -> dict[str, torch.dtype]:
    """fp32 master weights: cast trained low-precision parameters to fp32 (under an fp32 stage their whole module,
    so the stage computes in fp32 as asked); return what was cast and from which dtype."""
    cast: dict[str, torch.dtype] = {}
    for m in MODULES:
        mod = module_of(vlm, m)
        named = list(mod.named_parameters())
        if not any(p.requires_grad and p.is_floating_point() and p.dtype != torch.float32 for _, p in named):
            continue
        prefix = {id(p): n for n, p in vlm.named_parameters()}
        for _, p in named:
            if p.is_floating_point() and p.dtype != torch.float32 and (p.requires_grad or precision == "fp32"):
                cast[prefix[id(p)]] = p.dtype
                p.data = p.data.float()
    return cast


def _checkpointable(vlm: Any, st: dict) -> list[Any]:
    """The HF models whose activations are recomputed: the LLM, and a trained HF vision backbone."""
    out = [vlm.language_model]
    backbone = getattr(vlm.encoder, "model", None)
    if st["freeze"]["vision"]["mode"] != "frozen" and getattr(backbone, "supports_gradient_checkpointing", False):
        out.append(backbone)
    return out


def setup_training(vlm: Any, st: dict, total: int, strategy: Strategy, where: str = "stage") -> TrainState:
    """Set `vlm` up to train one stage (`st`: a recipe's `Stage`, or a dict with its `freeze`, `optim`,
    `precision` and `gradient_checkpointing`): apply the freeze policy, hold trained weights in fp32, turn on
    gradient checkpointing, wrap the model with the strategy, build the optimizer and the LR schedule."""
    groups = apply_policy(vlm, st["freeze"], st["optim"], f"{where}.freeze")
    buffers = trained_buffer_names(vlm, st["freeze"])
    storage = _upcast_trained(vlm, st["precision"])
    checkpointed = _checkpointable(vlm, st) if st.get("gradient_checkpointing") else []
    for m in checkpointed:
        kw = {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model, optimizer = strategy.prepare(vlm, groups, st)
    scheduler = lr_schedule(strategy.inner_optimizer(optimizer), st["optim"], total)
    scaler = torch.amp.GradScaler(strategy.acc.device.type) if st["precision"] == "fp16" else None
    return TrainState(vlm=vlm, model=model, optimizer=optimizer, scheduler=scheduler, strategy=strategy,
                      freeze=st["freeze"], max_grad_norm=st["optim"]["max_grad_norm"], dtype=autocast_dtype(st["precision"]),
                      scaler=scaler, storage=storage, checkpointed=checkpointed, buffers=buffers)


def finish_training(state: TrainState) -> None:
    """Undo the stage's training setup on an unsharded model: gradient checkpointing off, parameters back to their
    stored dtype, LoRA adapters dropped unmerged (`apply_artifact` injects, loads and merges them once)."""
    for m in state.checkpointed:
        (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()
    state.strategy.acc.free_memory()
    if state.strategy.sharded:  # the sharded model is replaced by a rebuilt one (see `train`)
        return
    params = dict(state.vlm.named_parameters())
    for n, dtype in state.storage.items():
        if n in params:
            params[n].data = params[n].data.to(dtype)
    for m in MODULES:
        if has_lora(module_of(state.vlm, m)):
            merge_lora(module_of(state.vlm, m), merge=False)


@dataclass
class StepStats:
    """What one optimizer step reports; counts are summed over all processes."""

    loss: float  # token-mean cross-entropy over the global batch
    grad_norm: float  # before clipping, over all trained parameters of all processes
    lrs: dict[str, float]  # per parameter group, the rates this step used
    target_tokens: float  # labelled tokens (at least 1)
    samples: float
    input_tokens: float  # attended (unpadded) tokens


class NonFiniteLoss(UserError):
    def __init__(self, loss: float) -> None:
        super().__init__(f"loss is {loss}; training stopped before the optimizer step. Lower the learning rate, "
                         "raise warmup, or use bf16/fp32 instead of fp16.")
        self.loss = loss


def train_step(state: TrainState, micro_batches: list[dict], cache: Any = None) -> StepStats:
    """One optimizer step over this process's micro-batches (`vlm.data.datasets.collate` output).

    Each micro-batch's summed token cross-entropy is divided by the global batch's target-token count (times the
    process count, which the data-parallel gradient mean divides out), so gradient accumulation and data
    parallelism give the token mean of one large batch. Gradients are synchronised on the last micro-batch only;
    then unscale (fp16), clip by the global norm, step, zero_grad and scheduler step. Frozen modules run in eval
    mode. Raises `NonFiniteLoss` (before stepping) when the loss is not finite.
    """
    s, acc = state.strategy, state.strategy.acc
    world, accum = acc.num_processes, len(micro_batches)
    counts = torch.tensor([float(sum(b["num_target_tokens"] for b in micro_batches)),
                           float(sum(b["num_samples"] for b in micro_batches)),
                           float(sum(int(b["attention_mask"].sum()) for b in micro_batches))], device=acc.device)
    n_tok, n_samples, n_inputs = acc.reduce(counts, "sum").tolist()
    n_tok = max(n_tok, 1.0)
    inner = s.inner_optimizer(state.optimizer)
    loss_sum = torch.zeros((), device=acc.device)
    state.model.train()
    set_train_modes(state.vlm, state.freeze)  # frozen modules and blocks stay in eval mode (dropout off, BatchNorm
    # statistics fixed)
    for a, b in enumerate(micro_batches):
        with s.no_sync(state.model, sync=a == accum - 1):
            with torch.autocast(acc.device.type, dtype=state.dtype) if state.dtype is not None else nullcontext():
                kw = _image_inputs(state.vlm, b, cache, acc.device)
                out = state.model(input_ids=b["input_ids"].to(acc.device),
                                  attention_mask=b["attention_mask"].to(acc.device),
                                  labels=b["labels"].to(acc.device), label_loss_sum=True, **kw)
            tok_loss = out.loss  # summed cross-entropy over labelled tokens; the LM head runs only there
            loss = tok_loss * world / n_tok
            s.backward(state.model, state.scaler.scale(loss) if state.scaler is not None else loss)
        loss_sum += tok_loss.detach().float()
    global_loss = float(acc.reduce(loss_sum, "sum")) / n_tok
    if not math.isfinite(global_loss):
        raise NonFiniteLoss(global_loss)
    if state.scaler is not None:
        state.scaler.unscale_(inner)
    lrs = {g["name"]: g["lr"] for g in inner.param_groups}
    grad_norm = s.clip_and_step(state.model, state.optimizer, [p for p in state.vlm.parameters() if p.requires_grad],
                                state.max_grad_norm, state.scaler)
    state.scheduler.step()
    return StepStats(loss=global_loss, grad_norm=grad_norm, lrs=lrs, target_tokens=n_tok, samples=n_samples,
                     input_tokens=n_inputs)


def _image_inputs(vlm: Any, batch: dict, cache: Any, device: torch.device) -> dict:
    if not batch["images"]:
        return {}
    if isinstance(batch["images"][0], torch.Tensor):  # transformed in the DataLoader workers
        def prep(ims: Any) -> Any:
            return torch.stack(list(ims)).to(vlm.device)
    else:
        prep = vlm.preprocess
    if cache is None:
        return {"pixels": prep(batch["images"])}
    feats = cache.get_or_compute(batch["image_keys"], batch["images"],
                                 lambda ims: vlm.encoder_features(prep(ims)))
    return {"image_features": feats.to(device)}


def _worker_transform(vlm: Any) -> Any:
    """The encoder's PIL → tensor transform when its `preprocess` is just that transform stacked (then it runs in
    the DataLoader workers); None for encoders with their own `preprocess` (fused), which run it here."""
    enc = vlm.encoder
    plain_preprocess = getattr(type(enc), "preprocess", None) is VisionEncoder.preprocess
    return getattr(enc, "transform", None) if plain_preprocess else None


def _next_batch(batches: Any) -> dict:
    """The next micro-batch; a UserError raised in a DataLoader worker keeps its own message (not the worker's
    traceback that torch wraps around it)."""
    try:
        return next(batches)
    except UserError as e:
        msg = str(e)
        if "Original Traceback" in msg:
            msg = msg.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        raise UserError(msg) from None


# --------------------------------------------------------------------------- the run
def _make_accelerator(cfg: dict, run_dir: Path) -> Accelerator:
    """accelerate starts the processes' group; the strategy's own library wraps the model (`vlm.train.strategy`)."""
    kwargs: dict[str, Any] = {}
    if cfg["distributed"]["strategy"] == "ddp":  # text-only batches leave the encoder and connector unused
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    trackers = list(cfg["run"]["trackers"])
    acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers or None, project_dir=str(run_dir), **kwargs)
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UserError(f"the launcher's accelerate config selects {acc.distributed_type.value}, but the recipe's "
                        f"distributed.strategy ({cfg['distributed']['strategy']}) decides how the model is "
                        "distributed; launch without --use_fsdp / --use_deepspeed (or a config that sets them) and "
                        "set distributed.strategy instead.")
    return acc


class Run:
    """State shared by the stages of one `vlm train`."""

    def __init__(self, cfg: dict, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.acc = _make_accelerator(cfg, run_dir)
        self.main = self.acc.is_main_process
        self.manifest: dict = {}
        self.done: list[tuple[str, Path]] = []  # (stage, artifact) of the stages finished so far

    def status(self, **kw: Any) -> None:
        if self.main:
            atomic_write_json(self.run_dir / "status.json", {**kw, "updated": time.time()})

    def log(self, record: dict) -> None:
        if self.main:
            append_jsonl(self.run_dir / "metrics.jsonl", {**record, "time": time.time()})
        if self.cfg["run"]["trackers"]:  # one curve per stage and metric: "align/loss", "align/lr/connector", ...
            flat = {}
            for k, v in record.items():
                for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)]):
                    if isinstance(vv, (int, float)) and not isinstance(vv, bool) and k != "step":
                        flat[f"{record.get('stage')}/{k}" + (f"/{kk}" if kk else "")] = vv
            self.acc.log(flat, step=record.get("step"))


def prepare(cfg: dict) -> tuple[Any, dict]:
    """Check the eval tasks, build the model, check every stage's policy on it, read every data source. No files
    written."""
    check_recipe_tasks(cfg)
    vlm = build_model(cfg)
    for name in enabled_stages(cfg):
        check_policy_model(vlm, cfg["stages"][name]["freeze"], f"stages.{name}.freeze")
    used = {item["dataset"] for n in enabled_stages(cfg) for item in cfg["stages"][n]["data"]}
    sources = {d: load_source(d, cfg["datasets"][d], cfg["data"]["on_error"], cfg["data"]) for d in sorted(used)}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name in enabled_stages(cfg):
        st = cfg["stages"][name]
        _check_batch(name, len(build_mixture(st["data"], sources, cfg["run"]["seed"])), st, world)
    return vlm, sources


def _check_batch(name: str, n: int, st: dict, world: int) -> None:
    gbs = st["batch_size"] * world * st["grad_accum"]
    if n < gbs:
        raise UserError(f"stage {name}: the data mixture has {n} samples, fewer than one global batch "
                        f"({st['batch_size']} x {world} processes x {st['grad_accum']} accumulation = {gbs}); "
                        "lower batch_size or add data.")


def _rebuild(cfg: dict, done: list[tuple[str, Path]]) -> Any:
    """The model of the finished stages, built as `load_run` builds it (after a sharded stage: a plain model)."""
    vlm = build_model(cfg)
    for name, art in done:
        apply_artifact(vlm, cfg["stages"][name], art)
    return vlm


def train(cfg: DictConfig | dict, run_dir: Path, evaluate: bool = True) -> Path:
    """Train every enabled stage of a validated recipe into `run_dir` (resuming if it holds a checkpoint), then
    evaluate `eval.tasks` unless `evaluate` is false. Raises `vlm.train.stop.Stopped` when asked to stop early."""
    cfg = plain(cfg)
    world, asked = int(os.environ.get("WORLD_SIZE", "1")), cfg["distributed"]["num_processes"]
    if asked is not None and asked != world:
        raise UserError(f"distributed.num_processes is {asked} but {world} process(es) were started; launch {asked} "
                        f"(`accelerate launch --num_processes {asked} -m vlm train ...`) or set it to null.")
    cfg["distributed"]["num_processes"] = world  # the run's recipe records its process count (artifact keys use it)
    resolved = OmegaConf.to_yaml(OmegaConf.create(cfg))
    if (run_dir / "recipe.yaml").is_file() and (run_dir / "recipe.yaml").read_text() != resolved:
        raise UserError(f"run dir {run_dir} holds a different recipe; resume it with its own recipe.yaml "
                        "(`vlm train RUN_DIR/recipe.yaml --out RUN_DIR`) or choose a new --out.")
    vlm, sources = prepare(cfg)
    run = Run(cfg, run_dir)
    if run.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", resolved)
    run.acc.wait_for_everyone()
    if cfg["run"]["trackers"]:
        run.acc.init_trackers(cfg["run"]["name"], config={"recipe": resolved})
    prior = read_json(run_dir / "manifest.json") if (run_dir / "manifest.json").is_file() else {}
    run.manifest = {
        "versions": versions(), "git_revision": git_revision(), "hardware": hardware(run.acc.num_processes),
        "data": {name: {"identity": s.identity, "records": len(s.records), "skipped_at_load": len(s.skipped),
                        "skipped_examples": s.skipped[:100]} for name, s in sources.items()},
        "model": {"config_sha256": config_sha256(cfg["model"]), "encoder_fingerprint": vlm.encoder.fingerprint()},
        "distributed": prior.get("distributed", {"strategy": cfg["distributed"]["strategy"],
                                                 "world_size": run.acc.num_processes,
                                                 "engaged": "none yet (no stage trained in this run dir)"}),
        "stages": prior.get("stages", {}), "started": prior.get("started", time.time()),
    }
    store = artifact_store(cfg, run_dir)
    keys = stage_keys(cfg)
    done = run.done
    try:
        for name, key in zip(enabled_stages(cfg), keys):
            st = cfg["stages"][name]
            art = store / key
            if run.main:
                store.mkdir(parents=True, exist_ok=True)
            t0, info = time.time(), {}
            with collective_lock(store / f"{key}.lock", main=run.main, device=run.acc.device):
                reused = artifact_complete(art)
                if not reused:
                    strategy, info = train_stage(run, vlm, name, st, sources, art)
                    run.manifest["distributed"] = strategy.describe()
                    run.acc.wait_for_everyone()
            done.append((name, art))
            if not reused and strategy.sharded:
                vlm = _rebuild(cfg, done)
            else:
                apply_artifact(vlm, st, art)
            if run.main:
                atomic_write_json(run_dir / "stages" / name / "artifact.json", {"key": key, "path": str(art.resolve())})
                if not cfg["run"]["keep_final_checkpoints"]:  # the artifact is what later stages and load_run use
                    shutil.rmtree(run_dir / "stages" / name / "checkpoints", ignore_errors=True)
                prev = run.manifest["stages"].get(name, {})
                run.manifest["stages"][name] = {**prev, **info, "key": key,
                                                "reused_artifact": reused and not prev.get("trained"),
                                                "trained": prev.get("trained", False) or not reused,
                                                "wall_s": prev.get("wall_s", 0.0) + (time.time() - t0)}
                atomic_write_json(run_dir / "manifest.json", run.manifest)
        if evaluate and cfg["eval"]["tasks"] and run.main:
            run.status(state="running", stage="eval")
            _evaluate(vlm.to(run.acc.device), cfg["eval"]["tasks"], run_dir)
    except stop.Stopped:
        raise  # status.json says "stopped"
    except BaseException as e:
        run.status(state="failed", error=f"{type(e).__name__}: {e}")
        raise
    run.manifest["finished"] = time.time()
    if run.main:
        atomic_write_json(run_dir / "manifest.json", run.manifest)
    run.status(state="done")
    run.acc.end_training()
    return run_dir


def _evaluate(vlm: Any, tasks: list, out_dir: Path) -> dict:
    was = vlm.training
    vlm.eval()
    with torch.random.fork_rng(), torch.no_grad():
        res = evaluate(vlm, tasks, out_dir)
    vlm.train(was)
    return res


# --------------------------------------------------------------------------- one stage
@dataclass
class Stage:
    """One stage set up in a run: its data plan, its `TrainState` and where it resumes."""

    name: str
    st: dict
    dataset: TrainSet
    lengths: list[int]
    global_batch: int
    steps_per_epoch: int
    total: int
    state: TrainState
    cache: FeatureCache | None
    cache_info: dict
    step: int = 0
    skipped: int = 0
    truncated: int = 0


def _cache_plan(run: Run, vlm: Any, st: dict, name: str, records: list, passes: float,
                strategy: Strategy) -> tuple[FeatureCache | None, dict]:
    """Cache frozen-encoder features only where they are read again: more than one pass over the images, or when
    asked (`feature_cache: true`, e.g. stages of several runs on the same images). States the size first."""
    if st["freeze"]["vision"]["mode"] != "frozen":
        return None, {"used": False, "why": "the vision module trains"}
    if st["feature_cache"] is False:
        return None, {"used": False, "why": "feature_cache: false"}
    if strategy.sharded:
        if st["feature_cache"]:
            raise UserError(f"stages.{name}.feature_cache: true is not supported under distributed.strategy "
                            f"{strategy.name} (the encoder is sharded, so every process must run it); set it to null "
                            "or false, or use ddp.")
        return None, {"used": False, "why": f"{strategy.name}: the encoder is sharded"}
    if st["feature_cache"] is None and passes <= 1:
        return None, {"used": False, "why": "one pass over the images (epochs <= 1): the cache would never be read"}
    dtype = autocast_dtype(st["precision"]) or torch.float32
    cache = FeatureCache(run.cfg["run"]["feature_cache_dir"] or default_root(), vlm.encoder.fingerprint(), dtype)
    images = len({ref if isinstance(ref, str) else id(ref) for r in records for ref in r.images})
    n, d = vlm.encoder.num_tokens, vlm.encoder.hidden_size
    size = images * n * d * dtype.itemsize
    info = {"used": True, "images": images, "estimated_bytes": size, "dtype": str(dtype).removeprefix("torch."),
            "dir": str(cache.dir)}
    if run.main:
        print(f"stage {name}: feature cache {cache.dir}: up to {images} images x {n} x {d} "
              f"{info['dtype']} = {size / 2**30:.2f} GiB ({size} bytes)", file=sys.stderr, flush=True)
    return cache, info


def setup_stage(run: Run, vlm: Any, name: str, st: dict, sources: dict) -> Stage:
    """Data plan, strategy, training state and feature cache of stage `name`; restores its latest checkpoint."""
    cfg, acc = run.cfg, run.acc
    seed = int(cfg["run"]["seed"])
    set_seed(seed + 1 + list(cfg["stages"]).index(name))
    records = build_mixture(st["data"], sources, seed)
    ds = TrainSet(records, vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens, st["max_length"],
                  cfg["data"]["on_error"], st["chat_template"], transform=_worker_transform(vlm))
    world = acc.num_processes
    gbs = st["batch_size"] * world * st["grad_accum"]
    _check_batch(name, len(ds), st, world)
    spe = steps_per_epoch(len(ds), gbs)
    total = total_steps(len(ds), gbs, st["epochs"], st["max_steps"])
    strategy = make_strategy(cfg["distributed"]["strategy"], acc, autocast_dtype(st["precision"]))
    cache, cache_info = _cache_plan(run, vlm, st, name, records, total / max(spe, 1), strategy)
    state = setup_training(vlm, st, total, strategy, f"stages.{name}")
    stage = Stage(name=name, st=st, dataset=ds, lengths=ds.lengths(), global_batch=gbs,
                  steps_per_epoch=spe, total=total, state=state, cache=cache, cache_info=cache_info,
                  skipped=len([s for d in {i["dataset"] for i in st["data"]} for s in sources[d].skipped]))
    ckpt = latest_checkpoint(run.run_dir / "stages" / name / "checkpoints")
    if ckpt is not None:
        weights, optim_state, saved = read_checkpoint(ckpt)
        where = f"checkpoint {ckpt}"
        if "distributed" in saved:  # checkpoints written before it was recorded: ddp / fsdp
            strategy.check_checkpoint(saved["distributed"], where)
        rng = saved["rng_state"]
        if strategy.partitioned:  # each process's own partition and RNG; the trained buffers of the main process
            part, meta = read_partition(ckpt, acc.process_index)
            strategy.load_partition(state.model, state.optimizer, part, meta, where)
            load_trained_state(strategy.unwrap(state.model), {n: weights[n] for n in state.buffers}, where)
            rng = ({k.removeprefix("rng."): v for k, v in part.items() if k.startswith("rng.")}, meta["rng"])
        else:
            strategy.load_state(state.model, state.optimizer, weights, optim_state, where)
        state.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(*rng)
        stage.step, stage.skipped = saved["step"], saved["skipped_samples"]
        stage.truncated = saved.get("truncated_samples", 0)
        if state.scaler is not None and saved.get("scaler"):
            state.scaler.load_state_dict(saved["scaler"])
    return stage


def _checkpoint(run: Run, stage: Stage, keep: int) -> None:
    """Save the stage's state at `stage.step` (a collective: every process gathers its shards; under deepspeed
    every process first writes its own partition into the staging dir, which the main process completes)."""
    s = stage.state
    root = run.run_dir / "stages" / stage.name / "checkpoints"
    staged = staging_dir(root, stage.step) if s.strategy.partitioned else None
    if staged is not None:
        tensors, meta = s.strategy.partition_state(s.model, s.optimizer)
        rt, rm = rng_state()  # this process's own
        write_partition(staged, run.acc.process_index, {**tensors, **{f"rng.{k}": v for k, v in rt.items()}},
                        {**meta, "rng": rm})
    weights = s.strategy.full_state(s.model, s.buffers)  # the full fp32 weights, as the stage artifact holds them
    optim_state = None if staged is not None else s.strategy.optimizer_state(s.model, s.optimizer)
    run.acc.wait_for_everyone()  # every partition written
    if run.main:
        epoch, pos = divmod(stage.step, stage.steps_per_epoch)
        save_checkpoint(root, stage.step, weights, optim_state,
                        {"epoch": epoch, "batch_in_epoch": pos, "skipped_samples": stage.skipped,
                         "truncated_samples": stage.truncated, "scheduler": s.scheduler.state_dict(),
                         "scaler": s.scaler.state_dict() if s.scaler is not None else None,
                         "distributed": s.strategy.checkpoint_info()}, keep=keep, staged=staged)
    run.acc.wait_for_everyone()


def _stop_agreed(acc: Any) -> bool:
    """Whether any process was asked to stop (`vlm.train.stop`); every process calls this after every step, so all
    stop after the same one."""
    asked = stop.requested()
    if acc.num_processes == 1:
        return asked
    return bool(acc.reduce(torch.tensor([1.0 if asked else 0.0], device=acc.device), "sum").item() > 0)


def _stop(run: Run, stage: Stage, saved: bool) -> None:
    """End the stage early on a stop request: checkpoint here (unless just saved) and raise `stop.Stopped`."""
    if not saved:
        _checkpoint(run, stage, keep=2)
    run.status(state="stopped", stage=stage.name, step=stage.step, total_steps=stage.total)
    raise stop.Stopped(f"stage {stage.name} stopped at step {stage.step}/{stage.total} on request; checkpoint saved "
                       f"in {run.run_dir / 'stages' / stage.name / 'checkpoints'}")


def run_stage(run: Run, stage: Stage) -> None:
    """Train `stage` from `stage.step` to its last step: batches, steps, logs, quick evals, checkpoints."""
    cfg, acc, st, name = run.cfg, run.acc, stage.st, stage.name
    seed, world, rank = int(cfg["run"]["seed"]), acc.num_processes, acc.process_index
    accum, spe, total = st["grad_accum"], stage.steps_per_epoch, stage.total
    pad_id = stage.state.vlm.tokenizer.pad_token_id if stage.state.vlm.tokenizer.pad_token_id is not None else 0
    stage_dir = run.run_dir / "stages" / name
    run.status(state="running", stage=name, step=stage.step, total_steps=total)
    bar = tqdm(total=total, initial=stage.step, desc=name, disable=not (run.main and cfg["run"]["progress"]),
               dynamic_ncols=True, file=sys.stderr)
    plan_epoch, batches = -1, iter(())
    eval_every, quick = cfg["eval"]["every_steps"], cfg["eval"]["quick_tasks"]
    cache = stage.cache
    workers = cfg["data"]["num_workers"]
    workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if workers is None else workers
    while stage.step < total:
        t0 = time.time()
        epoch, pos = divmod(stage.step, spe)
        if epoch != plan_epoch:  # this process's micro-batches for the rest of the epoch, loaded in order
            plan = epoch_batches(stage.lengths, stage.global_batch, seed, epoch, cfg["data"]["group_by_length"])
            plan_epoch = epoch
            mine = [micro_batch(plan[p], a, rank, world, st["batch_size"]) for p in range(pos, spe)
                    for a in range(accum)]
            # a private generator: starting an iterator must not draw from the global RNG (dropout), or a
            # run resumed mid-epoch would see different random numbers than an uninterrupted one
            batches = iter(torch.utils.data.DataLoader(
                stage.dataset, batch_sampler=mine, num_workers=workers,
                collate_fn=functools.partial(collate, pad_id=pad_id),
                generator=torch.Generator().manual_seed(seed + epoch)))
        micro = [_next_batch(batches) for _ in range(accum)]
        counts = torch.tensor([float(sum(len(b["broken"]) for b in micro)),
                               float(sum(b["num_truncated"] for b in micro))], device=acc.device)
        for b in micro:
            for why in b["broken"]:
                append_jsonl(stage_dir / f"skipped.rank{rank}.jsonl" if world > 1 else stage_dir / "skipped.jsonl",
                             {"step": stage.step, "sample": why})
        try:
            stats = train_step(stage.state, micro, cache=cache)
        except NonFiniteLoss as e:
            raise UserError(f"stage {name}: loss is {e.loss} at step {stage.step + 1}; training stopped. Lower the "
                            "learning rate, raise warmup, or use bf16/fp32 instead of fp16.") from None
        broken, truncated = acc.reduce(counts, "sum").tolist()
        stage.skipped += int(broken)
        stage.truncated += int(truncated)
        stage.step += 1
        dt = time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.4f}")
        if stage.step % cfg["run"]["log_every"] == 0 or stage.step == total:
            run.log({"stage": name, "step": stage.step, "epoch": epoch, "loss": stats.loss, "lr": stats.lrs,
                     "grad_norm": stats.grad_norm, "tokens_per_s": stats.input_tokens / dt,
                     "samples_per_s": stats.samples / dt, "peak_memory_mb": _peak_memory_mb(),
                     "skipped_samples": stage.skipped, "truncated_samples": stage.truncated,
                     "target_tokens": int(stats.target_tokens),
                     **({"feature_cache_hits": cache.hits, "feature_cache_misses": cache.misses} if cache else {})})
        if eval_every and quick and (stage.step % eval_every == 0 or stage.step == total):  # the curve ends at the stage's end
            model = _eval_model(run, stage)
            if run.main:
                res = _evaluate(model, quick, stage_dir / "eval" / f"step_{stage.step:08d}")
                run.log({"stage": name, "step": stage.step,
                         "eval": {t: r.get("score") for t, r in res.get("tasks", {}).items()},
                         **{k: res.get(k) for k in ("fine_grained", "general", "gap")}})
            acc.wait_for_everyone()
        saved = bool(st["save_every"] and stage.step % st["save_every"] == 0 and stage.step < total)
        if saved:
            _checkpoint(run, stage, keep=2)
            run.status(state="running", stage=name, step=stage.step, total_steps=total)
        if stage.step < total and _stop_agreed(acc):  # SLURM's warning signal or a stop file (vlm.train.stop)
            bar.close()
            _stop(run, stage, saved)
    bar.close()
    _checkpoint(run, stage, keep=1)  # the end state too (resume at the end = nothing left to do)


def _eval_model(run: Run, stage: Stage) -> Any:
    """The model a quick eval runs on (on the main process): the live one, or under fsdp / deepspeed a plain copy
    built as `load_run` builds a model, from the finished stages' artifacts and this stage's weights gathered from
    every process (a collective; the RNG state is kept, so the copy does not change the training)."""
    s = stage.state
    if not s.strategy.sharded:
        return s.vlm
    weights = s.strategy.full_state(s.model, s.buffers)
    if not run.main:
        return None
    rng = rng_state()
    vlm = _rebuild(run.cfg, run.done)
    apply_policy(vlm, stage.st["freeze"], stage.st["optim"])
    load_trained_state(vlm, weights, f"stage {stage.name} at step {stage.step}")
    set_rng_state(*rng)
    return vlm.to(run.acc.device)


def save_artifact(run: Run, stage: Stage, art: Path) -> None:
    """Write the stage's artifact: the full fp32 trained parameters (gathered from every process) and its record."""
    weights = stage.state.strategy.full_state(stage.state.model, stage.state.buffers)
    if run.main:
        art.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=art.parent, prefix=f".{art.name}-"))
        atomic_save_safetensors(tmp / "weights.safetensors", weights)
        # the stage's own log travels with it: a run that reuses this artifact reports its training curve too
        log = [r for r in read_jsonl(run.run_dir / "metrics.jsonl") if r.get("stage") == stage.name]
        atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in log))
        atomic_write_json(tmp / "artifact.json", {
            "stage": stage.name, "config": stage.st, "steps": stage.total, "skipped_samples": stage.skipped,
            "truncated_samples": stage.truncated, "distributed": stage.state.strategy.describe(),
            "created": time.time()})
        if art.exists():
            shutil.rmtree(art)
        tmp.rename(art)
    run.acc.wait_for_everyone()


def train_stage(run: Run, vlm: Any, name: str, st: dict, sources: dict, art: Path) -> tuple[Strategy, dict]:
    """Train stage `name` of the run into artifact `art`; returns the strategy engaged and the feature-cache plan."""
    stage = setup_stage(run, vlm, name, st, sources)
    run_stage(run, stage)
    save_artifact(run, stage, art)
    finish_training(stage.state)
    return stage.state.strategy, {"feature_cache": stage.cache_info}

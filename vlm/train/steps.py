"""Training: run a recipe's stages into a run dir (the library side of `vlm train`).

Everything is validated (schema, freeze policies on the built model, data sources) before the run
dir is created. Each enabled stage starts from the previous stage's artifact; an artifact lives in
the artifact store under a key that hashes everything that determines it (`vlm.recipe.keys.stage_keys`),
so runs sharing a stage reuse it, and a file lock keeps two runs from training the same one at once.
Running the same command again on the same run dir resumes from the last checkpoint.
"""
from __future__ import annotations

import functools
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DeepSpeedPlugin, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from encoders.base import VisionEncoder
from eval.runner import evaluate
from vlm.data.datasets import (
    TrainSet, build_mixture, collate, default_num_workers, epoch_batches, load_source, micro_batch, steps_per_epoch,
    total_steps,
)
from vlm.errors import UserError
from vlm.io import append_jsonl, atomic_save_safetensors, atomic_write_json, atomic_write_text, read_json
from vlm.recipe.freeze import MODULES, apply_policy, check_policy_model, has_lora, merge_lora, module_of
from vlm.recipe.keys import stage_keys
from vlm.recipe.schema import enabled_stages, plain
from vlm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_state
from vlm.train.feature_cache import FeatureCache, default_root
from vlm.train.provenance import config_sha256, git_revision, hardware, versions
from vlm.train.run_dir import apply_artifact, artifact_complete, artifact_store, build_model, set_seed

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- helpers
def _lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


def _make_accelerator(cfg: dict, run_dir: Path) -> Any:
    kwargs: dict[str, Any] = {}
    strategy = cfg["distributed"]["strategy"]
    if strategy == "fsdp":
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(use_orig_params=True)
    elif strategy.startswith("deepspeed"):
        stages = [cfg["stages"][n] for n in enabled_stages(cfg)]  # validated: one batch size and clip norm
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(zero_stage=int(strategy[-1]), gradient_accumulation_steps=1,
                                                     gradient_clipping=stages[0]["optim"]["max_grad_norm"] or 0.0)
        kwargs["deepspeed_plugin"].deepspeed_config["train_micro_batch_size_per_gpu"] = stages[0]["batch_size"]
    else:  # text-only batches leave the encoder and connector unused; ddp must tolerate that
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    trackers = list(cfg["run"]["trackers"])
    return Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers or None, project_dir=str(run_dir),
                       **kwargs)


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------- the run
class Run:
    """State shared by the stages of one `vlm train`."""

    def __init__(self, cfg: dict, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.acc = _make_accelerator(cfg, run_dir)
        self.main = self.acc.is_main_process
        self.manifest: dict = {}

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
    """Build the model, check every stage's policy on it, read every data source. No files written."""
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


def train(cfg: DictConfig | dict, run_dir: Path) -> Path:
    """Train every enabled stage of a validated recipe into `run_dir` (resuming if it holds a checkpoint)."""
    cfg = plain(cfg)
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
        "stages": prior.get("stages", {}), "started": prior.get("started", time.time()),
    }
    store = artifact_store(cfg, run_dir)
    keys = stage_keys(cfg)
    try:
        for name, key in zip(enabled_stages(cfg), keys):
            st = cfg["stages"][name]
            art = store / key
            lock = FileLock(str(store / f"{key}.lock")) if run.main else nullcontext()
            if run.main:
                store.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with lock:
                run.acc.wait_for_everyone()
                reused = artifact_complete(art)
                if not reused:
                    train_stage(run, vlm, name, st, sources, art)
                    run.acc.wait_for_everyone()
            apply_artifact(vlm, st, art)
            if run.main:
                atomic_write_json(run_dir / "stages" / name / "artifact.json", {"key": key, "path": str(art.resolve())})
                if not cfg["run"]["keep_final_checkpoints"]:  # the artifact is what later stages and load_run use
                    shutil.rmtree(run_dir / "stages" / name / "checkpoints", ignore_errors=True)
                prev = run.manifest["stages"].get(name, {})
                run.manifest["stages"][name] = {"key": key, "reused_artifact": reused and not prev.get("trained"),
                                                "trained": prev.get("trained", False) or not reused,
                                                "wall_s": prev.get("wall_s", 0.0) + (time.time() - t0)}
                atomic_write_json(run_dir / "manifest.json", run.manifest)
        if cfg["eval"]["tasks"] and run.main:
            run.status(state="running", stage="eval")
            _evaluate(vlm, cfg["eval"]["tasks"], run_dir)
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


# --------------------------------------------------------------------------- one optimizer step
def build_optimizer(groups: list[dict], optim: dict) -> torch.optim.Optimizer:
    """The stage's optimizer over `vlm.recipe.freeze.apply_policy`'s parameter groups (`optim`: a recipe's `Optim`)."""
    if optim["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"])
    return torch.optim.SGD(groups, lr=optim["lr"], momentum=optim["betas"][0])


@dataclass
class StepStats:
    """What one optimizer step reports; counts are summed over all processes."""

    loss: float  # token-mean cross-entropy over the global batch
    grad_norm: float  # before clipping (nan where the backend does not return it)
    lrs: dict[str, float]  # per parameter group, the rates this step used
    target_tokens: float  # labelled tokens (at least 1)
    samples: float
    input_tokens: float  # attended (unpadded) tokens


class NonFiniteLoss(UserError):
    def __init__(self, loss: float) -> None:
        super().__init__(f"loss is {loss}; training stopped before the optimizer step. Lower the learning rate, "
                         "raise warmup, or use bf16/fp32 instead of fp16.")
        self.loss = loss


def train_step(model: Any, micro_batches: list[dict], optimizer: Any, scheduler: Any, acc: Any, *, vlm: Any,
               freeze: dict, max_grad_norm: float | None, dtype: torch.dtype | None = None, scaler: Any = None,
               cache: Any = None) -> StepStats:
    """One optimizer step of `train_stage` over this process's micro-batches (`vlm.data.collate` output).

    `model`, `optimizer`: as returned by `acc.prepare`; `vlm`: the unwrapped model; `freeze`: the stage's policy
    (frozen modules run in eval mode). Each micro-batch's summed token cross-entropy is divided by the global
    batch's target-token count (times the process count, which DDP's gradient mean divides out), so gradient
    accumulation and data parallelism give the token mean of one large batch. Gradients are synchronised on the
    last micro-batch only; then unscale (fp16), clip, step, zero_grad and scheduler step.
    Raises `NonFiniteLoss` (before stepping) when the loss is not finite.
    """
    world, accum = acc.num_processes, len(micro_batches)
    counts = torch.tensor([float(sum(b["num_target_tokens"] for b in micro_batches)),
                           float(sum(b["num_samples"] for b in micro_batches)),
                           float(sum(int(b["attention_mask"].sum()) for b in micro_batches))], device=acc.device)
    n_tok, n_samples, n_inputs = acc.reduce(counts, "sum").tolist()
    n_tok = max(n_tok, 1.0)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    loss_sum = torch.zeros((), device=acc.device)
    model.train()
    for m in MODULES:  # frozen modules stay in eval mode (no dropout on fixed features)
        module_of(vlm, m).train(freeze[m]["mode"] != "frozen")
    for a, b in enumerate(micro_batches):
        sync = acc.no_sync(model) if a < accum - 1 and world > 1 else nullcontext()
        with sync:
            with torch.autocast(acc.device.type, dtype=dtype) if dtype is not None else nullcontext():
                kw = _image_inputs(vlm, b, cache, acc.device)
                out = model(input_ids=b["input_ids"].to(acc.device), attention_mask=b["attention_mask"].to(acc.device),
                            labels=b["labels"].to(acc.device), label_loss_sum=True, **kw)
            tok_loss = out.loss  # summed cross-entropy over labelled tokens; the LM head runs only there
            loss = tok_loss * world / n_tok
            acc.backward(scaler.scale(loss) if scaler is not None else loss)
        loss_sum += tok_loss.detach()
    if scaler is not None:
        scaler.unscale_(inner)
    trainable = [p for p in vlm.parameters() if p.requires_grad]
    norm = acc.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm is not None else float("inf"))
    grad_norm = float(norm) if norm is not None else float("nan")  # under DeepSpeed: the engine's (it clips itself)
    global_loss = float(acc.reduce(loss_sum, "sum")) / n_tok
    if not math.isfinite(global_loss):
        raise NonFiniteLoss(global_loss)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    if scaler is not None:
        scaler.step(inner)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return StepStats(loss=global_loss, grad_norm=grad_norm, lrs=lrs, target_tokens=n_tok, samples=n_samples,
                     input_tokens=n_inputs)


# --------------------------------------------------------------------------- one stage
def train_stage(run: Run, vlm: Any, name: str, st: dict, sources: dict, art: Path) -> None:
    cfg, acc = run.cfg, run.acc
    seed = int(cfg["run"]["seed"])
    set_seed(seed + 1 + list(cfg["stages"]).index(name))
    groups = apply_policy(vlm, st["freeze"], st["optim"], f"stages.{name}.freeze")
    checkpointed = _checkpointable(vlm, st) if st["gradient_checkpointing"] else []
    for m in checkpointed:
        kw = {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    o = st["optim"]
    optimizer = build_optimizer(groups, o)

    records = build_mixture(st["data"], sources, seed)
    ds = TrainSet(records, vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens, st["max_length"],
                  cfg["data"]["on_error"], st["chat_template"], transform=_worker_transform(vlm))
    world, rank = acc.num_processes, acc.process_index
    per_dev, accum = st["batch_size"], st["grad_accum"]
    gbs = per_dev * world * accum
    _check_batch(name, len(ds), st, world)
    spe = steps_per_epoch(len(ds), gbs)
    total = total_steps(len(ds), gbs, st["epochs"], st["max_steps"])
    warmup = int(round(o["warmup_ratio"] * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(o["scheduler"], warmup, total))
    model, optimizer = acc.prepare(vlm, optimizer)
    if st["save_every"] and _sharded(acc):
        raise UserError(f"stages.{name}.save_every: mid-stage checkpoints are implemented for single-process and ddp "
                        "runs; with fsdp / deepspeed set save_every: 0 (stage artifacts are still saved at the end).")
    dtype = DTYPES[st["precision"]]
    scaler = torch.amp.GradScaler(acc.device.type) if st["precision"] == "fp16" else None
    vision_frozen = st["freeze"]["vision"]["mode"] == "frozen"
    cache = None
    if vision_frozen and st["feature_cache"]:
        cache = FeatureCache(cfg["run"]["feature_cache_dir"] or default_root(), vlm.encoder.fingerprint())
    lengths = ds.lengths()
    workers = cfg["data"]["num_workers"]
    workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if workers is None else workers
    pad_id = vlm.tokenizer.pad_token_id if vlm.tokenizer.pad_token_id is not None else 0
    stage_dir = run.run_dir / "stages" / name
    ckpt_root = stage_dir / "checkpoints"

    step, skipped = 0, len([s for d in {i["dataset"] for i in st["data"]} for s in sources[d].skipped])
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is not None:
        state = load_checkpoint(ckpt, acc.unwrap_model(model), optimizer.optimizer if hasattr(optimizer, "optimizer")
                                else optimizer, scheduler)
        step, skipped = state["step"], state["skipped_samples"]
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    run.status(state="running", stage=name, step=step, total_steps=total)
    bar = tqdm(total=total, initial=step, desc=name, disable=not (run.main and cfg["run"]["progress"]),
               dynamic_ncols=True, file=sys.stderr)
    plan_epoch, batches = -1, iter(())
    eval_every, quick = cfg["eval"]["every_steps"], cfg["eval"]["quick_tasks"]

    while step < total:
        t0 = time.time()
        epoch, pos = divmod(step, spe)
        if epoch != plan_epoch:  # this process's micro-batches for the rest of the epoch, loaded in order
            plan, plan_epoch = epoch_batches(lengths, gbs, seed, epoch, cfg["data"]["group_by_length"]), epoch
            mine = [micro_batch(plan[p], a, rank, world, per_dev) for p in range(pos, spe) for a in range(accum)]
            # a private generator: starting an iterator must not draw from the global RNG (dropout), or a
            # run resumed mid-epoch would see different random numbers than an uninterrupted one
            batches = iter(torch.utils.data.DataLoader(ds, batch_sampler=mine, num_workers=workers,
                                                       collate_fn=functools.partial(collate, pad_id=pad_id),
                                                       generator=torch.Generator().manual_seed(seed + epoch)))
        micro = [_next_batch(batches) for _ in range(accum)]
        for b in micro:
            for why in b["broken"]:
                skipped += 1
                if run.main:
                    append_jsonl(stage_dir / "skipped.jsonl", {"step": step, "sample": why})
        try:
            stats = train_step(model, micro, optimizer, scheduler, acc, vlm=vlm, freeze=st["freeze"],
                               max_grad_norm=o["max_grad_norm"], dtype=dtype, scaler=scaler, cache=cache)
        except NonFiniteLoss as e:
            raise UserError(f"stage {name}: loss is {e.loss} at step {step + 1}; training stopped. Lower the "
                            "learning rate, raise warmup, or use bf16/fp32 instead of fp16.") from None
        step += 1
        dt = time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.4f}")
        if step % cfg["run"]["log_every"] == 0 or step == total:
            run.log({"stage": name, "step": step, "epoch": epoch, "loss": stats.loss, "lr": stats.lrs,
                     "grad_norm": stats.grad_norm, "tokens_per_s": stats.input_tokens / dt,
                     "samples_per_s": stats.samples / dt, "peak_memory_mb": _peak_memory_mb(),
                     "skipped_samples": skipped, "target_tokens": int(stats.target_tokens),
                     **({"feature_cache_hits": cache.hits, "feature_cache_misses": cache.misses} if cache else {})})
        if eval_every and quick and step % eval_every == 0 and step < total:
            if run.main:
                res = _evaluate(vlm, quick, stage_dir / "eval" / f"step_{step:08d}")
                run.log({"stage": name, "step": step,
                         "eval": {t: r.get("score") for t, r in res.get("tasks", {}).items()},
                         **{k: res.get(k) for k in ("fine_grained", "general", "gap")}})
            acc.wait_for_everyone()
        if st["save_every"] and step % st["save_every"] == 0 and step < total:
            if run.main:
                save_checkpoint(ckpt_root, step, acc.unwrap_model(model),
                                optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, scheduler,
                                {"epoch": epoch, "batch_in_epoch": pos + 1, "skipped_samples": skipped,
                                 "scaler": scaler.state_dict() if scaler is not None else None})
            acc.wait_for_everyone()
            run.status(state="running", stage=name, step=step, total_steps=total)
    bar.close()
    if run.main and not _sharded(acc):  # the full end state too (resume at the end = nothing left to do)
        save_checkpoint(ckpt_root, step, acc.unwrap_model(model),
                        optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, scheduler,
                        {"epoch": step // spe, "batch_in_epoch": step % spe, "skipped_samples": skipped,
                         "scaler": scaler.state_dict() if scaler is not None else None}, keep=1)
    weights = _trainable_weights(acc, model, vlm)
    for m in checkpointed:
        (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()
    if run.main:
        art.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=art.parent, prefix=f".{art.name}-"))
        atomic_save_safetensors(tmp / "weights.safetensors", weights)
        atomic_write_json(tmp / "artifact.json", {"stage": name, "config": st, "steps": total,
                                                  "skipped_samples": skipped, "created": time.time()})
        if art.exists():
            shutil.rmtree(art)
        tmp.rename(art)
    acc.free_memory()
    for m in MODULES:  # drop the adapters unmerged: apply_artifact re-injects, loads and merges them once
        if has_lora(module_of(vlm, m)):
            merge_lora(module_of(vlm, m), merge=False)
    del optimizer, model


def _checkpointable(vlm: Any, st: dict) -> list[Any]:
    """The HF models whose activations are recomputed: the LLM, and a trained HF vision backbone."""
    out = [vlm.language_model]
    backbone = getattr(vlm.encoder, "model", None)
    if st["freeze"]["vision"]["mode"] != "frozen" and getattr(backbone, "supports_gradient_checkpointing", False):
        out.append(backbone)
    return out


def _sharded(acc: Any) -> bool:
    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _trainable_weights(acc: Any, model: Any, vlm: Any) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of the trainable parameters; a collective call under fsdp / deepspeed."""
    if not _sharded(acc):
        return trainable_state(acc.unwrap_model(model))
    names = [n for n, p in vlm.named_parameters() if p.requires_grad]
    full = acc.get_state_dict(model)
    return {n: full[n].detach().cpu().clone() for n in names} if acc.is_main_process else {}


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

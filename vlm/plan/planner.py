"""`vlm plan RECIPE|GRID`: parameters, image tokens, FLOPs, memory per GPU and GPU-hours of every stage of every
point, from real shapes on the meta device (see `vlm.plan.meta`, `vlm.plan.cost`, `vlm.plan.memory`)."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from rich.console import Console
from rich.table import Table

from vlm.data.datasets import total_steps
from vlm.errors import UserError
from vlm.grid.points import _override_strings, gpus_of
from vlm.grid.spec import load_grid
from vlm.plan.cost import DTYPE_BYTES, PRECISION_DTYPE, checkpoint_blocks, trace_sample
from vlm.plan.memory import memory_per_gpu
from vlm.plan.meta import build_meta_vlm
from vlm.recipe.freeze import MODULES, apply_policy, has_lora, merge_lora, module_of, set_train_modes
from vlm.recipe.keys import stage_keys
from vlm.recipe.schema import compose, enabled_stages, plain, validate
from vlm.train.steps import _checkpointable
from vlm.world.synth.world import synth_dir

# Dense bf16/fp16 and TF32 tensor-core peaks (FLOP/s) of SXM parts, from the vendors' data sheets.
PEAK_FLOPS = {
    "h100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12},
    "h200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
}
# Samples in the public files the shipped data recipes name (hf://repo/file), and where the number comes from.
KNOWN_SAMPLES: dict[str, tuple[int, str]] = {
    "hf://liuhaotian/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json": (558_128, "LLaVA-1.5 paper / LLaVA-Pretrain card"),
    "hf://liuhaotian/LLaVA-Instruct-150K/llava_v1_5_mix665k.json": (665_298, "LLaVA-1.5 paper / LLaVA repo"),
    "hf://Lin-Chen/ShareGPT4V/share-captioner_coco_lcs_sam_1246k_1107.json":
        (1_246_000, "approx.: the file name's 1246k"),
    "hf://Lin-Chen/ShareGPT4V/sharegpt4v_instruct_gpt4-vision_cap100k.json": (100_000, "approx.: the file name's 100k"),
}


@dataclass
class StagePlan:
    stage: str
    params_total: int
    params_trainable: int
    trainable_by_module: dict[str, int]
    modes: dict[str, str]
    image_tokens: int
    seq_len: int
    flops_forward: float  # per sample
    flops_backward: float
    flops_recompute: float
    memory: dict[str, float]  # bytes per GPU
    batch_per_gpu: int
    global_batch: int
    steps: int | None
    samples: int | None
    samples_source: str
    gpu_hours: float | None
    stage_key: str

    @property
    def flops_per_sample(self) -> float:
        return self.flops_forward + self.flops_backward


@dataclass
class PointPlan:
    id: str
    labels: dict[str, str]
    strategy: str
    processes: int
    precision: dict[str, str]
    stages: list[StagePlan] = field(default_factory=list)


@dataclass
class Settings:
    mfu: float = 0.4
    gpu: str = "h100"
    peak_flops: float | None = None  # overrides the gpu table
    processes: int | None = None  # overrides the recipe / grid
    samples: dict[str, int] = field(default_factory=dict)  # dataset name -> samples
    text_tokens: int | None = None  # text tokens per sample; None = fill max_length (an upper bound)


class _Memo:
    """Points share models and stage settings: each meta model is built, and each stage traced, once per process
    (a meta model holds no storage; `apply_policy` resets every `requires_grad` and LoRA is merged after each
    stage, so a cached model is reused safely)."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.traces: dict[tuple, Any] = {}

    def model(self, model_cfg: Mapping[str, Any]) -> Any:
        key = json.dumps(model_cfg, sort_keys=True, default=str)
        if key not in self.models:
            self.models[key] = build_meta_vlm(model_cfg)
        return self.models[key]


MEMO = _Memo()


def _count_file(path: Path) -> int:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise UserError(f"vlm plan: {path} is not a JSON list of samples.")
    return len(data)


def dataset_samples(name: str, ds: Mapping[str, Any], settings: Settings) -> tuple[int | None, str]:
    """Samples of one dataset and where the number comes from; (None, why) when plan cannot know."""
    if name in settings.samples:
        return settings.samples[name], "--samples"
    path = ds.get("path")
    if ds["type"] == "synth":
        f = synth_dir(ds) / ds["file"]
        return (_count_file(f), "synth world") if f.is_file() else (None, f"synth world has no {ds['file']}")
    if ds["type"] == "llava" and path:
        if path in KNOWN_SAMPLES:
            return KNOWN_SAMPLES[path]
        local = Path(path).expanduser()
        if local.is_file():
            return _count_file(local), "counted"
    return None, f"unknown (pass --samples {name}=N)"


def _stage_samples(cfg: Mapping[str, Any], st: Mapping[str, Any], gbs: int, settings: Settings
                   ) -> tuple[int | None, int | None, str]:
    """(optimizer steps, samples seen, source) as the trainer computes them (`total_steps`)."""
    if st["max_steps"] is not None:
        return int(st["max_steps"]), int(st["max_steps"]) * gbs, "max_steps"
    n, sources = 0, []
    for item in st["data"]:
        count, source = dataset_samples(item["dataset"], cfg["datasets"][item["dataset"]], settings)
        if count is None:
            return None, None, f"{item['dataset']}: {source}"
        if item["max_samples"] is not None:
            count = min(count, int(item["max_samples"]))
        whole, frac = divmod(float(item["weight"]), 1.0)  # as build_mixture repeats / subsamples
        n += count * int(whole) + round(frac * count)
        sources.append(f"{item['dataset']}: {source}")
    steps = total_steps(n, gbs, float(st["epochs"]), None)
    return steps, steps * gbs, "; ".join(sources)


def _checkpointed(vlm: Any, st: Mapping[str, Any]) -> set[str]:
    """Blocks gradient checkpointing recomputes in this stage: the layers of the models the trainer checkpoints
    (`vlm.train.steps._checkpointable`) that run in train mode under the stage's policy — set by the trainer's own
    `set_train_modes` (HF checkpoints a layer only in train mode; a frozen LLM is held in train mode for that)."""
    if not st["gradient_checkpointing"]:
        return set()
    set_train_modes(vlm, st["freeze"])
    names = {id(m): n for n, m in vlm.named_modules()}
    return {f"{names[id(model)]}.{n}" for model in _checkpointable(vlm, st)
            for n, block in checkpoint_blocks(model).items() if block.training}


def _mode_label(p: Mapping[str, Any]) -> str:
    return p["mode"] + (f"(k={p['k']})" if p["mode"] == "partial" else f"(r={p['r']})" if p["mode"] == "lora" else "")


def plan_config(cfg: Mapping[str, Any], settings: Settings, *, point_id: str = "recipe",
                labels: Mapping[str, str] | None = None, default_processes: int = 1, memo: _Memo | None = None
                ) -> PointPlan:
    """Plan every enabled stage of one resolved recipe (a plain dict)."""
    cfg = plain(cfg)
    strategy = cfg["distributed"]["strategy"]
    procs = int(settings.processes or cfg["distributed"].get("num_processes") or default_processes or 1)
    memo = memo or MEMO
    vlm = memo.model(cfg["model"])
    model_key = json.dumps(cfg["model"], sort_keys=True, default=str)
    names = enabled_stages(cfg)
    keys = stage_keys(cfg)
    plan = PointPlan(id=point_id, labels=dict(labels or {}), strategy=strategy, processes=procs,
                     precision={n: cfg["stages"][n]["precision"] for n in names})
    for name, key in zip(names, keys):
        st = cfg["stages"][name]
        with torch.device("meta"):
            apply_policy(vlm, st["freeze"], st["optim"], f"stages.{name}.freeze")
        try:
            dtype = PRECISION_DTYPE[st["precision"]]
            length = int(st["max_length"])
            shape = {m: [st["freeze"][m][k] for k in ("mode", "r", "dropout", "target_modules", "k")] for m in MODULES}
            tkey = (model_key, json.dumps(shape), length, st["precision"], settings.text_tokens)  # lr is not a shape
            if tkey not in memo.traces:
                memo.traces[tkey] = trace_sample(vlm, length, dtype, text_tokens=settings.text_tokens)
            trace = memo.traces[tkey]
            ck = _checkpointed(vlm, st)
            batch = int(st["batch_size"])
            mem = memory_per_gpu(vlm, batch * trace.saved_bytes(ck), strategy=strategy, processes=procs,
                                 compute_bytes=DTYPE_BYTES[dtype], optimizer=st["optim"]["name"],
                                 logits_grad_bytes=batch * trace.logits_bytes)
            gbs = batch * int(st["grad_accum"]) * procs
            steps, samples, source = _stage_samples(cfg, st, gbs, settings)
            fwd, bwd = float(trace.forward_flops()), float(trace.backward_flops())
            peak = settings.peak_flops or PEAK_FLOPS[settings.gpu][st["precision"]]
            hours = None if samples is None else samples * (fwd + bwd) / (settings.mfu * peak) / 3600.0
            by_module = {m: sum(p.numel() for p in module_of(vlm, m).parameters() if p.requires_grad) for m in MODULES}
            plan.stages.append(StagePlan(
                stage=name, params_total=sum(p.numel() for p in vlm.parameters()),
                params_trainable=sum(by_module.values()), trainable_by_module=by_module,
                modes={m: _mode_label(st["freeze"][m]) for m in MODULES}, image_tokens=trace.image_tokens,
                seq_len=trace.image_tokens + trace.labelled_tokens, flops_forward=fwd, flops_backward=bwd,
                flops_recompute=float(trace.recompute_flops(ck)), memory=mem.as_dict(), batch_per_gpu=batch,
                global_batch=gbs, steps=steps, samples=samples, samples_source=source, gpu_hours=hours, stage_key=key))
        finally:
            with torch.device("meta"):
                for m in MODULES:  # later stages start from a plain model, as in training
                    if has_lora(module_of(vlm, m)):
                        merge_lora(module_of(vlm, m))
    return plan


# --------------------------------------------------------------------------- recipes and grids
def load_plain_recipe(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Compose and schema-check a recipe without requiring its data files (plan reads no data)."""
    return validate(compose(path, overrides), str(path), check_files=False)


def is_grid_file(path: Path) -> bool:
    """A grid file has `axes:` (a recipe never does)."""
    import yaml

    try:
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"vlm plan: {path} is not valid YAML: {e}") from None
    return isinstance(body, dict) and "axes" in body


def plan_target(path: str | Path, overrides: Sequence[str], settings: Settings
                ) -> tuple[list[PointPlan], list[str], str]:
    """(point plans, warnings, title) for a recipe or a grid file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"vlm plan: {path} does not exist; pass a recipe or grid YAML.")
    if not is_grid_file(path):
        cfg = load_plain_recipe(path, overrides)
        return [plan_config(cfg, settings, point_id=path.stem)], [], f"recipe {path}"
    if overrides:
        raise UserError("vlm plan: key=value overrides apply to a recipe; for a grid, put them under `set:`.")
    grid = load_grid(path)
    if getattr(grid, "survey", None) is not None:  # vlm.grid.survey: models evaluated as they are; no stage to price
        n = len(grid.points())
        return [], [f"survey grid: {n} models evaluated on {len(grid.survey['tasks'])} tasks, nothing trained; "
                    "plan prices training, so there is nothing to price"], \
            f"survey {grid.name}: {n} models, no training"
    plans, memo = [], MEMO
    for point in grid.points():
        try:
            cfg = load_plain_recipe(grid.base, _override_strings(point.overrides))
        except UserError as e:
            raise UserError(f"grid {path}, point {point.id}: {e}") from None
        plans.append(plan_config(cfg, settings, point_id=point.id, labels=point.labels,
                                 default_processes=gpus_of(cfg, grid) or 1, memo=memo))
    return plans, token_warnings(plans, list(grid.axes)), f"grid {grid.name}: {len(plans)} points"


def token_warnings(plans: Sequence[PointPlan], axes: Sequence[str]) -> list[str]:
    """One warning per axis whose values, all else equal, feed the LLM different numbers of image tokens."""
    out = []
    for axis in axes:
        groups: dict[tuple, dict[str, int]] = {}
        for p in plans:
            rest = tuple((a, v) for a, v in p.labels.items() if a != axis)
            groups.setdefault(rest, {})[p.labels[axis]] = p.stages[0].image_tokens if p.stages else 0
        differing = {label: n for g in groups.values() if len(set(g.values())) > 1 for label, n in g.items()}
        if differing:
            shown = ", ".join(f"{label}: {n}" for label, n in differing.items())
            out.append(f"axis {axis!r} changes the number of image tokens per image ({shown}): its effect is "
                       "confounded with the LLM's sequence length and compute; equalise them with a token reducer "
                       "(e.g. connector avgpool / pixel_shuffle) or image_size if that is not intended.")
    return out


# --------------------------------------------------------------------------- output
def unique_gpu_hours(plans: Sequence[PointPlan]) -> tuple[float | None, int, int]:
    """Grid total counting each stage artifact once (points sharing a stage key reuse it), stages trained, and
    stage runs listed."""
    seen: dict[str, float | None] = {}
    listed = 0
    for p in plans:
        for s in p.stages:
            listed += 1
            seen.setdefault(s.stage_key, s.gpu_hours)
    if any(v is None for v in seen.values()):
        return None, len(seen), listed
    return sum(v for v in seen.values() if v is not None), len(seen), listed


def to_json(plans: Sequence[PointPlan], warnings: Sequence[str], settings: Settings, title: str) -> dict[str, Any]:
    total, unique, listed = unique_gpu_hours(plans)
    return {
        "title": title, "mfu": settings.mfu, "gpu": settings.gpu, "peak_flops": settings.peak_flops,
        "points": [{**{k: v for k, v in asdict(p).items() if k != "stages"},
                    "stages": [{**asdict(s), "flops_per_sample": s.flops_per_sample} for s in p.stages]}
                   for p in plans],
        "total_gpu_hours": total, "stages_trained": unique, "stage_runs_listed": listed, "warnings": list(warnings),
    }


def _n(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _b(x: float) -> str:
    """Bytes in binary units."""
    for unit, div in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _h(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def print_plan(plans: Sequence[PointPlan], warnings: Sequence[str], settings: Settings, title: str,
               out: Any = None) -> None:
    console = Console(file=out or sys.stdout, width=200)
    peak = "peak " + (f"{settings.peak_flops / 1e12:.0f} TFLOP/s" if settings.peak_flops else settings.gpu.upper())
    table = Table(title=f"vlm plan — {title} (MFU {settings.mfu:g}, {peak})", show_lines=False)
    for col, just in (("point", "left"), ("stage", "left"), ("params", "right"), ("trainable", "right"),
                      ("img tok", "right"), ("seq", "right"), ("TFLOP/sample", "right"), ("GPUs", "right"),
                      ("batch/GPU", "right"), ("mem/GPU", "right"), ("w+opt | grad | act+dlogit | gath", "right"),
                      ("samples", "right"), ("GPU-h", "right")):
        table.add_column(col, justify=just)
    for p in plans:
        for i, s in enumerate(p.stages):
            m = s.memory
            table.add_row(
                p.id if i == 0 else "", s.stage, _n(s.params_total), _n(s.params_trainable), str(s.image_tokens),
                str(s.seq_len), f"{s.flops_per_sample / 1e12:.3g}", f"{p.processes}x{p.strategy}", str(s.batch_per_gpu),
                _b(m["total"]),
                f"{_b(m['weights'] + m['optimizer'])} | {_b(m['gradients'])} | "
                f"{_b(m['activations'] + m['logits_grad'])} | {_b(m['gathered'])}",
                _n(s.samples) if s.samples is not None else "?", _h(s.gpu_hours))
    console.print(table)
    total, unique, listed = unique_gpu_hours(plans)
    if len(plans) > 1:
        console.print(f"grid total: {_h(total)} GPU-hours "
                      f"({unique} stage trainings for {listed} listed stage runs; shared stage artifacts counted once)")
    for s in {s.samples_source for p in plans for s in p.stages}:
        console.print(f"samples: {s}")
    for w in warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")

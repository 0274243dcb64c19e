"""Training-step throughput: our stage-2 step vs HF `LlavaForConditionalGeneration` in a plain PyTorch loop,
and our stage-1 step with the frozen-encoder feature cache vs without it.

    .venv/bin/python benchmarks/train_step.py            # CPU, DINOv2-S-sized CLIP + SmolLM2-135M-sized Llama
    .venv/bin/python benchmarks/train_step.py --quick    # fewer layers and repetitions
    .venv/bin/python benchmarks/train_step.py --device cuda --precision bf16

"Our step" is `vlm.train.train_step`, the function `train_stage` calls once per optimizer step, set up as
`train_stage` sets it up: `apply_policy` param groups -> `build_optimizer` (AdamW) -> the LR schedule ->
`Accelerator.prepare` (a GradScaler under fp16), fed one micro-batch in `vlm.data.collate`'s format (token ids,
labels, PIL images, image keys). It therefore includes `_image_inputs` (image preprocessing, or the feature cache).
The HF side holds the very same weights (`vlm.hf_llava.to_hf_llava`), gets the same token ids and labels, turns
the same PIL images into pixels with the same preprocessing inside its step, and runs
`loss = model(..., labels=...).loss; loss.backward(); clip; step; zero_grad; scheduler.step()`.
Last line: `RATIO train_step_hf_over_ours=<x> stage1_cache_speedup=<y>` (x >= 1 means ours is no slower).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402
from vlm.train.steps import autocast_dtype  # noqa: E402

ENCODERS = {  # stage-1 encoder choices: the default keeps the CPU run short; larger ones show where caching pays
    "dinov2s": C.clip_vision(384, 12, 6, 224, 14),
    "vitb16": C.clip_vision(768, 12, 12, 224, 16),
    "vitl14-336": C.clip_vision(1024, 24, 16, 336, 14),
}


class OurStep:
    """`vlm.train.steps.train_step` on one process, set up by `setup_training` as `vlm train` sets a stage up."""

    def __init__(self, vlm: Any, modes: dict[str, str], precision: str, lr: float = 2e-5, total_steps: int = 1000):
        from accelerate import Accelerator

        from vlm.train.steps import setup_training
        from vlm.train.strategy import Strategy

        optim = {**C.optim_cfg(lr), "warmup_ratio": 30 / total_steps}
        st = {"freeze": C.freeze_policy(modes), "optim": optim, "precision": precision, "gradient_checkpointing": False}
        self.acc = Accelerator(cpu=vlm.device.type == "cpu")
        self.state = setup_training(vlm, st, total_steps, Strategy(self.acc, autocast_dtype(precision)), "benchmark")
        self.last_loss = float("nan")

    def __call__(self, micro_batches: list[dict], cache: Any = None) -> float:
        from vlm.train.steps import train_step

        stats = train_step(self.state, micro_batches, cache=cache)
        self.last_loss = stats.loss
        return stats.loss

    def close(self) -> None:
        self.acc.free_memory()


class HFStep:
    """The plain PyTorch loop a user would write around `LlavaForConditionalGeneration` (stage 2: vision frozen)."""

    def __init__(self, hf: Any, preprocess: Callable[[list[Any]], torch.Tensor], precision: str, lr: float = 2e-5,
                 total_steps: int = 1000) -> None:
        from vlm.train.steps import lr_lambda

        self.hf, self.preprocess = hf, preprocess
        for p in hf.model.vision_tower.parameters():
            p.requires_grad_(False)
        self.trainable = [p for p in hf.parameters() if p.requires_grad]
        o = C.optim_cfg(lr)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=lr, betas=tuple(o["betas"]), eps=o["eps"],
                                           weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o["scheduler"], 30, total_steps))
        dtype = autocast_dtype(precision)
        self.autocast = (lambda: torch.autocast(hf.device.type, dtype=dtype)) if dtype is not None else nullcontext
        self.last_loss = float("nan")

    def __call__(self, batch: dict) -> float:
        hf, device = self.hf, self.hf.device
        hf.train()
        hf.model.vision_tower.eval()
        pixels = self.preprocess(batch["images"])
        with self.autocast():
            out = hf(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                     pixel_values=pixels.to(device), labels=batch["labels"].to(device))
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.last_loss = float(out.loss.detach())
        return self.last_loss


def tokens_per_step(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def stage2(args: argparse.Namespace, model_cfg: dict) -> tuple[list[list[Any]], float, dict]:
    from vlm.model.hf_llava import to_hf_llava

    vlm = C.build(model_cfg).to(args.device)
    hf = to_hf_llava(vlm).to(args.device)
    batch = C.make_batch(vlm, args.batch, args.prompt_tokens, args.answer_tokens, seed=1)
    pixels = vlm.preprocess(batch["images"])
    # losses of both sides on the identical first batch, before any update: proves same model + data
    with torch.no_grad():
        vlm.eval()
        ours_out = vlm(input_ids=batch["input_ids"].to(args.device), pixels=pixels,
                       attention_mask=batch["attention_mask"].to(args.device))
        lg, tg = ours_out.logits[:, :-1].float(), batch["labels"][:, 1:].to(args.device)
        ours_loss0 = float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100))
        hf.eval()
        hf_loss0 = float(hf(input_ids=batch["input_ids"].to(args.device), pixel_values=pixels,
                            attention_mask=batch["attention_mask"].to(args.device),
                            labels=batch["labels"].to(args.device)).loss)
        del ours_out, lg
    ours = OurStep(vlm, C.STAGE2_FREEZE, args.precision)
    theirs = HFStep(hf, vlm.preprocess, args.precision)
    res = C.alternate({"ours (vlm.train.train_step)": lambda: ours([batch]),
                       "HF LlavaForConditionalGeneration": lambda: theirs(batch)},
                      reps=args.reps, warmup=args.warmup, device=args.device)
    n_tok = tokens_per_step(batch)
    flops = C.train_step_flops(vlm, args.batch, batch["input_ids"].shape[1], C.STAGE2_FREEZE)["total"]
    rows = []
    for name, r in res.items():
        rows.append([name, r["median"], r["min"], r["max"], r["cpu_median"], n_tok / r["median"],
                     args.batch / r["median"], flops / r["median"] / 1e9, r["peak_mib"], r["delta_mib"]])
    hf_r, our_r = res["HF LlavaForConditionalGeneration"], res["ours (vlm.train.train_step)"]
    ratio = (hf_r["median"] / our_r["median"], hf_r["cpu_median"] / our_r["cpu_median"])
    info = {"loss0_ours": ours_loss0, "loss0_hf": hf_loss0, "tokens": n_tok, "seq_len": batch["input_ids"].shape[1],
            "final_loss_ours": ours.last_loss, "final_loss_hf": theirs.last_loss,
            "attn": (vlm.language_model.config._attn_implementation, hf.config.text_config._attn_implementation)}
    ours.close()
    del ours, theirs, vlm, hf
    return rows, ratio, info


def stage1(args: argparse.Namespace, model_cfg: dict) -> tuple[list[list[Any]], float, dict]:
    from vlm.train.feature_cache import FeatureCache

    vlm = C.build(model_cfg).to(args.device)
    batch = C.make_batch(vlm, args.batch, 4, args.caption_tokens, seed=2)
    step = OurStep(vlm, C.STAGE1_FREEZE, args.precision, lr=1e-3)
    with tempfile.TemporaryDirectory(prefix="vlm-bench-cache-") as root:
        cache = FeatureCache(root, vlm.encoder.fingerprint())
        res = C.alternate({"stage 1, no cache": lambda: step([batch]),
                           "stage 1, feature cache": lambda: step([batch], cache)},
                          reps=args.reps, warmup=args.warmup, device=args.device)
        hits, misses = cache.hits, cache.misses
        # the part the cache removes: preprocessing + the frozen encoder's forward
        enc = C.alternate({"encode": lambda: _encode(vlm, batch["images"])}, reps=args.reps, warmup=1,
                          device=args.device, memory=False)["encode"]["median"]
    n_tok = tokens_per_step(batch)
    rows = [[n, r["median"], r["min"], r["max"], r["cpu_median"], n_tok / r["median"], args.batch / r["median"],
             r["peak_mib"], r["delta_mib"]] for n, r in res.items()]
    unc, cached = res["stage 1, no cache"], res["stage 1, feature cache"]
    ratio = (unc["median"] / cached["median"], unc["cpu_median"] / cached["cpu_median"])
    unc = unc["median"]
    step.close()
    info = {"hits": hits, "misses": misses, "encode_s": enc, "amdahl_bound": unc / max(unc - enc, 1e-9),
            "tokens": n_tok}
    return rows, ratio, info


@torch.no_grad()
def _encode(vlm: Any, images: list[Any]) -> torch.Tensor:
    return vlm.encoder_features(vlm.preprocess(images))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--caption-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--llm-layers", type=int, default=None, help="override the LLM depth (default: 30, SmolLM2-135M)")
    p.add_argument("--stage1-encoder", default="dinov2s", choices=list(ENCODERS))
    p.add_argument("--skip", choices=["stage1", "stage2"], default=None)
    p.add_argument("--quick", action="store_true", help="6-layer LLM, 2 repetitions")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default); see docs/performance.md")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    C.reexec_with_malloc_env()
    if args.quick:
        args.llm_layers, args.reps = args.llm_layers or 6, 2
    model_cfg = copy.deepcopy(C.MODELS["cpu-small"])
    if args.llm_layers:
        model_cfg["llm"]["config"]["num_hidden_layers"] = args.llm_layers
    print("machine:", C.machine())
    print(f"config: vision {model_cfg['encoder']['config']}, llm {model_cfg['llm']['config']}, batch {args.batch}, "
          f"{args.precision}, reps {args.reps} (median), warmup {args.warmup}")
    ratio2 = ratio1 = (math.nan, math.nan)
    if args.skip != "stage2":
        rows, ratio2, info = stage2(args, model_cfg)
        print(f"\nStage 2 (vision frozen, connector + LLM trained), {info['tokens']} tokens/step "
              f"(seq {info['seq_len']}), attention {info['attn']}")
        print(f"loss before training: ours {info['loss0_ours']:.6f}  HF {info['loss0_hf']:.6f}  "
              f"(|Δ| {abs(info['loss0_ours'] - info['loss0_hf']):.2e}); after: ours {info['final_loss_ours']:.4f} "
              f"HF {info['final_loss_hf']:.4f}")
        print(C.table(["side", "median s/step", "min", "max", "CPU s/step", "tokens/s", "samples/s", "GFLOP/s",
                       "peak MiB", "step MiB"], rows))
        print(f"HF time / ours time = {ratio2[0]:.3f} wall, {ratio2[1]:.3f} CPU time (goal >= 1.0)")
    if args.skip != "stage1":
        cfg1 = copy.deepcopy(model_cfg)
        cfg1["encoder"] = ENCODERS[args.stage1_encoder]
        rows, ratio1, info = stage1(args, cfg1)
        print(f"\nStage 1 (vision + LLM frozen, connector trained), encoder {args.stage1_encoder}, "
              f"{info['tokens']} tokens/step; cache hits {info['hits']}, misses {info['misses']}")
        print(C.table(["side", "median s/step", "min", "max", "CPU s/step", "tokens/s", "samples/s", "peak MiB",
                       "step MiB"], rows))
        print(f"preprocess + encoder forward alone: {info['encode_s']:.3f} s/step -> the most a feature cache can "
              f"give here (Amdahl) is {info['amdahl_bound']:.2f}x")
        print(f"cached speedup = {ratio1[0]:.3f}x wall, {ratio1[1]:.3f}x CPU time (goal >= 1.5)")
    print(f"RATIO train_step_hf_over_ours={ratio2[0]:.3f} stage1_cache_speedup={ratio1[0]:.3f} "
          f"(CPU time: {ratio2[1]:.3f}, {ratio1[1]:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

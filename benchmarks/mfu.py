"""Model FLOPs utilisation of our stage-2 training step: analytic FLOPs / step time / measured matmul peak.

    .venv/bin/python benchmarks/mfu.py                    # CPU: DINOv2-S-sized CLIP + SmolLM2-135M-sized Llama, fp32
    .venv/bin/python benchmarks/mfu.py --quick
    .venv/bin/python benchmarks/mfu.py --device cuda      # GPU: CLIP ViT-L/14-336 + Qwen2-1.5B-sized LM, bf16

FLOPs per step (see `_common.train_step_flops`): trained matmul weights 6 FLOPs/token, the frozen vision tower
2 FLOPs/token, attention 4*T^2*d per layer forward (x3 with backward), over the real (unpadded) tokens.
The denominator is this machine's measured dense matmul rate in the step's dtype (fp32 on CPU, bf16 on GPU);
on a GPU the spec-sheet dense bf16 peak is shown too (MFU is usually quoted against it).
The step is `vlm.train.train_step` — the function `train_stage` calls per optimizer step — set up as
`train_stage` sets it up (`train_step.OurStep`), on one micro-batch in `vlm.data.collate`'s format.
Last line: `RATIO mfu=<achieved / measured matmul peak>`.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from train_step import OurStep  # noqa: E402

SPEC_BF16_DENSE = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # vendor datasheets, dense (no sparsity)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, choices=list(C.MODELS), help="default: cpu-small on CPU, gpu-l336-1.5b on cuda")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on cuda")
    p.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 8 on cuda")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--answer-tokens", type=int, default=None, help="default: 64 on CPU, 448 on cuda")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--llm-layers", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="6-layer LLM, 2 repetitions")
    args = p.parse_args(argv)
    C.reexec_with_malloc_env()
    cuda = args.device.startswith("cuda")
    if not cuda:
        C.set_threads(args.threads)
    args.model = args.model or ("gpu-l336-1.5b" if cuda else "cpu-small")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.batch = args.batch or (8 if cuda else 2)
    args.answer_tokens = args.answer_tokens or (448 if cuda else 64)
    if args.quick:
        args.llm_layers, args.reps = args.llm_layers or 6, 2
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    model_cfg = copy.deepcopy(C.MODELS[args.model])
    if args.llm_layers:
        model_cfg["llm"]["config"]["num_hidden_layers"] = args.llm_layers
    print("machine:", C.machine())

    mm_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = C.matmul_flops_per_s(args.device, mm_dtype, n=8192 if cuda else 2048)
    print(f"measured {mm_dtype} matmul ({peak['n']}^3): median {peak['median'] / 1e9:,.1f} GFLOP/s, "
          f"best {peak['best'] / 1e9:,.1f} GFLOP/s" + ("" if cuda else f", per CPU-second {peak['cpu_median'] / 1e9:,.1f}"))

    vlm = C.build(model_cfg).to(args.device)
    if args.gradient_checkpointing:
        vlm.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = C.make_batch(vlm, args.batch, args.prompt_tokens, args.answer_tokens, seed=1)
    step = OurStep(vlm, C.STAGE2_FREEZE, args.precision)
    res = C.alternate({"stage-2 step": lambda: step([batch])}, reps=args.reps,
                      warmup=args.warmup, device=args.device)["stage-2 step"]
    seq = batch["input_ids"].shape[1]
    flops = C.train_step_flops(vlm, args.batch, seq, C.STAGE2_FREEZE)
    if args.gradient_checkpointing:
        print("note: with gradient checkpointing the LLM forward runs twice; those FLOPs are not counted (MFU, not HFU)")
    achieved = flops["total"] / res["median"]
    mfu = achieved / peak["median"]
    mfu_cpu = (flops["total"] / res["cpu_median"]) / peak["cpu_median"]  # both per CPU-second: robust to other jobs
    rows = [[part, f / 1e9, f / flops["total"]] for part, f in flops.items()]
    print(f"\nconfig {args.model}: vision {model_cfg['encoder']['config']}, llm {model_cfg['llm']['config']}, "
          f"batch {args.batch} x {seq} tokens, {args.precision}, reps {args.reps}")
    print(C.table(["part", "GFLOP/step", "share"], rows))
    print(C.table(["median s/step", "min", "max", "CPU s/step", "achieved GFLOP/s", "matmul peak GFLOP/s (median)",
                   "MFU", "peak MiB"],
                  [[res["median"], res["min"], res["max"], res["cpu_median"], achieved / 1e9, peak["median"] / 1e9,
                    f"{100 * mfu:.1f}%", res["peak_mib"]]]))
    if cuda:
        name = torch.cuda.get_device_name(0)
        spec = next((v for k, v in SPEC_BF16_DENSE.items() if k in name), None)
        if spec:
            print(f"MFU vs {name} datasheet dense bf16 peak {spec / 1e12:.0f} TFLOP/s: {100 * achieved / spec:.1f}% "
                  "(goal >= 45%)")
    if not cuda:
        print(f"MFU in CPU time (FLOPs per CPU-second of the step / of the matmul): {100 * mfu_cpu:.1f}%")
    print(f"RATIO mfu={mfu:.3f}" + ("" if cuda else f" (CPU time: {mfu_cpu:.3f})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

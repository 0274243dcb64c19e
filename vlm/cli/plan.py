"""`vlm plan RECIPE|GRID`: price a recipe or a grid before launch, from real shapes on the meta device.

Per point and stage: total and trainable parameters, image tokens, sequence length, FLOPs per sample,
memory per GPU under the recipe's strategy and process count, and GPU-hours at a stated MFU; grid totals.
Nothing is downloaded and no data is read (dataset sizes of the public LLaVA files are known; see
`vlm.plan.planner.KNOWN_SAMPLES`). The formulas: docs/plan.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from vlm.errors import UserError
from vlm.plan.planner import PEAK_FLOPS, Settings, plan_target, print_plan, to_json


def _samples(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdigit() or int(value) < 1:
            raise UserError(f"vlm plan: --samples {item!r} must be DATASET=N with N a positive integer, "
                            "e.g. --samples captions=558128.")
        out[name] = int(value)
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML or grid YAML (with `axes:`)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of a recipe, e.g. distributed.strategy=ddp")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOPs utilisation assumed for GPU-hours (default 0.4)")
    parser.add_argument("--gpu", choices=sorted(PEAK_FLOPS), default="h100",
                        help="GPU whose dense peak (bf16/fp16, or TF32 for fp32 stages) prices the FLOPs "
                             "(default h100)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per GPU (overrides --gpu)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="processes (GPUs) per run; default: distributed.num_processes, else the grid's "
                             "slurm.gpus_per_node, else 1")
    parser.add_argument("--samples", action="append", default=[], metavar="DATASET=N",
                        help="samples of a dataset plan cannot count (repeatable)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="text tokens per sample (default: fill max_length, the most a sample can cost)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.mfu <= 1:
        raise UserError(f"vlm plan: --mfu must be in (0, 1], got {args.mfu}.")
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"vlm plan: --gpus must be >= 1, got {args.gpus}.")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError(f"vlm plan: --peak-tflops must be positive, got {args.peak_tflops}.")
    if args.text_tokens is not None and args.text_tokens < 1:
        raise UserError(f"vlm plan: --text-tokens must be >= 1, got {args.text_tokens}.")
    peak = None if args.peak_tflops is None else args.peak_tflops * 1e12
    settings = Settings(mfu=args.mfu, gpu=args.gpu, peak_flops=peak,
                        processes=args.gpus, samples=_samples(args.samples), text_tokens=args.text_tokens)
    plans, warnings, title = plan_target(args.recipe, args.overrides, settings)
    if args.json:
        json.dump(to_json(plans, warnings, settings, title), sys.stdout, indent=2)
        print()
    else:
        print_plan(plans, warnings, settings, title)
    return 0

"""`vlm export RUN_DIR --to hf-llava --out DIR`: write a run as an HF LLaVA checkpoint."""
from __future__ import annotations

import argparse

from vlm.loading import load_vlm
from vlm.model.hf_llava import export_hf_llava


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run dir (or any spec load_vlm takes)")
    parser.add_argument("--to", required=True, choices=["hf-llava"], help="target format")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")


def run(args: argparse.Namespace) -> int:
    vlm = load_vlm(args.run_dir)
    out = export_hf_llava(vlm, args.out)
    print(f"wrote hf-llava checkpoint to {out}")
    return 0

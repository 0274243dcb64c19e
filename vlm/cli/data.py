"""`vlm data synth --out DIR`: generate the synthetic fine-grained world (see `vlm.world.synth`)."""
from __future__ import annotations

import argparse
import time

from vlm.world.synth.world import LIMITS, PRESETS, generate_world


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_cmd", required=True, metavar="{synth}")
    p = sub.add_parser("synth", help="generate the synthetic fine-grained world",
                       description="Generate the synthetic fine-grained world (classification, captions, VQA, "
                                   "SPEC-style sets). Same seed and settings give byte-identical files.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=list(PRESETS), default="demo", help="size preset (default: demo)")
    for key in LIMITS:
        lo, hi = LIMITS[key]
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None,
                       help=f"override the preset ({lo}..{hi})")
    p.add_argument("--force", action="store_true", help="regenerate, replacing an existing world (even one with other settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    t0 = time.time()
    settings = {k: getattr(args, k) for k in LIMITS}
    m = generate_world(args.out, seed=args.seed, preset=args.preset, force=args.force, progress=not args.quiet, **settings)
    sets = m["sets"]
    print(f"synthetic world in {args.out} (seed {m['seed']}, preset {m['preset']}, {len(m['classes'])} classes, "
          f"{len(m['files'])} files, {time.time() - t0:.1f}s)")
    for name, info in sets.items():
        extra = f", {info['questions']} questions" if "questions" in info else ""
        print(f"  {name:32s} {info['count']:6d}{extra}  {info['file']}")
    return 0

"""`vlm zoo list|prepare`: the offline model zoo (see `vlm.world.zoo.catalogue`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from vlm.errors import UserError
from vlm.world.zoo.catalogue import ZOO, cache_dir, entry_status, get_entry, prepare_entry


def _dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.exists() else 0


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="names, status, size and license of every zoo model")
    p = sub.add_parser("prepare", help="download, convert and verify zoo models (all non-optional ones by default)")
    p.add_argument("names", nargs="*", help="zoo models to prepare (default: all that need no license acceptance)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache is ready")
    p.add_argument("--accept-license", action="store_true", help="accept the license of entries that require it")


def run(args: argparse.Namespace) -> int:
    root = cache_dir()
    if args.action == "list":
        print(f"zoo cache: {root}")
        print(f"{'name':24} {'status':8} {'size':>9}  {'kind':8} license")
        for e in ZOO.values():
            status = entry_status(e, root)
            size = f"{_dir_size(root / e.name) / 2**20:.0f} MiB" if status == "ready" else "-"
            print(f"{e.name:24} {status:8} {size:>9}  {e.kind:8} {e.license}")
        return 0
    names = args.names or [n for n, e in ZOO.items() if e.license_notice is None]
    entries = [get_entry(n) for n in names]
    for e in entries:
        if e.license_notice is not None:
            print(f"{e.name}: {e.license_notice}")
            if not args.accept_license:
                raise UserError(f"{e.name} needs its license accepted: read it above and rerun with --accept-license.")
    for e in entries:
        prepare_entry(e, root, force=args.force)
    return 0

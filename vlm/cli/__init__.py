"""The `vlm` command line (also `python -m vlm`).

Each subcommand is one module of this package, `vlm.cli.<command>`, which defines
`configure(parser)` and `run(args) -> int | None` and calls into the library. Only the chosen
command's module is imported, so `vlm --help` stays fast. Library code never imports `vlm.cli`.

Exit codes: 0 success, 2 user error (one-paragraph message, no traceback), 1 internal failure.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import textwrap

from vlm import __version__
from vlm.errors import UserError

COMMANDS: dict[str, str] = {
    "train": "train a recipe into a run dir (run again with the same --out to resume)",
    "validate": "validate a recipe or grid and print the resolved plan",
    "eval": "evaluate a run dir or a model spec on named tasks",
    "grid": "run every point of an ablation grid",
    "status": "show the state of every point of a grid dir",
    "report": "write results.csv, report.md, report.html and plots for a grid dir",
    "export": "export a run dir to another format (hf-llava)",
    "zoo": "list or prepare the offline model zoo",
    "data": "generate the synthetic fine-grained world",
    "demo": "the README's main job: zoo, data, demo grid, report",
    "plan": "price a recipe or grid before launch: parameters, FLOPs, memory per GPU, GPU-hours (meta device)",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {help_}" for name, help_ in COMMANDS.items()]
    return "usage: vlm COMMAND [args]\n\ncommands:\n" + "\n".join(lines) + "\n\n`vlm COMMAND --help` for a command's options."


def _fail(msg: str) -> int:
    print(textwrap.fill(f"error: {msg}", width=100, break_long_words=False, break_on_hyphens=False), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        close = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        hint = f" Did you mean `vlm {close[0]}`?" if close else ""
        return _fail(f"unknown command {cmd!r}.{hint} Run `vlm --help` for the list.")
    parser = argparse.ArgumentParser(prog=f"vlm {cmd}", description=COMMANDS[cmd])
    module = importlib.import_module(f"vlm.cli.{cmd}")
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    try:
        rc = module.run(args)
    except UserError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

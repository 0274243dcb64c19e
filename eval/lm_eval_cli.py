"""`python -m eval.lm_eval_cli ARGS` = `lm_eval ARGS` with the `vlm_ablate` model registered.

    python -m eval.lm_eval_cli --model vlm_ablate --model_args run=runs/my-run --tasks hellaswag,arc_easy

A UserError (a spec that names no model, a request that cannot fit `max_length`) is one line on stderr and
exit status 2, as in the `vlm` CLI.
"""
from __future__ import annotations

import sys

import eval.lm_eval_adapter  # noqa: F401  (registers `vlm_ablate`)
from lm_eval.__main__ import cli_evaluate

from vlm.errors import UserError


def main() -> int:
    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

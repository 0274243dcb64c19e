"""`python -m eval.lm_eval_cli ARGS` = `lm_eval ARGS` with the `vlm_ablate` model registered.

    python -m eval.lm_eval_cli --model vlm_ablate --model_args run=runs/my-run --tasks hellaswag,arc_easy
"""
from __future__ import annotations

import eval.lm_eval_adapter  # noqa: F401  (registers `vlm_ablate`)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()

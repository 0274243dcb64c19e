"""Evaluation suite: fine-grained classification, general VQA, SPEC and pairwise diagnostics,
linear probes, and an lm-eval adapter. Pure scorers live in `eval.metrics`; tasks are plug-ins of
`eval.base.TASKS` built from `{type: ..., name: ...}` dicts; `eval.runner.evaluate` runs them."""

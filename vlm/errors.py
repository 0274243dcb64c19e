"""Errors the CLI turns into exit codes: `UserError` → 2 (message, no traceback)."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a recipe, a path, a dataset, a model spec.

    The message must say what is wrong, where, and how to fix it; the CLI prints it
    as one paragraph and exits with code 2.
    """

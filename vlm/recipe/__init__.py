"""Recipes: the schema and its composition (`schema.py`), artifact keys (`keys.py`), freeze policies (`freeze.py`)."""

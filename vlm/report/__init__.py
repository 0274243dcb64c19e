"""Grid reports: gather a grid dir (`collect.py`), axis effects (`effects.py`), plots and rendering."""

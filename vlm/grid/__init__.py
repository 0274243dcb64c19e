"""Ablation grids: the grid file (`spec.py`), planning and launching points (`points.py`), running one point
(`executors.py`)."""

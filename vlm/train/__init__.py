"""Training: the stage loop (`steps.py`), reading a run dir (`run_dir.py`), checkpoints, the feature cache and the
run's provenance."""

"""`vlm plan`: what a recipe or grid costs, from real shapes on the meta device (no weights, no data).

- `meta.py`: the recipe's model built by the training's own `build_vlm` on the meta device, from local
  config.json files or the stored configs in `hf_configs/`.
- `cost.py`: one training sample traced on that model: FLOPs (forward, backward, recompute) and the
  activations autograd keeps.
- `memory.py`: memory per GPU under ddp / fsdp / ZeRO-2 / ZeRO-3.
- `planner.py`: recipes and grids → per point and stage rows, GPU-hours, warnings, table and JSON.
"""

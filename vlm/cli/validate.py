"""`vlm validate RECIPE|GRID [key=value ...]`: check a recipe (or every point of a grid) and print the plan."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from eval.runner import check_recipe_tasks
from vlm.grid.points import validate_grid
from vlm.model.vlm import build_vlm
from vlm.recipe.freeze import MODULES, apply_policy, count_trainable, has_lora, merge_lora, module_of
from vlm.recipe.keys import stage_keys
from vlm.recipe.schema import enabled_stages, load_recipe, plain, read_yaml


def plan_rows(cfg: Any) -> list[tuple[str, list[tuple[str, str, int, float]]]]:
    """For `vlm validate`: per enabled stage, (module, mode, trainable params, lr) on a freshly built model."""
    vlm = build_vlm(plain(cfg["model"]))
    out = []
    for stage in enabled_stages(cfg):
        st = plain(cfg["stages"][stage])
        apply_policy(vlm, st["freeze"], st["optim"], f"stages.{stage}.freeze")
        rows = []
        for m in MODULES:
            p = st["freeze"][m]
            mode = p["mode"] + (f"(k={p['k']})" if p["mode"] == "partial" else f"(r={p['r']})" if p["mode"] == "lora" else "")
            lr = st["optim"]["lr"] if p["lr"] is None else p["lr"]
            rows.append((m, mode, count_trainable(module_of(vlm, m)), lr))
        out.append((stage, rows))
        for m in MODULES:  # later stages start from a plain model, as in training
            if has_lora(module_of(vlm, m)):
                merge_lora(module_of(vlm, m))
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (or a grid YAML with `axes:`)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.align.optim.lr=1e-3")


def _is_grid(path: Path) -> bool:
    body = read_yaml(path, "validate")
    return "grid" in body or "axes" in body


def run(args: argparse.Namespace) -> int:
    path = Path(args.recipe)
    if path.is_file() and _is_grid(path):
        rc = validate_grid(path)
        return int(rc or 0)
    cfg = load_recipe(path, args.overrides)
    check_recipe_tasks(cfg)
    print(f"recipe {path}: valid")
    print(f"  model: encoder={cfg.model.encoder.get('type')} connector={cfg.model.connector.get('type')} "
          f"llm={cfg.model.llm.get('path') or cfg.model.llm.get('config', {}).get('model_type', '?')}")
    print(f"  {'stage':<12} {'module':<10} {'mode':<16} {'trainable':>12} {'lr':>10}  data")
    for stage, rows in plan_rows(cfg):
        st = cfg.stages[stage]
        data = ", ".join(d.dataset + (f" x{d.weight:g}" if d.weight != 1 else "") +
                         (f" (max {d.max_samples})" if d.max_samples else "") for d in st.data)
        for i, (module, mode, n, lr) in enumerate(rows):
            print(f"  {stage if i == 0 else '':<12} {module:<10} {mode:<16} {n:>12,} {lr if n else '-':>10}  "
                  f"{data if i == 0 else ''}")
    for name, key in zip(enabled_stages(cfg), stage_keys(cfg)):
        print(f"  artifact {name}: {key}")
    return 0

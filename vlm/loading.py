"""`load_vlm(spec)`: one entry point for every way to name a model (above the model, recipe and run-dir layers).

Specs:
    RUN_DIR                      a training run (its recipe.yaml + final stage artifacts)
    path/to/recipe.yaml          a recipe's model section, freshly built (untrained connector)
    hf-llava:<dir or hub id>     an HF `LlavaForConditionalGeneration` checkpoint, as our trainable VLM
    hf:<dir or hub id>           any transformers image-text-to-text model, for evaluation (vlm.model.hf_auto)
    zoo:<encoder>+zoo:<llm>      offline-zoo parts with a fresh mlp2x_gelu connector (untrained)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.errors import UserError
from vlm.model.hf_auto import HFAutoVLM, load_hf_auto
from vlm.model.hf_llava import load_hf_llava
from vlm.model.vlm import VLM, build_vlm
from vlm.recipe.schema import load_recipe, plain
from vlm.train.run_dir import load_run
from vlm.world.zoo.catalogue import zoo_encoder_config, zoo_llm_config


def load_vlm(spec: str | Path, **kwargs: Any) -> VLM | HFAutoVLM:
    spec = str(spec)
    if spec.startswith("hf-llava:"):
        return load_hf_llava(spec[len("hf-llava:"):], **kwargs)
    if spec.startswith("hf:"):
        return load_hf_auto(spec[len("hf:"):], **kwargs)
    if spec.startswith("zoo:"):
        return _load_zoo_pair(spec)
    path = Path(spec)
    if path.is_dir() and (path / "recipe.yaml").exists():
        return load_run(path, **kwargs)
    if path.is_file() and path.suffix in {".yaml", ".yml"}:
        cfg = load_recipe(path)
        return build_vlm(plain(cfg.model))
    raise UserError(
        f"cannot load a VLM from {spec!r}: not a run dir (no recipe.yaml), a recipe file, 'hf-llava:<path>', "
        "'hf:<path or hub id>' or 'zoo:<encoder>+zoo:<llm>'."
    )


def _load_zoo_pair(spec: str) -> VLM:
    parts = spec.split("+")
    if len(parts) != 2 or not all(p.startswith("zoo:") for p in parts):
        raise UserError(f"zoo spec {spec!r} must name an encoder and an LLM: 'zoo:<encoder>+zoo:<llm>'")
    enc, llm = (p[len("zoo:"):] for p in parts)
    return build_vlm({
        "encoder": zoo_encoder_config(enc),
        "connector": {"type": "mlp", "depth": 2},
        "llm": zoo_llm_config(llm),
    }).eval()

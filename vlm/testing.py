"""Tiny configs of the real HF architectures (random init) for tests and benchmarks; library code never imports
this module. The offline tokenizers they use are `vlm.model.tokenizers` (`tokenizer: builtin:<family>`).

    cfg = tiny_llm_config("qwen2")             # llm: {config: ..., tokenizer: builtin:chatml}
    vlm = tiny_vlm("clip", "llama", "chatml")
"""
from __future__ import annotations

from typing import Any

import torch

from vlm.errors import UserError
from vlm.model.vlm import VLM, build_vlm

_TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024)
_TINY = {
    "llama": dict(_TINY_COMMON),
    "qwen2": dict(_TINY_COMMON),
    "mistral": dict(_TINY_COMMON, sliding_window=None),
    "gemma": dict(_TINY_COMMON, head_dim=16),
}


def tiny_llm_config(model_type: str) -> dict[str, Any]:
    """HF config kwargs (with `model_type`) of a 2-layer, 64-wide random-init causal LM."""
    if model_type not in _TINY:
        raise UserError(f"no tiny config for model_type {model_type!r}; known: {', '.join(sorted(_TINY))}.")
    return {"model_type": model_type, **_TINY[model_type]}


def tiny_vlm_config(encoder: str = "clip", llm: str = "llama", family: str = "chatml") -> dict[str, Any]:
    """Model section of a recipe: a tiny random-init HF encoder, mlp2x_gelu and a tiny causal LM."""
    encoders = {
        "clip": {"type": "clip", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                            "num_attention_heads": 4, "image_size": 28, "patch_size": 7}},
        "siglip": {"type": "siglip", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                                "num_attention_heads": 4, "image_size": 28, "patch_size": 7}},
    }
    if encoder not in encoders:
        raise UserError(f"no tiny encoder {encoder!r}; known: {', '.join(sorted(encoders))}.")
    return {
        "encoder": encoders[encoder],
        "connector": {"type": "mlp", "depth": 2},
        "llm": {"config": tiny_llm_config(llm), "tokenizer": f"builtin:{family}"},
    }


def tiny_vlm(encoder: str = "clip", llm: str = "llama", family: str = "chatml", seed: int = 0) -> VLM:
    """A tiny random-weight VLM of real HF architectures (deterministic for a seed), in eval mode."""
    torch.manual_seed(seed)
    return build_vlm(tiny_vlm_config(encoder, llm, family)).eval()

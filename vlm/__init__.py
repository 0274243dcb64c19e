"""vlm-ablate: ablation studies of LLaVA-style vision-language models.

    from vlm import load_vlm
    model = load_vlm("runs/my-run")          # or a recipe, "hf-llava:<dir>", "zoo:<name>"
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["VLM", "load_vlm", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import vlm.errors` (and `vlm --help`) does not pay for importing torch.
    if name == "load_vlm":
        from vlm.loading import load_vlm

        return load_vlm
    if name == "VLM":
        from vlm.model.vlm import VLM

        return VLM
    raise AttributeError(name)

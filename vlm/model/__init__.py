"""The VLM and its language side: composition (`vlm.py`), the LLM adapter (`llm.py`), chat templates and label
masks (`chat.py`, `templates/`), the built-in offline tokenizers (`tokenizers.py`) and HF LLaVA interop
(`hf_llava.py`)."""
from __future__ import annotations

from vlm.model.vlm import VLM, build_vlm, expand_image_tokens

__all__ = ["VLM", "build_vlm", "expand_image_tokens"]

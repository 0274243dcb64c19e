"""QLoRA (issue 17.11): a 4-bit (bitsandbytes NF4) LLM under LoRA, validated before any compute. It needs a GPU, so
here the checks and the loading call are tested; the training path runs where a GPU is lent."""
from __future__ import annotations

import pytest
import torch

from _train_data import write_recipe
from vlm.errors import UserError
from vlm.recipe.schema import load_recipe

@pytest.mark.parametrize("over, msg", [
    (["stages.finetune.freeze.llm=full"], "LoRA"),
    (["stages.finetune.freeze.llm=partial"], "LoRA"),
    (["stages.finetune.freeze.llm=lora", "distributed.strategy=fsdp"], "fsdp"),
    (["stages.finetune.freeze.llm=lora", "distributed.strategy=deepspeed_zero3"], "zero3"),
])
def test_recipe_checks(tmp_path, over, msg):
    p = write_recipe(tmp_path)
    with pytest.raises(UserError, match=msg):
        load_recipe(p, ["model.llm={path: some/llm, quantization: 4bit, tokenizer: 'builtin:chatml'}", *over])


def test_random_init_cannot_be_quantized(tmp_path):
    p = write_recipe(tmp_path)
    with pytest.raises(UserError, match="path"):
        load_recipe(p, ["model.llm.quantization=4bit", "stages.finetune.freeze.llm=lora"])


def test_unknown_quantization_is_refused(tmp_path):
    p = write_recipe(tmp_path)
    with pytest.raises(UserError, match="quantization"):
        load_recipe(p, ["model.llm={path: some/llm, quantization: 3bit, tokenizer: 'builtin:chatml'}",
                        "stages.finetune.freeze.llm=lora"])


def test_building_needs_cuda_and_bitsandbytes(monkeypatch):
    from vlm.model.llm import build_llm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA"):
        build_llm({"path": "some/llm", "quantization": "4bit", "tokenizer": "builtin:chatml"})


def test_the_4bit_load_call(monkeypatch):
    """With CUDA and bitsandbytes present, the LLM is loaded with an NF4 config (double quantization, bf16 compute)
    as QLoRA / LLaVA's --bits 4 do, and prepared for k-bit training."""
    import importlib.util

    import transformers

    from vlm.model import llm as llm_mod

    seen = {}

    class Stop(Exception):
        pass

    def fake_from_pretrained(src, **kw):
        seen.update(kw, src=src)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: object() if n == "bitsandbytes" else real_find(n, *a))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(Stop):
        llm_mod.build_llm({"path": "some/llm", "quantization": "4bit", "tokenizer": "builtin:chatml"})
    q = seen["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and seen["dtype"] == torch.bfloat16
    assert seen["device_map"] == {"": 0}  # this process's GPU (LOCAL_RANK)

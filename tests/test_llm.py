"""build_llm: random init of the real HF architectures, local pretrained dirs, tokens added, errors."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from vlm.errors import UserError
from vlm.model.chat import tokenize_conversation
from vlm.model.llm import build_llm
from vlm.model.tokenizers import builtin_tokenizer
from vlm.testing import tiny_llm_config
from vlm.world.zoo import catalogue

PAIRS = [("llama", "llama3", "LlamaForCausalLM"), ("qwen2", "chatml", "Qwen2ForCausalLM"),
         ("mistral", "mistral", "MistralForCausalLM"), ("gemma", "gemma", "GemmaForCausalLM")]


@pytest.mark.parametrize("model_type,family,cls", PAIRS)
def test_random_init(model_type, family, cls):
    llm = build_llm({"config": tiny_llm_config(model_type), "tokenizer": f"builtin:{family}"})
    tok, model = llm.tokenizer, llm.model
    assert type(model).__name__ == cls
    assert model.config.num_hidden_layers == 2 and llm.hidden_size == 64
    assert llm.image_token == "<image>" and tok.convert_tokens_to_ids("<image>") == llm.image_token_id
    assert model.get_input_embeddings().num_embeddings == len(tok) > llm.image_token_id
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    assert model.config._attn_implementation == "sdpa"
    ids, labels = tokenize_conversation(tok, [{"role": "user", "content": "<image>\nHi"},
                                              {"role": "assistant", "content": "Hello."}], sample_id=0)
    out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    assert torch.isfinite(out.loss)
    # the end-of-turn token stops generation
    assert [t for t in labels if t != -100][-1] in llm.stop_token_ids and model.generation_config.eos_token_id == llm.stop_token_ids


def test_gemma_stops_on_end_of_turn_and_eos():
    llm = build_llm({"config": tiny_llm_config("gemma"), "tokenizer": "builtin:gemma"})
    tok = llm.tokenizer
    assert llm.stop_token_ids == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]


def test_pad_token_choice():
    assert build_llm({"config": tiny_llm_config("llama"), "tokenizer": "builtin:vicuna_v1"}).tokenizer.pad_token == "<unk>"
    assert build_llm({"config": tiny_llm_config("llama"), "tokenizer": "builtin:llama3"}).tokenizer.pad_token == "<|eot_id|>"
    assert build_llm({"config": tiny_llm_config("qwen2"), "tokenizer": "builtin:chatml"}).tokenizer.pad_token == "<|endoftext|>"


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A 'pretrained' Qwen2 LM + chatml tokenizer without <image>, saved as on the hub."""
    path = tmp_path_factory.mktemp("qwen2")
    tok = builtin_tokenizer("chatml")
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**tiny_llm_config("qwen2"), vocab_size=len(tok))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_from_local_dir_adds_image_token_with_mean_row(pretrained_dir):
    ref = AutoModelForCausalLM.from_pretrained(pretrained_dir)
    old = ref.get_input_embeddings().weight.detach()
    llm = build_llm({"path": str(pretrained_dir)})
    new = llm.model.get_input_embeddings().weight.detach()
    assert llm.image_token_id == old.shape[0] and new.shape[0] == old.shape[0] + 1
    torch.testing.assert_close(new[:-1], old)
    torch.testing.assert_close(new[-1], old.mean(0), atol=1e-2, rtol=0)  # mean-resizing samples around the mean
    ids = torch.tensor([[5, 9, 17]])
    torch.testing.assert_close(llm.model(input_ids=ids).logits[..., :old.shape[0]], ref(input_ids=ids).logits)


def test_chat_template_override_is_per_instance(pretrained_dir):
    llm = build_llm({"path": str(pretrained_dir), "chat_template": "vicuna_v1", "dtype": "bfloat16"})
    assert llm.model.dtype == torch.bfloat16
    assert "ASSISTANT:" in llm.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                             add_generation_prompt=True)
    fresh = AutoTokenizer.from_pretrained(pretrained_dir)
    assert "<|im_start|>" in fresh.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert "<image>" not in fresh.get_vocab()


def test_zoo_paths_resolve_lazily(pretrained_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(catalogue, "resolve", lambda spec: seen.append(spec) or pretrained_dir)
    llm = build_llm({"path": "zoo:tiny-qwen"})
    assert type(llm.model).__name__ == "Qwen2ForCausalLM" and seen == ["zoo:tiny-qwen"]


@pytest.mark.parametrize("cfg,match", [
    ({"tokenizer": "builtin:chatml"}, "exactly one of"),
    ({"path": "x", "config": {"model_type": "llama"}}, "exactly one of"),
    ({"config": {"hidden_size": 8}, "tokenizer": "builtin:chatml"}, "model_type"),
    ({"config": tiny_llm_config("llama")}, "needs a `tokenizer`"),
    ({"config": tiny_llm_config("llama"), "tokenizer": "builtin:nope"}, "unknown builtin tokenizer"),
    ({"config": tiny_llm_config("llama"), "tokenizer": "builtin:chatml", "chat_template": "nope"}, r"llm\.chat_template = 'nope' is not a chat template"),
    ({"config": tiny_llm_config("llama"), "tokenizer": "builtin:chatml", "dtype": "float8"}, "dtype"),
    ({"config": tiny_llm_config("llama"), "tokenizer": "builtin:chatml", "lr": 1}, r"unknown key llm\.lr\."),
    ({"path": "/nonexistent/dir/model"}, "cannot load"),
])
def test_bad_configs_are_user_errors(cfg, match):
    with pytest.raises(UserError, match=match):
        build_llm(cfg)

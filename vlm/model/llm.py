"""The language-model adapter: any HF causal LM + its tokenizer, with one `<image>` placeholder token.

    llm = build_llm({"path": "Qwen/Qwen2.5-0.5B-Instruct"})
    llm = build_llm({"config": tiny_llm_config("llama"), "tokenizer": "builtin:llama3"})   # random init

cfg keys:
  path               HF hub id, local dir, or `zoo:<name>` (resolved by `vlm.world.zoo.catalogue.resolve`).
  config             HF config kwargs with `model_type`: random init of that architecture (instead of `path`).
                     `vocab_size` defaults to the tokenizer's length; bos/eos/pad ids come from the tokenizer.
  tokenizer          path / hub id, or `builtin:<family>` (`vlm.model.tokenizers`); default: `path`.
  chat_template      null = the tokenizer's own; else a name in vlm/model/templates/ (vicuna_v1, plain, chatml, ...),
                     set on this tokenizer instance only.
  dtype              float32 | bfloat16 | float16 (default float32).
  attn_implementation  default "sdpa".
  quantization       null | 4bit: QLoRA's NF4 weights with double quantization (bitsandbytes; needs a CUDA GPU and
                     pretrained weights; every stage that trains the LLM trains LoRA adapters on it).

Tokens added when missing: `<image>` (an extra special token) and a pad token — the tokenizer's
`unk` when it has one (LLaVA's choice for Llama tokenizers), else its `eos`. Neither grows the
vocabulary beyond `<image>`; new embedding rows are initialised to the mean of the old ones.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from vlm.config import DTYPES, DtypeName, check
from vlm.errors import UserError
from vlm.model.chat import TemplateName, load_template, tokenize_conversation
from vlm.model.tokenizers import builtin_tokenizer
from vlm.world.zoo.catalogue import maybe_resolve

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class LLMOptions:
    """The keys of an `llm` config (checked by `vlm.config.check`; see the module docstring)."""

    path: Optional[str] = None
    config: Optional[dict[str, Any]] = None
    tokenizer: Optional[str] = None
    chat_template: Optional[TemplateName] = None
    dtype: Optional[DtypeName] = "float32"  # null = float32
    attn_implementation: Optional[str] = None  # null = sdpa
    quantization: Optional[Literal["4bit"]] = None  # QLoRA: NF4 weights (bitsandbytes, CUDA), trained through LoRA


def check_llm_config(cfg: Mapping[str, Any], where: str = "llm") -> dict[str, Any]:
    """An `llm` config with its keys, types and chat template checked and defaults filled in (nothing is loaded)."""
    opts = check(cfg, LLMOptions, where)
    if (opts["path"] is None) == (opts["config"] is None):
        raise UserError(f"{where} needs exactly one of `path` (pretrained weights) or `config` (random init).")
    if opts["config"] is not None and opts["tokenizer"] is None:
        raise UserError(f"{where} with `config` (random init) needs a `tokenizer` (a path or builtin:<family>).")
    if opts["quantization"] is not None and opts["path"] is None:
        raise UserError(f"{where}.quantization: {opts['quantization']} quantizes pretrained weights as they load; give "
                        "`path` (a random-init `config` model cannot be quantized).")
    return opts


def quantized_load_kwargs(opts: Mapping[str, Any], where: str = "llm") -> dict[str, Any]:
    """`from_pretrained` arguments of a QLoRA LLM (`opts`: a checked `llm` config with `quantization: 4bit`): NF4
    weights with double quantization and bf16 (or the `dtype` given, if 16-bit) compute, as QLoRA and LLaVA's
    `--bits 4` load them, placed on this process's GPU."""
    if not torch.cuda.is_available():
        raise UserError(f"{where}.quantization: {opts['quantization']} (QLoRA) needs a CUDA GPU for bitsandbytes' "
                        "4-bit kernels and none is visible; run on a GPU node or remove the quantization.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{where}.quantization: {opts['quantization']} needs bitsandbytes, which is not installed; "
                        "`pip install bitsandbytes`.")
    compute = DTYPES[opts["dtype"]] if opts["dtype"] in ("bfloat16", "float16") else torch.bfloat16
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute)
    return {"quantization_config": q, "dtype": compute, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


@dataclass
class LanguageModel:
    model: Any
    tokenizer: Any
    image_token: str = IMAGE_TOKEN
    image_token_id: int = -1
    cfg: dict[str, Any] = field(default_factory=dict)
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end an assistant turn (eos and the chat template's end-of-turn token)."""

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim


def _resolve_path(path: str) -> str:
    return str(maybe_resolve(path))


def load_tokenizer(spec: str) -> Any:
    """`builtin:<family>`, a local dir, or a hub id → a fresh tokenizer instance."""
    if spec.startswith("builtin:"):
        return builtin_tokenizer(spec.split(":", 1)[1])
    try:
        return AutoTokenizer.from_pretrained(_resolve_path(spec))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {spec!r}: {e}. Give a local dir, a reachable hub id, "
                        f"or builtin:<family> (llm.tokenizer).") from e


def set_chat_template(tokenizer: Any, name: str) -> None:
    """Set `vlm/templates/<name>.jinja` as this tokenizer's chat template (this instance only)."""
    tokenizer.chat_template = load_template(name)


def add_image_token(tokenizer: Any) -> int:
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"tokenizer splits {IMAGE_TOKEN!r} into {ids}; it must be one token.")
    return ids[0]


def _ensure_pad(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise UserError("tokenizer has no pad, unk or eos token to pad with; set one in the tokenizer files.")


def build_llm(cfg: Mapping[str, Any], where: str = "llm") -> LanguageModel:
    """The LLM of an `llm` config (`where`: its path in the recipe, for error messages)."""
    cfg = dict(cfg)
    opts = check_llm_config(cfg, where)
    path, config = opts["path"], opts["config"]
    src = None if path is None else _resolve_path(str(path))
    dtype = DTYPES[opts["dtype"] or "float32"]
    attn = opts["attn_implementation"] or "sdpa"

    tokenizer = load_tokenizer(str(opts["tokenizer"] or src))
    if opts["chat_template"]:
        set_chat_template(tokenizer, opts["chat_template"])
    _ensure_pad(tokenizer)
    image_token_id = add_image_token(tokenizer)

    if config is not None:
        config = dict(config)
        if "model_type" not in config:
            raise UserError(f"llm.config needs a `model_type` (llama, qwen2, mistral, gemma, ...); got {sorted(config)}.")
        config.setdefault("vocab_size", len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            config.setdefault(key, getattr(tokenizer, key))
        hf_config = AutoConfig.for_model(**config)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=attn)
    else:
        try:
            load = quantized_load_kwargs(opts, where) if opts["quantization"] else {"dtype": dtype}
            model = AutoModelForCausalLM.from_pretrained(src, attn_implementation=attn, **load)
        except OSError as e:
            raise UserError(f"cannot load language model {path!r}: {e}. Give a local dir or a reachable hub id.") from e
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    llm = LanguageModel(model=model, tokenizer=tokenizer, image_token=IMAGE_TOKEN, image_token_id=image_token_id,
                        cfg=cfg)
    llm.stop_token_ids = stop_token_ids(tokenizer)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = llm.stop_token_ids
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return llm


def stop_token_ids(tokenizer: Any) -> list[int]:
    """eos plus the template's end-of-turn token (the last labelled token of a probe conversation)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template:
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        try:
            _, labels = tokenize_conversation(tokenizer, probe, sample_id="<stop-token probe>")
        except UserError:
            return ids
        last = [t for t in labels if t != -100][-1]
        if last not in ids:
            ids.append(last)
    return ids

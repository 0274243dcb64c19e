"""Built-in offline tokenizers: tiny tokenizers with each family's real special tokens and chat format,
for random-init LMs (`llm: {config: ..., tokenizer: builtin:<family>}`) where no hub is reachable.

    tok = builtin_tokenizer("chatml")

They are byte-level BPE models trained in-process, deterministically, on a small fixed corpus
(vocab ≈ 600): any text round-trips, ids are stable across runs, and no network is needed.
The chat templates are `vlm/model/templates/<family>.jinja`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vlm.errors import UserError
from vlm.model.chat import load_template

VOCAB_SIZE = 700


@dataclass(frozen=True)
class Family:
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    unk: str | None = None
    pad: str | None = None
    add_bos: bool = True
    template: str = ""


_LLAMA2_SPECIALS = ("<unk>", "<s>", "</s>")
FAMILIES: dict[str, Family] = {
    # Llama-3 Instruct: eos is the end-of-turn token, no pad/unk.
    "llama3": Family(("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                     bos="<|begin_of_text|>", eos="<|eot_id|>", template="llama3"),
    # Qwen2 / Qwen2.5 Instruct: no BOS; <|endoftext|> is the pad token.
    "chatml": Family(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None, eos="<|im_end|>",
                     pad="<|endoftext|>", add_bos=False, template="chatml"),
    # Vicuna / LLaVA-v1 and Mistral-v0.1/0.2: the Llama-2 sentencepiece specials.
    "vicuna_v1": Family(_LLAMA2_SPECIALS, bos="<s>", eos="</s>", unk="<unk>", template="vicuna_v1"),
    "mistral": Family(_LLAMA2_SPECIALS, bos="<s>", eos="</s>", unk="<unk>", template="mistral"),
    "gemma": Family(("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
                    bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>", template="gemma"),
    # A base (non-chat) Llama-2-style tokenizer paired with LLaVA's plain caption format.
    "plain": Family(_LLAMA2_SPECIALS, bos="<s>", eos="</s>", unk="<unk>", template="plain"),
}

_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "You are a helpful assistant. You are Qwen, created by Alibaba Cloud.",
    "system user assistant model USER: ASSISTANT: [INST] [/INST]",
    "What type of object is in this photo? The photo features a small red bird on a branch.",
    "What is the color of the car? The car is blue. How many flowers are there? There are three flowers.",
    "Describe the image in detail. A large dog sits to the left of a white cat on green grass.",
    "Which one is bigger, the apple or the orange? The orange is bigger than the apple.",
    "Is there a person in the picture? Yes, there is a person standing near the window.",
    "A photo of a sparrow, a robin, a finch, a tulip, a rose, a daisy, a sedan, a pickup truck.",
    "Answer the question using a single word or phrase. Hello! How are you? I am fine, thank you.",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 (a) (b) (c) (d) (e) A. B. C. D. E.",
]


@functools.lru_cache(maxsize=None)
def _trained_json(specials: tuple[str, ...]) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def builtin_tokenizer(family: str) -> Any:
    """A fresh (unshared) tokenizer of `family`: llama3, chatml, vicuna_v1, mistral, gemma, plain."""
    if family not in FAMILIES:
        raise UserError(f"unknown builtin tokenizer family {family!r}; known: {', '.join(sorted(FAMILIES))}.")
    fam = FAMILIES[family]
    tok = Tokenizer.from_str(_trained_json(fam.specials))
    if fam.add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
            special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = {k: v for k, v in (("bos_token", fam.bos), ("eos_token", fam.eos), ("unk_token", fam.unk),
                                ("pad_token", fam.pad)) if v is not None}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    hf.chat_template = load_template(fam.template)
    return hf

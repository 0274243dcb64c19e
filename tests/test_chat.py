"""Golden prompt strings and label masks per chat family, and the failures that must be loud."""
from __future__ import annotations

import pytest

from vlm.errors import UserError
from vlm.model.chat import IGNORE_INDEX, tokenize_caption, tokenize_conversation, tokenize_prompt
from vlm.model.llm import add_image_token
from vlm.model.tokenizers import builtin_tokenizer

SYS = "You are a careful assistant."
CONV = [
    {"role": "system", "content": SYS},
    {"role": "user", "content": "<image>\nWhat bird is this?"},
    {"role": "assistant", "content": "A robin."},
    {"role": "user", "content": "How many?"},
    {"role": "assistant", "content": "There are 2 birds."},
]
Q1, Q2, A1, A2 = "<image>\nWhat bird is this?", "How many?", "A robin.", "There are 2 birds."
VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")

# family → (full render, labelled spans decoded, generation prompt for a user message "Hi")
GOLDEN = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYS + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n" + Q1 + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + A1 + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n" + Q2 + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + A2 + "<|eot_id|>",
        [A1 + "<|eot_id|>", A2 + "<|eot_id|>"],
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "chatml": (
        "<|im_start|>system\n" + SYS + "<|im_end|>\n<|im_start|>user\n" + Q1 + "<|im_end|>\n"
        "<|im_start|>assistant\n" + A1 + "<|im_end|>\n<|im_start|>user\n" + Q2 + "<|im_end|>\n"
        "<|im_start|>assistant\n" + A2 + "<|im_end|>\n",
        [A1 + "<|im_end|>", A2 + "<|im_end|>"],
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    ),
    "vicuna_v1": (
        "<s>" + SYS + " USER: " + Q1 + " ASSISTANT: " + A1 + "</s>USER: " + Q2 + " ASSISTANT: " + A2 + "</s>",
        [" " + A1 + "</s>", " " + A2 + "</s>"],
        "<s>" + VICUNA_SYS + " USER: Hi ASSISTANT:",
    ),
    "mistral": (
        "<s> [INST] " + SYS + "\n\n" + Q1 + " [/INST] " + A1 + "</s> [INST] " + Q2 + " [/INST] " + A2 + "</s>",
        [" " + A1 + "</s>", " " + A2 + "</s>"],
        "<s> [INST] Hi [/INST]",
    ),
    "gemma": (
        "<bos><start_of_turn>user\n" + SYS + "\n\n" + Q1 + "<end_of_turn>\n<start_of_turn>model\n" + A1 +
        "<end_of_turn>\n<start_of_turn>user\n" + Q2 + "<end_of_turn>\n<start_of_turn>model\n" + A2 + "<end_of_turn>\n",
        [A1 + "<end_of_turn>", A2 + "<end_of_turn>"],
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    ),
}


def tokenizer(family: str):
    tok = builtin_tokenizer(family)
    add_image_token(tok)
    return tok


def labelled_spans(tok, ids, labels) -> list[str]:
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tok.decode(s) for s in spans]


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_golden_render_and_label_mask(family):
    tok = tokenizer(family)
    text, spans, gen_prompt = GOLDEN[family]
    assert tok.apply_chat_template(CONV, tokenize=False) == text
    ids, labels = tokenize_conversation(tok, CONV, sample_id="s0")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert len(labels) == len(ids)
    assert labelled_spans(tok, ids, labels) == spans
    assert tok.decode(tokenize_prompt(tok, "Hi", chat_template=True)) == gen_prompt


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_llava_from_value_messages_are_the_same(family):
    tok = tokenizer(family)
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    llava = [{"from": roles[m["role"]], "value": m["content"]} for m in CONV]
    assert tokenize_conversation(tok, llava, sample_id=1) == tokenize_conversation(tok, CONV, sample_id=1)


def test_image_is_one_token_and_never_labelled():
    tok = tokenizer("chatml")
    image_id = tok.convert_tokens_to_ids("<image>")
    assert tok("a<image>b", add_special_tokens=False)["input_ids"].count(image_id) == 1
    assert tok("<image>", add_special_tokens=False)["input_ids"] == [image_id]
    conv = [{"role": "user", "content": "<image><image>\nSame?"}, {"role": "assistant", "content": "Yes <image>"}]
    ids, labels = tokenize_conversation(tok, conv, sample_id="x")
    assert ids.count(image_id) == 3
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == image_id)


def test_plain_caption_format():
    tok = tokenizer("plain")
    ids, labels = tokenize_caption(tok, "A robin on a branch.", sample_id="c1")
    assert tok.decode(ids) == "<s><image>A robin on a branch.\n"  # LLaVA-1.5: sep "\n", no eos
    assert labelled_spans(tok, ids, labels) == ["A robin on a branch.\n"]
    # LLaVA's plain drops the instruction text of the user turn and keeps the image placeholder
    conv = [{"from": "human", "value": "<image>\nDescribe the photo."}, {"from": "gpt", "value": "A robin."}]
    ids2, _ = tokenize_conversation(tok, conv, sample_id="c2")
    assert tok.decode(ids2) == "<s><image>A robin.\n"
    assert tok.decode(tokenize_prompt(tok, "<image>\nDescribe.", chat_template=True)) == "<s><image>"
    # any chat tokenizer can be switched to the plain format for one call (a chatml tokenizer has no BOS)
    chat_tok = tokenizer("chatml")
    ids3, labels3 = tokenize_caption(chat_tok, "A robin.", sample_id="c3")
    assert chat_tok.decode(ids3) == "<image>A robin.\n"
    assert labelled_spans(chat_tok, ids3, labels3) == ["A robin.\n"]


def test_prompt_without_chat_template_is_verbatim():
    vic, qwen = tokenizer("vicuna_v1"), tokenizer("chatml")
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    assert tokenize_prompt(vic, prompt, chat_template=False) == [vic.bos_token_id] + vic(prompt, add_special_tokens=False)["input_ids"]
    assert tokenize_prompt(qwen, prompt, chat_template=False) == qwen(prompt, add_special_tokens=False)["input_ids"]
    assert tokenize_prompt(qwen, "Hi", chat_template="vicuna_v1") == qwen(
        VICUNA_SYS + " USER: Hi ASSISTANT:", add_special_tokens=False)["input_ids"]


# Mistral tokenizer-v3 style (as in its HF template): the system prompt goes into the LAST user turn, so
# earlier renders are not prefixes of later ones.
SYSTEM_IN_LAST_USER = (
    "{{ bos_token }}{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
    "{% set last_user = msgs | selectattr('role', 'equalto', 'user') | list | last %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}{{ '[INST] ' + (sys + '\n\n' if m is sameas last_user else '') "
    "+ m['content'] + '[/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
# the generation prompt names a role the assistant turns do not use
HEADER_MISMATCH = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>model\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", [SYSTEM_IN_LAST_USER, HEADER_MISMATCH])
def test_misaligned_template_raises_naming_the_sample(template):
    tok = tokenizer("chatml")
    with pytest.raises(UserError, match=r"tokenization mismatch in sample 'sample-42'"):
        tokenize_conversation(tok, CONV, sample_id="sample-42", chat_template=template)


def test_all_ignored_samples_raise_naming_the_sample():
    tok = tokenizer("llama3")
    with pytest.raises(UserError, match=r"sample 'only-user' has no trainable token"):
        tokenize_conversation(tok, [{"role": "user", "content": "Hi"}], sample_id="only-user")
    drops_assistant = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(UserError, match=r"sample 7 has no trainable token"):
        tokenize_conversation(tok, CONV, sample_id=7, chat_template=drops_assistant)


def test_bad_messages_and_missing_image_token_raise():
    tok = builtin_tokenizer("chatml")  # no <image> added
    with pytest.raises(UserError, match="sample 'a'.*no such token"):
        tokenize_conversation(tok, CONV, sample_id="a")
    with pytest.raises(UserError, match="sample 'b'"):
        tokenize_conversation(tok, [{"role": "robot", "content": "x"}], sample_id="b")
    with pytest.raises(UserError, match="sample 'c' starts with an assistant turn"):
        tokenize_conversation(tok, [{"role": "assistant", "content": "x"}], sample_id="c")
    gemma = tokenizer("gemma")  # its template rejects two user turns in a row
    with pytest.raises(UserError, match="sample 'd': the chat template rejects"):
        tokenize_conversation(gemma, [CONV[1], CONV[3], CONV[4]], sample_id="d")


def test_over_long_raises_unless_truncation_drops_trailing_turns():
    tok = tokenizer("chatml")
    ids, labels = tokenize_conversation(tok, CONV, sample_id="full")
    first_turn_end = len(tok(GOLDEN["chatml"][0].split(Q2)[0][:-len("<|im_start|>user\n")],
                             add_special_tokens=False)["input_ids"])
    with pytest.raises(UserError, match="sample 'long' is .* over max_length"):
        tokenize_conversation(tok, CONV, sample_id="long", max_length=len(ids) - 1)
    ids_t, labels_t = tokenize_conversation(tok, CONV, sample_id="long", max_length=len(ids) - 1, truncate=True)
    assert ids_t == ids[:first_turn_end] and labels_t == labels[:first_turn_end]
    assert labelled_spans(tok, ids_t, labels_t) == [A1 + "<|im_end|>"]
    # images count as N' tokens: 1 + (N'-1) extra
    assert tokenize_conversation(tok, CONV, sample_id="ok", max_length=len(ids) + 9, image_token_length=10)[0] == ids
    with pytest.raises(UserError, match="over max_length"):
        tokenize_conversation(tok, CONV, sample_id="img", max_length=len(ids) + 8, image_token_length=10)
    with pytest.raises(UserError, match="first assistant turn already ends past it"):
        tokenize_conversation(tok, CONV, sample_id="short", max_length=5, truncate=True)
    late_image = CONV[:3] + [{"role": "user", "content": "<image>\nAnd this?"}, CONV[4]]
    n = len(tokenize_conversation(tok, late_image, sample_id="li")[0])
    with pytest.raises(UserError, match="hold an <image>"):
        tokenize_conversation(tok, late_image, sample_id="li", max_length=n - 1, truncate=True)


def test_builtin_tokenizers_are_deterministic_and_fresh():
    a, b = builtin_tokenizer("gemma"), builtin_tokenizer("gemma")
    assert a.get_vocab() == b.get_vocab()
    text = "The photo features a small red bird. 1234 ünïcödé"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.decode(a(text, add_special_tokens=False)["input_ids"]) == text
    add_image_token(a)
    assert "<image>" not in b.get_vocab()  # no shared state between instances
    assert 400 < len(b) <= 1000


def test_chatml_nosystem_renders_no_default_system_turn():
    """`chatml_nosystem`: ChatML turns exactly as `chatml`, minus the default system turn (shorter demo samples)."""
    tok = tokenizer("chatml")
    conv = CONV[1:3]
    text = "<|im_start|>user\n" + Q1 + "<|im_end|>\n<|im_start|>assistant\n" + A1 + "<|im_end|>\n"
    ids, labels = tokenize_conversation(tok, conv, sample_id="s0", chat_template="chatml_nosystem")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert labelled_spans(tok, ids, labels) == [A1 + "<|im_end|>"]
    with_system = tokenize_conversation(tok, CONV, sample_id="s0", chat_template="chatml_nosystem")
    assert with_system == tokenize_conversation(tok, CONV, sample_id="s0", chat_template="chatml")
    assert tok.decode(tokenize_prompt(tok, "Hi", chat_template="chatml_nosystem")) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

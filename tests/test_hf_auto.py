"""`hf:` models: our score/generate equal the HF model's own forward and generate, per architecture.

Each test builds a tiny random-weight checkpoint of a real HF image-text-to-text architecture offline (a
tiny config, a processor around a byte-level test tokenizer with that family's special tokens and a chat
template in the family's format), saves it, loads it with `load_vlm("hf:<dir>")`, and compares with the
HF reference path: `processor.apply_chat_template` on list-of-parts messages holding the images
(`tokenize=True, return_dict=True`), then the model's full forward on prompt + continuation (log-probs,
1e-4 in fp32) and `model.generate` (greedy, token for token).
"""
from __future__ import annotations

import dataclasses

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm import load_vlm
from vlm.errors import UserError
from vlm.model.hf_auto import HFAutoVLM
from vlm.model.tokenizers import builtin_tokenizer

QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaVA-NeXT (Mistral) puts a message's images before its text, whatever their order.
LLAVA_NEXT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %} [/INST]"
    "{% else %}{% for c in message['content'] if c['type'] == 'text' %} {{ c['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}<start_of_turn>{{ role }}\n{% if message['content'] is string %}"
    "{{ message['content'] | trim }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7)


def _specials(tok, tokens: list[str]) -> None:
    tok.add_special_tokens({"additional_special_tokens": tokens})


def _ids(tok, **names: str) -> dict[str, int]:
    return {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}


def _text_cfg(tok, **extra):
    return dict(TEXT, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, **extra)


def _qwen2_vl():
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tok = builtin_tokenizer("chatml")
    _specials(tok, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    grid = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    proc = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, **grid),
        video_processor=Qwen2VLVideoProcessor(**grid), tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE)
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=_text_cfg(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                    "rope_theta": 10000.0}),
        **_ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>"))
    return Qwen2VLForConditionalGeneration(cfg), proc


def _llava_next():
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    tok = builtin_tokenizer("mistral")
    _specials(tok, ["<image>"])
    pinpoints = [[28, 28], [28, 56], [56, 28]]
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                image_grid_pinpoints=pinpoints),
        tokenizer=tok, patch_size=7, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_TEMPLATE)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION).to_dict(), text_config=dict(_text_cfg(tok), model_type="mistral"),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                          vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=16)
    return LlavaNextForConditionalGeneration(cfg), proc


def _idefics3():
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor)

    tok = builtin_tokenizer("llama3")
    rows = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    _specials(tok, ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows])
    proc = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size={"longest_edge": 56}, max_image_size={"longest_edge": 28}),
        tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    cfg = Idefics3Config(vision_config=dict(VISION), text_config=dict(_text_cfg(tok), model_type="llama"),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    return Idefics3ForConditionalGeneration(cfg), proc


def _gemma3():
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              PreTrainedTokenizerFast, SiglipVisionConfig)

    base = builtin_tokenizer("gemma")
    _specials(base, ["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    # Gemma 3's processor reads the image tokens as named tokenizer attributes (boi_token, ...)
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", pad_token="<pad>", extra_special_tokens={
                                      "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                      "image_token": "<image_soft_token>"})
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 28, "width": 28}), tokenizer=tok,
                           image_seq_length=4, chat_template=GEMMA3_TEMPLATE)
    cfg = Gemma3Config(vision_config=SiglipVisionConfig(**VISION).to_dict(),
                       text_config=_text_cfg(tok, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
                       mm_tokens_per_image=4,
                       **_ids(tok, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                              image_token_index="<image_soft_token>"))
    return Gemma3ForConditionalGeneration(cfg), proc


def _paligemma():
    from transformers import (PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)

    tok = builtin_tokenizer("gemma")
    tok.chat_template = None  # PaliGemma has none: prompts are written as the task wants them
    image_processor = SiglipImageProcessor(size={"height": 28, "width": 28})
    image_processor.image_seq_length = 16
    proc = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds <image>; no chat template
    cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(**VISION).to_dict(),
                          text_config=_text_cfg(tok, head_dim=16, model_type="gemma"), projection_dim=64,
                          image_token_index=tok.convert_tokens_to_ids("<image>"))
    return PaliGemmaForConditionalGeneration(cfg), proc


ARCHS = {"qwen2_vl": _qwen2_vl, "llava_next": _llava_next, "idefics3": _idefics3, "gemma3": _gemma3,
         "paligemma": _paligemma}
# token_type_ids of continuation tokens in the reference forward: what HF's generate gives new tokens
# (PaliGemma: 1, the causal suffix; see PaliGemmaForConditionalGeneration._update_model_kwargs_for_generation)
CONT_TYPE = {"paligemma": 1}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    torch.manual_seed(0)
    model, proc = ARCHS[request.param]()
    d = tmp_path_factory.mktemp(request.param)
    model.eval().save_pretrained(d)
    proc.save_pretrained(d)
    return request.param, d


def _image(seed: int, hw: tuple[int, int] = (40, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*hw, 3), dtype=np.uint8))


def _reference(d: Path):
    return AutoProcessor.from_pretrained(d), AutoModelForImageTextToText.from_pretrained(d).eval()


def _hf_inputs(proc, parts: list[dict]) -> dict:
    """HF's own prompt: the chat template on list-of-parts messages; without one (PaliGemma) the processor on
    the text as written, `<image>` where the images go."""
    if not proc.chat_template:
        text = "\n".join("<image>" if p["type"] == "image" else p["text"] for p in parts)
        images = [p["image"] for p in parts if p["type"] == "image"]
        return proc(text=[text], images=[images], return_tensors="pt")
    msgs = [{"role": "user", "content": parts}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")


def _hf_logprob(hf, inputs: dict, cont: list[int], greedy: bool = False) -> float | tuple[float, bool]:
    """Sum of log p(cont | prompt) from one full forward of prompt + continuation (and, with `greedy`, whether
    every continuation token is the argmax of its logits)."""
    c = torch.tensor([cont])
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], c], 1),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(c)], 1))
    full.pop("labels", None)
    for k in ("token_type_ids", "mm_token_type_ids"):
        if k in inputs:
            full[k] = torch.cat([inputs[k], torch.full_like(c, CONT_TYPE.get(hf.config.model_type, 0))], 1)
    with torch.no_grad():
        logp = torch.log_softmax(hf(**full).logits[0].float(), -1)
    start = inputs["input_ids"].shape[1]
    total = float(sum(logp[start - 1 + t, tok] for t, tok in enumerate(cont)))
    if greedy:
        return total, all(int(logp[start - 1 + t].argmax()) == tok for t, tok in enumerate(cont))
    return total


CONTINUATIONS = [" a red square", " two blue circles on a table", "B"]


def test_score_equals_hf_forward(checkpoint):
    arch, d = checkpoint
    ours = load_vlm(f"hf:{d}")
    assert isinstance(ours, HFAutoVLM) and ours.model_type == arch
    proc, hf = _reference(d)
    img = _image(0)
    inputs = _hf_inputs(proc, [{"type": "image", "image": img}, {"type": "text", "text": "What is shown in the picture?"}])
    with torch.no_grad():  # the model's greedy next token, as a continuation whose is_greedy must be True
        first = int(hf(**inputs).logits[0, -1].argmax())
    greedy_text = proc.tokenizer.decode([first])  # (a byte-fallback piece does not decode to itself: then skip it)
    roundtrip = proc.tokenizer(greedy_text, add_special_tokens=False)["input_ids"] == [first]
    conts = CONTINUATIONS + ([greedy_text] if roundtrip else [])
    res = ours.score([img], ["<image>\nWhat is shown in the picture?"], [conts], batch_size=2)[0]
    assert res[-1]["is_greedy"] is roundtrip
    for cont, r in zip(conts, res):
        ids = proc.tokenizer(cont, add_special_tokens=False)["input_ids"]
        assert r["num_tokens"] == len(ids)
        total, greedy = _hf_logprob(hf, inputs, ids, greedy=True)
        assert r["sum_logprob"] == pytest.approx(total, abs=1e-4)
        assert r["mean_logprob"] == pytest.approx(r["sum_logprob"] / len(ids))
        assert r["is_greedy"] is greedy


def test_score_verbatim_prompt(checkpoint):
    """chat_template=False: the prompt as written, `<image>` as the model's own image text."""
    arch, d = checkpoint
    ours = load_vlm(f"hf:{d}")
    proc, hf = _reference(d)
    img = _image(3)
    prompt = "Look: <image> What is it? Answer:"
    res = ours.score([img], [prompt], [CONTINUATIONS[:2]], chat_template=False)[0]
    text = prompt.replace("<image>", ours.image_text)
    inputs = proc(text=[text], images=[[img]], return_tensors="pt")
    for cont, r in zip(CONTINUATIONS, res):
        ids = proc.tokenizer(cont, add_special_tokens=False)["input_ids"]
        assert r["sum_logprob"] == pytest.approx(_hf_logprob(hf, inputs, ids), abs=1e-4)


def test_generate_equals_hf_generate(checkpoint):
    arch, d = checkpoint
    ours = load_vlm(f"hf:{d}")
    proc, hf = _reference(d)
    images = [_image(1), _image(2, (30, 60))]
    answers = ours.generate(images, ["<image>\nDescribe the image.", "What is this? <image>"], max_new_tokens=6)
    parts = [[{"type": "image", "image": images[0]}, {"type": "text", "text": "Describe the image."}],
             [{"type": "text", "text": "What is this?"}, {"type": "image", "image": images[1]}]]
    for p, answer in zip(parts, answers):
        inputs = _hf_inputs(proc, p)
        out = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        assert answer == proc.tokenizer.decode(new, skip_special_tokens=True).strip()
        assert len(new) > 0


def test_full_forward_path_equals_cached(checkpoint):
    """The fallback (one forward per continuation) and the shared-prefix path give the same scores."""
    arch, d = checkpoint
    ours = load_vlm(f"hf:{d}")
    args = ([_image(4)], ["<image>\nName it."], [CONTINUATIONS])
    cached = ours.score(*args)[0]
    ours.family = dataclasses.replace(ours.family, kv_shared=False)
    full = ours.score(*args)[0]
    for a, b in zip(cached, full):
        assert a["sum_logprob"] == pytest.approx(b["sum_logprob"], abs=1e-4)


def test_text_only_items_and_placeholder_count(checkpoint):
    arch, d = checkpoint
    ours = load_vlm(f"hf:{d}")
    if arch == "paligemma":  # its processor needs an image with every prompt
        with pytest.raises(UserError, match="processor"):
            ours.score([None], ["Say something."], [[" hello"]])
    else:
        res = ours.score([None], ["Say something."], [[" hello"]])[0][0]
        assert res["num_tokens"] >= 1 and res["sum_logprob"] < 0
    with pytest.raises(UserError, match="placeholders"):
        ours.score([[_image(0), _image(1)]], ["<image> one"], [[" x"]])


def test_is_greedy_is_every_token_the_argmax():
    logprobs = torch.log_softmax(torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]],
                                               [[0.0, 2.0, 1.0], [0.0, 0.0, 3.0]]]), -1)
    ids = torch.tensor([[1, 0], [1, 1]])
    out = HFAutoVLM._gather(logprobs, ids, [[1, 0], [1]])  # row 1 has one token; its second id is padding
    assert [g for _, g in out] == [True, True]
    assert out[0][0] == pytest.approx(float(logprobs[0, 0, 1] + logprobs[0, 1, 0]))
    assert HFAutoVLM._gather(logprobs, ids, [[1, 0], [1, 1]])[1][1] is False


def test_bad_spec_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="hf:"):
        load_vlm(f"hf:{tmp_path / 'missing'}")


def test_empty_prompt_conditions_on_bos(checkpoint):
    """lm-eval's rolling log-likelihood scores a text after an empty, image-free prompt."""
    arch, d = checkpoint
    if arch == "paligemma":
        pytest.skip("PaliGemma's processor needs an image with every prompt")
    ours = load_vlm(f"hf:{d}")
    proc, hf = _reference(d)
    tok = proc.tokenizer
    ids = tok(" a red square", add_special_tokens=False)["input_ids"]
    res = ours.score([None], [""], [[" a red square"]], chat_template=False)[0][0]
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=torch.tensor([[start, *ids]])).logits[0].float(), -1)
    assert res["sum_logprob"] == pytest.approx(float(sum(logp[t, tok_] for t, tok_ in enumerate(ids))), abs=1e-4)


def test_string_only_chat_template_is_refused(tmp_path):
    """A template written for plain-string content would print the parts list into the prompt."""
    torch.manual_seed(0)
    model, proc = _llava_next()
    proc.chat_template = builtin_tokenizer("vicuna_v1").chat_template
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    ours = load_vlm(f"hf:{tmp_path}")
    with pytest.raises(UserError, match="list-of-parts"):
        ours.score([_image(0)], ["<image>\nWhat is it?"], [[" a cat"]])
    assert ours.score([_image(0)], ["USER: <image>\nWhat is it? ASSISTANT:"], [[" a cat"]], chat_template=False)


def test_prefix_runs_once_per_item(checkpoint, monkeypatch):
    """Continuations beyond one batch reuse the item's prefix cache: one prefix forward per item."""
    arch, d = checkpoint
    ours = load_vlm(f"hf:{d}")
    if not ours.family.kv_shared:
        pytest.skip("scored with full forwards")
    calls = []
    prefix = ours._prefix
    monkeypatch.setattr(ours, "_prefix", lambda inputs: calls.append(1) or prefix(inputs))
    res = ours.score([_image(0), _image(1)], ["<image>\nName it."] * 2, [CONTINUATIONS] * 2, batch_size=1)
    assert len(calls) == 2 and [len(r) for r in res] == [3, 3]


def test_hf_generate_takes_the_vlm_generate_contract(tmp_path):
    """The lm-eval adapter and the tasks call generate with batch_size=None, stop_strings and strip, as on our VLM."""
    import inspect

    from vlm.model.hf_auto import HFAutoVLM
    from vlm.model.vlm import VLM

    ours = inspect.signature(VLM.generate).parameters
    theirs = inspect.signature(HFAutoVLM.generate).parameters
    for name in ("batch_size", "stop_strings", "strip", "max_new_tokens", "chat_template"):
        assert name in theirs and theirs[name].default == ours[name].default, name

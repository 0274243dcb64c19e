"""HF LLaVA interop: our VLM and transformers' LlavaForConditionalGeneration agree to 1e-4 (fp32), both ways."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig,
                          Qwen2Config, SiglipVisionConfig)

from vlm import load_vlm
from vlm.errors import UserError
from vlm.model.hf_llava import export_hf_llava
from vlm.model.llm import add_image_token
from vlm.model.tokenizers import builtin_tokenizer
from vlm.model.vlm import build_vlm
from vlm.testing import tiny_vlm_config

TEXT = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
VISION = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}
PROMPT = "USER: <image>\nWhat is shown in the picture? ASSISTANT:"
CONTINUATIONS = [" a red square", " two blue circles"]


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


def _write_hf_llava(tmp_path, vision: str, text: str, strategy: str):
    torch.manual_seed(0)
    tok = builtin_tokenizer("vicuna_v1")
    image_id = add_image_token(tok)
    vcfg = VISION[vision](hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7)
    tcfg = TEXT[text](hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vcfg.to_dict(), text_config=tcfg.to_dict(), image_token_index=image_id,
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy, image_seq_length=16)
    hf = LlavaForConditionalGeneration(cfg).eval()
    d = tmp_path / f"llava-{vision}-{text}"
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    return d, hf


def _hf_logprobs(hf, ids: list[int], pixels: torch.Tensor, n_cont: int) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids)[None], pixel_values=pixels).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    start = len(ids) - n_cont
    return logits, float(sum(logp[start - 1 + t, ids[start + t]] for t in range(n_cont)))


def _compare(ours, hf):
    img = _image(0)
    pixels = ours.preprocess([img])
    results = ours.score([img], [PROMPT], [CONTINUATIONS], chat_template=False)[0]
    prefix = ours._prompt_ids(PROMPT, 1, chat_template=False)
    for cont, res in zip(CONTINUATIONS, results):
        c = ours._continuation_ids(cont)
        ids = prefix + c
        hf_logits, hf_lp = _hf_logprobs(hf, ids, pixels, len(c))
        with torch.no_grad():
            our_logits = ours(torch.tensor(ids)[None], pixels=pixels).logits[0]
        assert (our_logits - hf_logits).abs().max() < 1e-4
        assert res["sum_logprob"] == pytest.approx(hf_lp, abs=1e-4)


@pytest.mark.parametrize("vision,text,strategy", [
    ("clip", "llama", "default"), ("clip", "mistral", "full"), ("siglip", "qwen2", "full"),
])
def test_load_hf_llava_matches_transformers(tmp_path, vision, text, strategy):
    d, hf = _write_hf_llava(tmp_path, vision, text, strategy)
    ours = load_vlm(f"hf-llava:{d}")
    expected_tokens = 16 + (1 if (vision == "clip" and strategy == "full") else 0)
    assert ours.num_image_tokens == expected_tokens
    _compare(ours, hf)


def test_siglip_with_default_strategy_is_rejected(tmp_path):
    d, _ = _write_hf_llava(tmp_path, "siglip", "llama", "default")
    with pytest.raises(UserError, match="SigLIP has no CLS"):
        load_vlm(f"hf-llava:{d}")


@pytest.mark.parametrize("encoder", ["clip", "siglip"])
def test_export_loads_in_transformers_and_matches(tmp_path, encoder):
    torch.manual_seed(1)
    ours = build_vlm(tiny_vlm_config(encoder=encoder, llm="llama", family="vicuna_v1")).eval()
    out = export_hf_llava(ours, tmp_path / "export")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert hf.config.image_token_id == ours.image_token_id
    _compare(ours, hf)
    again = load_vlm(f"hf-llava:{out}")
    _compare(again, hf)


def test_export_refuses_non_llava_connector(tmp_path):
    cfg = tiny_vlm_config()
    cfg["connector"] = {"type": "linear"}
    ours = build_vlm(cfg)
    with pytest.raises(UserError, match="mlp2x_gelu"):
        export_hf_llava(ours, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _smooth_image(h: int, w: int) -> Image.Image:
    """A photo-like (smooth) image whose resized size is the same under rounding and truncation."""
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx * 3, yy * 5, (xx + yy) * 2], -1).astype(np.uint8))


@pytest.mark.parametrize("encoder,family,resize", [("clip", "vicuna_v1", None), ("siglip", "chatml", None),
                                                   ("clip", "vicuna_v1", "letterbox")])
def test_export_runs_in_hf_pipeline(tmp_path, encoder, family, resize):
    """A new user's path: AutoProcessor + apply_chat_template (list-of-parts messages) + generate on the export
    gives our generate token for token, and our score equals HF's forward on the processor's inputs."""
    from transformers import AutoProcessor

    torch.manual_seed(2)
    cfg = tiny_vlm_config(encoder=encoder, llm="llama", family=family)
    if resize:
        cfg["encoder"]["resize"] = resize
    ours = build_vlm(cfg).eval()
    out = export_hf_llava(ours, tmp_path / "export")
    assert (out / "processor_config.json").exists() and (out / "preprocessor_config.json").exists()
    # the PIL backend resizes as our encoders do (PIL bicubic); the default torchvision one antialiases tensors
    # and differs slightly (docs/adding_a_vlm_family.md)
    proc = AutoProcessor.from_pretrained(out, backend="pil")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    images = [_smooth_image(40, 70), _smooth_image(30, 56)]
    questions = ["What is shown in the picture?", "Describe the image."]
    ours_out = ours.generate(images, [f"<image>\n{q}" for q in questions], max_new_tokens=8)
    for img, q, answer in zip(images, questions, ours_out):
        msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}]
        inputs = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == ours._prompt_ids(f"<image>\n{q}", 1, chat_template=True)
        assert torch.allclose(inputs["pixel_values"], ours.preprocess([img]), atol=1e-5)
        gen = hf.generate(**inputs, max_new_tokens=8, do_sample=False)
        new = gen[0, inputs["input_ids"].shape[1]:]
        assert len(new) > 0
        assert answer == proc.tokenizer.decode(new, skip_special_tokens=True).strip()
        cont = ours._continuation_ids(" a red square")
        full = torch.cat([inputs["input_ids"], torch.tensor([cont])], 1)
        with torch.no_grad():
            logp = torch.log_softmax(hf(input_ids=full, pixel_values=inputs["pixel_values"]).logits[0].float(), -1)
        start = inputs["input_ids"].shape[1]
        ref = float(sum(logp[start - 1 + t, tok] for t, tok in enumerate(cont)))
        assert ours.score([img], [f"<image>\n{q}"], [[" a red square"]])[0][0]["sum_logprob"] == pytest.approx(ref, abs=1e-4)


def test_exported_template_takes_string_and_list_content(tmp_path):
    ours = build_vlm(tiny_vlm_config(family="vicuna_v1")).eval()
    out = export_hf_llava(ours, tmp_path / "export")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    as_string = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."}]
    as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
    render = lambda m: tok.apply_chat_template(m, tokenize=False)  # noqa: E731
    assert render(as_string) == render(as_parts) == ours.tokenizer.apply_chat_template(as_string, tokenize=False)

"""VLM core: image-token splice, padding, multi-image/text-only batches, score and generate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.errors import UserError
from vlm.model.vlm import IGNORE_INDEX, build_vlm, expand_image_tokens
from vlm.testing import tiny_vlm, tiny_vlm_config


def _image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model():
    return tiny_vlm()


def test_expand_image_tokens_repeats_placeholder_and_ignores_labels():
    ids, labels = expand_image_tokens([5, 9, 6, 9], [1, 2, 3, 4], image_token_id=9, num_image_tokens=3)
    assert ids == [5, 9, 9, 9, 6, 9, 9, 9]
    assert labels == [1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def _sample_ids(model, prompt: str, n_images: int) -> torch.Tensor:
    return torch.tensor(model._prompt_ids(prompt, n_images, chat_template=False))


def test_image_features_land_at_placeholders(model):
    ids = _sample_ids(model, "look <image> here", 1)[None]
    pixels = model.preprocess([_image(0)])
    feats = model.encode_images(pixels)
    embeds = model.embed(ids, feats)
    mask = ids[0] == model.image_token_id
    assert int(mask.sum()) == model.num_image_tokens
    torch.testing.assert_close(embeds[0, mask], feats[0])
    text_embeds = model.language_model.get_input_embeddings()(ids)[0, ~mask]
    torch.testing.assert_close(embeds[0, ~mask], text_embeds)


def test_placeholder_feature_count_mismatch_raises(model):
    ids = _sample_ids(model, "a <image> b", 1)[None]
    with pytest.raises(ValueError, match="image placeholder tokens"):
        model.embed(ids, None)


def test_left_and_right_padding_match_unpadded(model):
    img = _image(1)
    long_ids = _sample_ids(model, "<image> a much longer prompt with many words in it", 1)
    short_ids = _sample_ids(model, "<image> short", 1)
    with torch.no_grad():
        ref = model(short_ids[None], pixels=model.preprocess([img])).logits[0]
        pix = model.preprocess([_image(2), img])
        n, w = len(short_ids), len(long_ids)
        for side in ("left", "right"):
            ids = torch.full((2, w), model.tokenizer.pad_token_id)
            mask = torch.zeros((2, w), dtype=torch.long)
            ids[0], mask[0] = long_ids, 1
            sl = slice(w - n, w) if side == "left" else slice(0, n)
            ids[1, sl], mask[1, sl] = short_ids, 1
            out = model(ids, mask, pixels=pix).logits[1, sl]
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_multi_image_and_text_only_samples_in_one_batch(model):
    imgs = [_image(3), _image(4)]
    two = _sample_ids(model, "first <image> then <image> compare", 2)
    text = _sample_ids(model, "no image at all here", 0)
    with torch.no_grad():
        ref_two = model(two[None], pixels=model.preprocess(imgs)).logits[0]
        ref_text = model(text[None]).logits[0]
        w = max(len(two), len(text))
        ids = torch.full((2, w), model.tokenizer.pad_token_id)
        mask = torch.zeros((2, w), dtype=torch.long)
        ids[0, : len(two)], mask[0, : len(two)] = two, 1
        ids[1, : len(text)], mask[1, : len(text)] = text, 1
        out = model(ids, mask, pixels=model.preprocess(imgs)).logits
    torch.testing.assert_close(out[0, : len(two)], ref_two, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1, : len(text)], ref_text, atol=1e-4, rtol=1e-4)


def test_loss_ignores_image_and_prompt_tokens(model):
    ids = _sample_ids(model, "<image> answer words", 1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-2:] = ids[-2:]
    with torch.no_grad():
        out = model(ids[None], pixels=model.preprocess([_image(5)]), labels=labels[None])
        logp = torch.log_softmax(out.logits[0].float(), -1)
        manual = -(logp[-3, ids[-2]] + logp[-2, ids[-1]]) / 2
    torch.testing.assert_close(out.loss, manual, atol=1e-5, rtol=1e-5)


def _naive_logprob(model, image, prompt: str, continuation: str, chat_template: bool) -> float:
    prefix = model._prompt_ids(prompt, 0 if image is None else 1, chat_template)
    cont = model._continuation_ids(continuation)
    ids = torch.tensor(prefix + cont)[None]
    with torch.no_grad():
        pix = None if image is None else model.preprocess([image])
        logp = torch.log_softmax(model(ids, pixels=pix).logits[0].float(), -1)
    return float(sum(logp[len(prefix) - 1 + t, tok] for t, tok in enumerate(cont)))


@pytest.mark.parametrize("chat_template", [False, True])
def test_score_equals_one_full_forward_per_continuation(model, chat_template):
    images = [_image(6), None, _image(7)]
    prompts = ["<image> what is this?", "text only question", "<image> and this one?"]
    conts = [["a red cat", "dog", "a very long answer with several words"], ["yes"], ["no", "maybe so"]]
    got = model.score(images, prompts, conts, chat_template=chat_template, batch_size=2, token_budget=4)
    for img, p, cs, res in zip(images, prompts, conts, got):
        assert len(res) == len(cs)
        for c, r in zip(cs, res):
            ref = _naive_logprob(model, img, p, c, chat_template)
            assert r["sum_logprob"] == pytest.approx(ref, abs=1e-4)
            assert r["num_tokens"] == len(model._continuation_ids(c))
            assert r["mean_logprob"] == pytest.approx(ref / r["num_tokens"], abs=1e-4)


def test_score_batching_does_not_change_results(model):
    images = [_image(i) for i in range(5)]
    prompts = [f"<image> item {'x ' * i}" for i in range(5)]
    conts = [["one", "two words", "three more words"]] * 5
    a = model.score(images, prompts, conts, batch_size=5, token_budget=1024)
    b = model.score(images, prompts, conts, batch_size=1, token_budget=1)
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert x["sum_logprob"] == pytest.approx(y["sum_logprob"], abs=1e-4)


def test_generate_is_greedy_argmax(model):
    img = _image(8)
    [answer] = model.generate([img], ["<image> describe"], chat_template=True, max_new_tokens=5)
    ids = model._prompt_ids("<image> describe", 1, True)
    generated = []
    with torch.no_grad():
        for _ in range(5):
            logits = model(torch.tensor(ids + generated)[None], pixels=model.preprocess([img])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt in set(model.llm.stop_token_ids) | {model.tokenizer.eos_token_id}:
                break
            generated.append(nxt)
    assert answer == model.tokenizer.decode(generated, skip_special_tokens=True).strip()


def test_generate_batch_matches_single(model):
    imgs = [_image(9), None, _image(10)]
    prompts = ["<image> a", "plain text prompt that is longer", "<image> b c"]
    batched = model.generate(imgs, prompts, max_new_tokens=4, batch_size=3)
    single = [model.generate([i], [p], max_new_tokens=4)[0] for i, p in zip(imgs, prompts)]
    assert batched == single


def test_placeholder_count_mismatch_is_a_user_error(model):
    with pytest.raises(UserError, match="placeholders"):
        model.score([[_image(0), _image(1)]], ["<image> only one"], [["x"]])


def test_prompt_without_placeholder_gets_images_prepended(model):
    a = model.score([_image(11)], ["what is it"], [["cat"]])
    b = model.score([_image(11)], ["<image>\nwhat is it"], [["cat"]])
    assert a[0][0]["sum_logprob"] == pytest.approx(b[0][0]["sum_logprob"], abs=1e-5)


def test_build_vlm_requires_all_parts():
    cfg = tiny_vlm_config()
    del cfg["connector"]
    with pytest.raises(UserError, match="connector"):
        build_vlm(cfg)


def test_empty_text_prompt_conditions_on_a_start_token(model):
    [[res]] = model.score([None], [""], [["some words"]], chat_template=False)
    assert res["num_tokens"] == len(model._continuation_ids("some words"))
    assert res["sum_logprob"] < 0


@pytest.mark.parametrize("llm", ["qwen2", "mistral", "gemma"])
def test_packed_score_is_exact_for_each_llm_family(llm):
    m = tiny_vlm(llm=llm, seed=3)
    img = _image(12)
    conts = ["a", "two words", "and three more words", "x y"]
    got = m.score([img], ["<image> name it"], [conts], token_budget=6)[0]
    for c, r in zip(conts, got):
        assert r["sum_logprob"] == pytest.approx(_naive_logprob(m, img, "<image> name it", c, True), abs=1e-4)


@pytest.mark.parametrize("llm", ["llama", "gemma"])
def test_label_loss_sum_equals_full_logits_cross_entropy(llm):
    m = tiny_vlm(llm=llm, seed=4)
    ids = _sample_ids(m, "<image> describe it in some words please", 1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-4:] = ids[-4:]
    pix = m.preprocess([_image(13)])
    out = m(ids[None], pixels=pix, labels=labels[None], label_loss_sum=True)
    logits = m(ids[None], pixels=pix).logits[0, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
    assert out.num_tokens == 4
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert m.connector.layers[0].weight.grad is not None

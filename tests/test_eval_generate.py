"""Batched generation on the KV cache: greedy answers of a left-padded batch (images per item, text-only items
among them) equal one-prompt-at-a-time answers, and an eval task's batch reaches the model as one batch."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from eval.runner import evaluate
from vlm.testing import tiny_vlm


@pytest.fixture(scope="module")
def model():
    return tiny_vlm("clip", "qwen2", "chatml", seed=2)


def _image(i: int) -> Image.Image:
    return Image.new("RGB", (30 + 3 * i, 28), (40 * i % 256, (200 - 15 * i) % 256, 9 * i))


def test_batched_greedy_equals_per_item(model):
    images = [_image(0), None, [_image(1), _image(2)], _image(3), _image(4), None]
    prompts = ["<image>\nWhat is it?", "Say something about the weather in a long sentence, please.",
               "<image> and <image>: which is brighter?", "<image>\nHi", "Name the colour.", "x"]
    batched = model.generate(images, prompts, max_new_tokens=10, strip=False)
    single = [model.generate([im], [p], max_new_tokens=10, strip=False)[0] for im, p in zip(images, prompts)]
    assert batched == single
    assert len({len(p) for p in prompts}) == len(prompts)  # really different lengths: left padding is exercised
    assert model.generate(images, prompts, max_new_tokens=10, batch_size=4, strip=False) == single


def test_stop_strings_cut_and_strip(model):
    free = model.generate([_image(0)], ["<image>\nWhat is it?"], max_new_tokens=12, strip=False)[0]
    stop = free[4:6]
    cut = model.generate([_image(0)], ["<image>\nWhat is it?"], max_new_tokens=12, stop_strings=[stop], strip=False)[0]
    assert cut == free[: free.find(stop)]
    assert model.generate([_image(0)], ["<image>\nWhat is it?"], max_new_tokens=12)[0] == free.strip()


def test_task_batch_is_one_generate_call(model, tmp_path):
    rows = []
    for i in range(13):
        _image(i).save(tmp_path / f"im{i}.jpg")
        rows.append({"question_id": i, "question": f"What is {i}?", "image_id": f"im{i}", "answers": ["a"] * 10})
    (tmp_path / "val.json").write_text(json.dumps({"data": rows}))
    calls = []
    lm_generate = model.language_model.generate
    model.language_model.generate = lambda **kw: calls.append(kw["inputs_embeds"].shape[0]) or lm_generate(**kw)
    try:
        evaluate(model, [{"type": "textvqa", "name": "tv", "data_file": str(tmp_path / "val.json"),
                          "max_new_tokens": 3}], tmp_path / "out", batch_size=10)
    finally:
        del model.language_model.generate
    assert calls == [10, 3]  # the task's batches (VLM.generate re-chunked them at 8 before)

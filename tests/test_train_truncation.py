"""Over-long samples (issue 17.8): text is cut at max_length the way LLaVA's data pipeline does (right side, labels
with it), image tokens never; truncations are counted in metrics.jsonl and a run never stops at such a sample."""
from __future__ import annotations

from PIL import Image

from _train_data import write_recipe
from vlm.data.datasets import Record, TrainSet
from vlm.io import read_jsonl
from vlm.model.vlm import IGNORE_INDEX
from vlm.recipe.schema import load_recipe
from vlm.testing import tiny_vlm
from vlm.train.steps import train


def _set(tmp_path, text_before: str, answer: str, max_length: int, images: int = 1):
    vlm = tiny_vlm()
    for i in range(images):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp_path / f"a{i}.png")
    msgs = [{"role": "user", "content": text_before + "<image>\n" * images + "Name it."},
            {"role": "assistant", "content": answer}]
    rec = Record("x", msgs, [str(tmp_path / f"a{i}.png") for i in range(images)], "d.json:1")
    full = TrainSet([rec], vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens, 10_000, "raise")[0]
    cut = TrainSet([rec], vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens, max_length, "raise")[0]
    return vlm, full, cut


def test_long_answer_is_cut_on_the_right_with_its_labels(tmp_path):
    vlm, full, cut = _set(tmp_path, "", "a long answer" * 40, max_length=60)
    assert len(full["input_ids"]) > 60
    assert cut["input_ids"] == full["input_ids"][:60] and cut["labels"] == full["labels"][:60]
    assert cut["truncated"] and not full["truncated"]
    assert cut["input_ids"].count(vlm.image_token_id) == vlm.num_image_tokens and len(cut["images"]) == 1
    assert any(t != IGNORE_INDEX for t in cut["labels"])


def test_a_cut_never_splits_an_image(tmp_path):
    """An image whose tokens would be cut is dropped whole, with everything after it."""
    vlm, full, _ = _set(tmp_path, "", "ok", max_length=10_000, images=2)
    n, ids = vlm.num_image_tokens, full["input_ids"]
    second = [k for k, t in enumerate(ids) if t == vlm.image_token_id][n]  # first token of the second image
    _, _, cut = _set(tmp_path, "", "ok", max_length=second + n // 2, images=2)
    assert cut["input_ids"] == ids[:second] and cut["labels"] == full["labels"][:second]
    assert len(cut["images"]) == 1 and len(cut["image_keys"]) == 1 and cut["truncated"]


def test_a_run_with_over_long_samples_finishes_and_counts_them(tmp_path):
    recipe = write_recipe(tmp_path, long_every=4, words=200)
    over = ["stages.align.enabled=false", "stages.finetune.max_steps=4", "stages.finetune.batch_size=4",
            "stages.finetune.max_length=128", "stages.finetune.gradient_checkpointing=false"]
    train(load_recipe(recipe, over), tmp_path / "run")  # data.on_error: raise (the default)
    m = [x for x in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in x]
    assert len(m) == 4 and m[-1]["truncated_samples"] == 4 and m[-1]["skipped_samples"] == 0

"""Zero-shot classification (`zero_shot`) on tiny random two-tower CLIP and SigLIP models against a hand computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval.runner import evaluate
from eval.zero_shot import TEMPLATE_SETS
from vlm.errors import UserError
from vlm.model.tokenizers import builtin_tokenizer

CLASSES = ["sparrow", "red rose", "pickup truck"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}."]
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _two_tower(kind: str, path) -> None:
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, SiglipConfig,
                              SiglipImageProcessor, SiglipModel, SiglipProcessor)

    tok = builtin_tokenizer("plain")
    tok.pad_token = tok.unk_token
    torch.manual_seed(0)
    text = dict(TOWER, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    vision = dict(TOWER, image_size=28, patch_size=7)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=dict(text, max_position_embeddings=77), vision_config=vision,
                                     projection_dim=16))
        proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                                crop_size={"height": 28, "width": 28}), tokenizer=tok)
    else:
        model = SiglipModel(SiglipConfig(text_config=dict(text, max_position_embeddings=64), vision_config=vision))
        with torch.no_grad():  # a visible bias, so a wrong sigmoid would show
            model.logit_bias.fill_(-1.5)
        proc = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 28, "width": 28}), tokenizer=tok)
    model.eval().save_pretrained(path)
    proc.save_pretrained(path)


def _dataset(path) -> list[tuple[Image.Image, int]]:
    rng = np.random.default_rng(0)
    path.mkdir()
    (path / "classes.json").write_text(json.dumps(CLASSES))
    items = []
    with open(path / "test.jsonl", "w") as f:
        for i in range(7):
            img = Image.fromarray(rng.integers(0, 255, (30 + i, 36, 3), dtype=np.uint8))
            img.save(path / f"{i}.png")
            label = i % len(CLASSES)
            f.write(json.dumps({"image": f"{i}.png", "label": CLASSES[label]}) + "\n")
            items.append((img, label))
    return items


def _by_hand(kind: str, model_dir, items) -> np.ndarray:
    """Probabilities [N, C] from the published recipe, written out step by step."""
    from transformers import AutoModel, AutoProcessor

    model, proc = AutoModel.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)
    class_emb = []
    with torch.no_grad():
        for name in CLASSES:
            texts = [t.format(name) for t in TEMPLATES]
            batch = (proc.tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt") if kind == "siglip"
                     else proc.tokenizer(texts, padding=True, return_tensors="pt"))
            out = model.get_text_features(**batch)
            e = getattr(out, "pooler_output", out).numpy()
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            mean = e.mean(0)
            class_emb.append(mean / np.linalg.norm(mean))
        pixels = proc.image_processor(images=[im for im, _ in items], return_tensors="pt")
        out = model.get_image_features(**pixels)
        img = getattr(out, "pooler_output", out).numpy()
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    logits = float(model.logit_scale.detach().exp()) * img @ np.stack(class_emb).T
    if kind == "siglip":
        return 1 / (1 + np.exp(-(logits + float(model.logit_bias.detach()))))
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_zero_shot_matches_hand_computation(tmp_path, kind):
    model_dir = tmp_path / kind
    _two_tower(kind, model_dir)
    items = _dataset(tmp_path / "data")
    task = {"type": "zero_shot", "name": "zs", "path": str(tmp_path / "data"), "model": str(model_dir),
            "templates": TEMPLATES}
    results = evaluate(None, [task], tmp_path / "out", batch_size=3)
    expected = _by_hand(kind, model_dir, items)
    records = [json.loads(line) for line in (tmp_path / "out/eval/zs/predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(items)
    for rec, probs, (_, label) in zip(records, expected, items):
        assert rec["label"] == label
        assert rec["pred"] == int(np.argmax(probs))
        assert rec["gold_prob"] == pytest.approx(float(probs[label]), abs=1e-5)
        assert rec["top5"] == [int(i) for i in np.argsort(-probs, kind="stable")]
    acc = float(np.mean([np.argmax(p) == lab for p, (_, lab) in zip(expected, items)]))
    zs = results["tasks"]["zs"]
    assert zs["family"] == "probe" and zs["score"] == pytest.approx(acc)
    assert zs["metrics"]["top5"] == 1.0  # 3 classes
    saved = json.loads((tmp_path / "out/eval/zs/results.json").read_text())
    assert saved["zero_shot"]["probability"] == ("sigmoid" if kind == "siglip" else "softmax")


def test_template_sets_and_errors(tmp_path):
    assert len(TEMPLATE_SETS["imagenet"]) == 80 and len(set(TEMPLATE_SETS["imagenet"])) == 80
    assert all("{}" in t for ts in TEMPLATE_SETS.values() for t in ts)
    _dataset(tmp_path / "data")
    base = {"type": "zero_shot", "name": "zs", "path": str(tmp_path / "data")}
    with pytest.raises(UserError, match="template set"):
        evaluate(None, [{**base, "templates": "nope"}], tmp_path / "o1")
    with pytest.raises(UserError, match="class name goes"):
        evaluate(None, [{**base, "templates": ["a photo"]}], tmp_path / "o2")
    with pytest.raises(UserError, match="model:"):  # no model given and no CLIP/SigLIP encoder to take it from
        evaluate(None, [base], tmp_path / "o3")

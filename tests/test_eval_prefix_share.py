"""Prefix sharing across questions on the same image (`VLM.generate`, `Task.run`'s grouping): greedy answers with
sharing equal those without it and those of HF's LlavaForConditionalGeneration per item (on the `export_hf_llava`
export); the vision tower and the prefix forward run once per distinct image / prefix of a batch; a VQAv2-layout task
groups its items by image, writes predictions in item order, and gives the same file over 2 processes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from eval.base import group_items
from eval.runner import evaluate
from vlm import load_vlm
from vlm.io import read_jsonl
from vlm.model.hf_llava import export_hf_llava
from vlm.testing import tiny_vlm

ROOT = Path(__file__).resolve().parent.parent


def _image(i: int, w: int = 40, h: int = 34) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray((np.stack([xx * (3 + i), yy * (5 - i), (xx + yy) * (2 + 2 * i)], -1) % 256).astype(np.uint8))


A, B, C = _image(0), _image(1, 52), _image(2, 30, 30)
# several questions per image, interleaved, suffixes of many lengths; a text-only prompt; two images in one prompt
ITEMS = [(A, "<image>\nWhat is it?"),
         (B, "<image>\nHow many objects are in this picture, counting the small ones in the corner too?"),
         (A, "<image>\nColour?"),
         (C, "<image>\nIs it day or night?"),
         (A, "<image>\nDescribe the left half of the image in one long sentence with every detail you can see."),
         (None, "Say something about the weather."),
         (B, "<image>\nWhere?"),
         ([A, B], "<image> and <image>: which is brighter?"),
         (A, "<image>\nWhat is it?"),
         (C, "<image>\nName the shape in the middle of the picture."),
         (B, "<image>\nA short one.")]
NEW = 6


@pytest.fixture(scope="module", params=[("llama", "vicuna_v1"), ("qwen2", "chatml")], ids=lambda p: "-".join(p))
def model(request):
    return tiny_vlm("clip", request.param[0], request.param[1], seed=4)


@pytest.fixture(scope="module")
def hf_answers(model, tmp_path_factory) -> list[str]:
    """HF LlavaForConditionalGeneration on the export, one item at a time, on our prompt ids and pixels."""
    hf = LlavaForConditionalGeneration.from_pretrained(export_hf_llava(model, tmp_path_factory.mktemp("hf"))).eval()
    out = []
    for image, prompt in ITEMS:
        images = [] if image is None else image if isinstance(image, list) else [image]
        ids = model._prompt_ids(prompt, len(images), chat_template=True)
        kw = {"pixel_values": model.preprocess(images)} if images else {}
        with torch.no_grad():
            gen = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, **kw)
        out.append(model.tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True))
    return out


class Counter:
    """Images through the vision tower per call, and rows of each prefix forward (an LLM forward given no cache:
    `generate`'s own forwards always get one)."""

    def __init__(self, model) -> None:
        self.vision: list[int] = []
        self.prefix_rows: list[int] = []
        self.handles = [
            model.encoder.register_forward_hook(lambda m, args, out: self.vision.append(out.shape[0])),
            model.language_model.register_forward_hook(self._llm, with_kwargs=True)]

    def _llm(self, module, args, kwargs, out) -> None:
        if kwargs.get("cache", kwargs.get("past_key_values")) is None:
            self.prefix_rows.append(kwargs["inputs_embeds"].shape[0])

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _generate(model, batch_size=None, items=ITEMS, **kw) -> tuple[list[str], Counter]:
    count = Counter(model)
    try:
        out = model.generate([im for im, _ in items], [p for _, p in items], max_new_tokens=NEW, strip=False,
                             batch_size=batch_size, **kw)
    finally:
        count.close()
    return out, count


@pytest.mark.parametrize("batch_size", [None, 4, 3])
def test_shared_answers_equal_unshared_and_hf(model, hf_answers, monkeypatch, batch_size):
    shared, count = _generate(model, batch_size)
    assert shared == hf_answers
    # per chunk: the vision tower once on the distinct image objects, one prefix row per distinct (images, prefix)
    chunks = [ITEMS[s:s + (batch_size or len(ITEMS))] for s in range(0, len(ITEMS), batch_size or len(ITEMS))]
    ids = lambda im: () if im is None else tuple(map(id, im if isinstance(im, list) else [im]))  # noqa: E731
    assert count.vision == [len({i for im, _ in c for i in ids(im)}) for c in chunks]
    assert count.prefix_rows == [len({ids(im) for im, _ in c}) for c in chunks]
    assert count.vision[0] < sum(len(ids(im)) for im, _ in chunks[0])  # really shared
    monkeypatch.setattr(model, "_prefix_split", lambda ids, n_images: None)  # every prompt whole, as before
    unshared, count = _generate(model, batch_size)
    assert unshared == shared
    assert count.prefix_rows == []


def test_prompt_ending_with_its_image_is_generated_whole(model):
    """Nothing after the image to prefill: that prompt takes the unshared path, the others still share."""
    items = [(A, "Look: <image>"), (A, "Look: <image> What is it?"), (A, "Look: <image> Colour?")]
    got, count = _generate(model, items=items, chat_template=False)
    assert count.prefix_rows == [1]
    assert got == [_generate(model, items=[it], chat_template=False)[0][0] for it in items]


def test_copies_of_an_image_are_not_shared(model):
    """Sharing keys on the image object: equal pixels in two objects are two prefixes (the task merges them)."""
    items = [(A, "<image>\nWhat is it?"), (A.copy(), "<image>\nColour?")]
    got, count = _generate(model, items=items)
    assert count.prefix_rows == [2] and count.vision == [2]
    assert got == _generate(model, items=[items[0], (A, items[1][1])])[0]


def test_group_items_keeps_first_appearance_order():
    items = [{"id": i, "k": k} for i, k in enumerate(["a", "b", None, "a", "c", None, "b", "a"])]
    groups = group_items(items, lambda it: it["k"])
    assert [[it["id"] for it in g] for g in groups] == [[0, 3, 7], [1, 6], [2], [4], [5]]


def _vqav2(root: Path, per_image: list[int]) -> Path:
    """A VQAv2-layout set (questions + annotations JSON, COCO_val2014_<id>.jpg), questions of an image interleaved
    with other images' (as GQA and POPE's categories order them)."""
    qs, anns = [], []
    for i in range(len(per_image)):
        _image(i, 36 + 4 * i, 30).save(root / f"COCO_val2014_{i:012d}.jpg", quality=95)
    order = [(img, k) for k in range(max(per_image)) for img, n in enumerate(per_image) if k < n]
    for qid, (img, k) in enumerate(order):
        qs.append({"question_id": 1000 + qid, "image_id": img, "question": f"What is thing {k}?" + " Look." * (qid % 3)})
        anns.append({"question_id": 1000 + qid, "answer_type": "other", "answers": [{"answer": "red"}] * 10})
    (root / "q.json").write_text(json.dumps({"questions": qs}))
    (root / "a.json").write_text(json.dumps({"annotations": anns}))
    return root


def _task(root: Path) -> dict:
    return {"type": "vqav2", "name": "vqa", "questions_file": str(root / "q.json"),
            "annotations_file": str(root / "a.json"), "max_new_tokens": 4}


def test_vqav2_task_groups_by_image_and_keeps_item_order(tmp_path, monkeypatch):
    """13 questions on 3 images, interleaved, batch 4: predicted grouped by image (5 + 4 + 4 -> batches [0 0 0 0],
    [0 1 1 1], [1 2 2 2], [2]), so the tower sees 1 + 2 + 2 + 1 images, not 13; the file is in item order and equals
    the ungrouped, unshared run's byte for byte."""
    from eval.vqa import VQATask

    model = tiny_vlm("clip", "llama", "vicuna_v1", seed=4)
    root = _vqav2(tmp_path, [5, 4, 4])
    count = Counter(model)
    try:
        evaluate(model, [_task(root)], tmp_path / "shared", batch_size=4)
    finally:
        count.close()
    assert count.vision == [1, 2, 2, 1]
    got = (tmp_path / "shared" / "eval" / "vqa" / "predictions.jsonl").read_bytes()
    ids = [r["question_id"] for r in json.loads((root / "q.json").read_text())["questions"]]
    assert [int(r["id"]) for r in read_jsonl(tmp_path / "shared" / "eval" / "vqa" / "predictions.jsonl")] == ids
    monkeypatch.setattr(VQATask, "group_key", lambda self, item: None)
    monkeypatch.setattr(model, "_prefix_split", lambda ids, n_images: None)
    evaluate(model, [_task(root)], tmp_path / "unshared", batch_size=4)
    assert (tmp_path / "unshared" / "eval" / "vqa" / "predictions.jsonl").read_bytes() == got


def test_vqav2_two_processes_give_one_process_file(tmp_path):
    """Sharding hands out whole images; the merged file equals one process's byte for byte."""
    root = _vqav2(tmp_path, [4, 1, 3, 2])
    model_dir = export_hf_llava(tiny_vlm("clip", "llama", "chatml", seed=3), tmp_path / "llava")
    (tmp_path / "task.yaml").write_text(json.dumps(_task(root)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same reduction order, no near-tie flips
    try:
        evaluate(load_vlm(f"hf-llava:{model_dir}"), [str(tmp_path / "task.yaml")], tmp_path / "one", batch_size=3)
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m", "vlm",
         "eval", "--model", f"hf-llava:{model_dir}", "--tasks", str(tmp_path / "task.yaml"), "--out",
         str(tmp_path / "two"), "--batch-size", "2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    one = (tmp_path / "one" / "eval" / "vqa" / "predictions.jsonl").read_bytes()
    assert (tmp_path / "two" / "eval" / "vqa" / "predictions.jsonl").read_bytes() == one

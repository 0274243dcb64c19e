"""Data: LLaVA JSON/JSONL and HF sources, the broken-sample catalogue (raise vs skip+count), mixtures,
dynamic padding, length grouping, batch plans."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from vlm.data.datasets import IGNORE_INDEX, TrainSet, build_mixture, collate, epoch_batches, load_source, micro_batch
from vlm.errors import UserError
from vlm.recipe.schema import Dataset

CONV = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]


def ds_cfg(**kw) -> dict:
    return dataclasses.asdict(Dataset(**kw))


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (16, 16), (50 * i, 0, 0)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def _rec(i, image="ok0.png", conv=CONV):
    r = {"id": str(i), "conversations": conv}
    if image is not None:
        r["image"] = image
    return r


def test_llava_json_and_jsonl_read_the_same(files):
    recs = [_rec(0), _rec(1, "ok1.png"), _rec(2, None, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}])]
    (files / "a.json").write_text(json.dumps(recs, indent=2))
    (files / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    a = load_source("a", ds_cfg(type="llava", path=str(files / "a.json")), "raise")
    b = load_source("b", ds_cfg(type="llava", path=str(files / "a.jsonl")), "raise")
    assert [r.messages for r in a.records] == [r.messages for r in b.records]
    assert a.records[0].messages[0] == {"role": "user", "content": "<image>\nWhat is it?"}
    assert a.records[1].images == [str(files / "ok1.png")] and a.records[2].images == []
    assert a.records[0].where == f"{files / 'a.json'}:2 (row 0, id '0')"  # the line where each object starts
    assert a.records[1].where == f"{files / 'a.json'}:16 (row 1, id '1')"  # (indent=2: the first spans lines 2-15)
    assert b.records[1].where == f"{files / 'a.jsonl'}:2 (id '1')"


@pytest.mark.parametrize("line, why", [
    ('{"id": "x", "image": "missing.png", "conversations": CONV}', r"image file .*missing\.png not found"),
    ('{"id": "x", "image": "ok0.png", "conversations": [{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "a"}]}',
     r"1 image\(s\) given but no <image>"),
    ('{"id": "x", "conversations": CONV}', r"1 <image> placeholder\(s\) for 0 image\(s\)"),
    ('{"id": "x", "image": "ok0.png", "conversations": [{"from": "robot", "value": "<image>"}]}', r"turn needs `from`"),
    ('{"id": "x", "image": "ok0.png", "conversations": [{"from": "human", "value": "<image>"}]}', r"no assistant"),
    ('{"id": "x", "image": "ok0.png", "conversations": CONV', r"invalid JSON"),
])
def test_broken_records_name_file_and_line_or_are_skipped_and_counted(files, line, why):
    good = json.dumps(_rec(0))
    (files / "d.jsonl").write_text("\n".join([good, line.replace("CONV", json.dumps(CONV)), good]) + "\n")
    cfg = ds_cfg(type="llava", path=str(files / "d.jsonl"))
    with pytest.raises(UserError, match=rf"broken training sample at {files / 'd.jsonl'}:2 \(id 'x'\): {why}.*data.on_error=skip"):
        load_source("d", cfg, "raise")
    src = load_source("d", cfg, "skip")
    assert len(src.records) == 2 and len(src.skipped) == 1 and f"{files / 'd.jsonl'}:2" in src.skipped[0]


def test_bad_json_inside_an_array_names_the_line(files):
    (files / "d.json").write_text('[\n' + json.dumps(_rec(0)) + ',\n{"id": 1,, }\n]')
    with pytest.raises(UserError, match=rf"{files / 'd.json'}:3 \(row 1, id 1\): invalid JSON"):
        load_source("d", ds_cfg(type="llava", path=str(files / "d.json")), "skip")


@pytest.fixture(scope="module")
def tok():
    from vlm.model.llm import build_llm
    from vlm.testing import tiny_llm_config

    llm = build_llm({"config": tiny_llm_config("qwen2"), "tokenizer": "builtin:chatml"})
    return llm.tokenizer, llm.image_token_id


def test_load_time_broken_samples_unreadable_image_and_overlong_cut(files, tok):
    tokenizer, image_id = tok
    recs = [_rec(0), _rec(1, "broken.png"), _rec(2, conv=[CONV[0], {"from": "gpt", "value": "word " * 200}])]
    (files / "d.json").write_text(json.dumps(recs))
    src = load_source("d", ds_cfg(type="llava", path=str(files / "d.json")), "raise")
    ds = TrainSet(src.records, tokenizer, image_id, num_image_tokens=16, max_length=64, on_error="raise")
    item = ds[0]
    assert item["input_ids"].count(image_id) == 16  # the placeholder expanded to N' image tokens
    assert all(lab == IGNORE_INDEX for t, lab in zip(item["input_ids"], item["labels"]) if t == image_id)
    with pytest.raises(UserError, match=rf"{files / 'd.json'}:1 \(row 1, id '1'\): cannot read image .*broken\.png"):
        ds[1]
    long = ds[2]  # over-long: cut to max_length as LLaVA does (tests/test_train_truncation.py), not broken
    assert len(long["input_ids"]) == 64 and long["truncated"] and long["input_ids"].count(image_id) == 16
    ds.on_error = "skip"
    batch = collate([ds[0], ds[1], ds[2]], pad_id=0)
    assert batch["num_samples"] == 2 and len(batch["broken"]) == 1 and len(batch["images"]) == 2
    assert batch["num_truncated"] == 1
    empty = collate([ds[1]], pad_id=0)  # all broken: a harmless pad row, no targets, no images
    assert empty["num_samples"] == 0 and empty["num_target_tokens"] == 0 and empty["input_ids"].shape[0] == 1
    assert not empty["images"] and (empty["labels"] == IGNORE_INDEX).all()


def test_dynamic_padding(files, tok):
    tokenizer, image_id = tok
    recs = [_rec(0), _rec(1, conv=[CONV[0], {"from": "gpt", "value": "A much longer answer with many words."}])]
    (files / "d.json").write_text(json.dumps(recs))
    src = load_source("d", ds_cfg(type="llava", path=str(files / "d.json")), "raise")
    ds = TrainSet(src.records, tokenizer, image_id, 4, 512, "raise")
    a, b = ds[0], ds[1]
    batch = collate([a, b], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(a["input_ids"]), len(b["input_ids"])))
    short = 0 if len(a["input_ids"]) < len(b["input_ids"]) else 1
    n = len((a, b)[short]["input_ids"])
    assert batch["attention_mask"][short].sum() == n and (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert batch["num_target_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_hf_dataset_from_local_files_with_column_mapping(files):
    rows = [{"img": str(files / f"ok{i}.png"), "text": f"caption {i}", "uid": f"u{i}"} for i in range(3)]
    (files / "hf.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = ds_cfg(type="hf", path="json", data_files=[str(files / "hf.jsonl")],
                 columns={"image": "img", "caption": "text", "id": "uid"}, prompt="<image>\nCaption it.")
    src = load_source("h", cfg, "raise")
    assert [r.id for r in src.records] == ["u0", "u1", "u2"]
    assert src.records[1].messages == [{"role": "user", "content": "<image>\nCaption it."},
                                       {"role": "assistant", "content": "caption 1"}]
    assert src.records[2].images == [str(files / "ok2.png")]
    with pytest.raises(UserError, match="has no column 'pic'"):
        load_source("h", {**cfg, "columns": {"image": "pic"}}, "raise")


def test_pixmo_and_sharegpt_shaped_local_files(files):
    """The loaders behind recipes/data/*.yaml, on local files of the same shape."""
    pixmo = [{"image_url": str(files / "ok0.png"), "caption": "A long dense caption.", "transcripts": []}]
    (files / "pixmo.jsonl").write_text(json.dumps(pixmo[0]))
    src = load_source("p", ds_cfg(type="hf", path="json", data_files=[str(files / "pixmo.jsonl")],
                                  columns={"image": "image_url", "caption": "caption"}), "raise")
    assert src.records[0].messages[1]["content"] == "A long dense caption."
    sharegpt = [{"id": "sa_1", "image": "ok1.png", "conversations": [
        {"from": "human", "value": "What do you see happening in this image?\n<image>"},
        {"from": "gpt", "value": "Detailed text."}]}]
    (files / "share.json").write_text(json.dumps(sharegpt))
    assert load_source("s", ds_cfg(type="llava", path=str(files / "share.json")), "raise").records[0].id == "sa_1"


def test_mixture_weights_and_caps(files):
    src = {}
    for n in ("a", "b"):
        (files / f"{n}.json").write_text(json.dumps([{**_rec(f"{n}{i}"), "id": f"{n}{i}"} for i in range(10)]))
        src[n] = load_source(n, ds_cfg(type="llava", path=str(files / f"{n}.json")), "raise")
    mix = build_mixture([{"dataset": "a", "weight": 2.0, "max_samples": None},
                         {"dataset": "b", "weight": 0.5, "max_samples": 6}], src, seed=0)
    ids = [r.id for r in mix]
    assert sum(i.startswith("a") for i in ids) == 20 and sorted({i for i in ids if i.startswith("a")}) == sorted(f"a{i}" for i in range(10))
    assert sum(i.startswith("b") for i in ids) == 3
    assert ids == [r.id for r in build_mixture([{"dataset": "a", "weight": 2.0, "max_samples": None},
                                                {"dataset": "b", "weight": 0.5, "max_samples": 6}], src, seed=0)]


def test_batch_plans_are_deterministic_disjoint_and_length_grouped():
    lengths = [int(x) for x in torch.randint(1, 500, (96,), generator=torch.Generator().manual_seed(1))]
    plan = epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=True)
    assert plan == epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=True)
    assert plan != epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=True)
    assert sorted(i for b in plan for i in b) == list(range(96))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan)
    rand = epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert spread < 0.5 * sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in rand)
    g = plan[0]  # 2 processes x 2 accumulation steps x 2 samples: each sample exactly once
    parts = [micro_batch(g, a, r, 2, 2) for a in range(2) for r in range(2)]
    assert sorted(i for p in parts for i in p) == sorted(g)
    assert len(epoch_batches(lengths[:20], 8, 0, 0, False)) == 2  # drop-last


def test_skipped_samples_are_counted_in_metrics(files, tmp_path):
    from vlm.io import read_jsonl
    from vlm.recipe.schema import load_recipe
    from vlm.train.steps import train

    recs = [_rec(i, f"ok{i % 3}.png") for i in range(6)] + [_rec(6, "broken.png"), _rec(7, "gone.png")]
    (files / "d.json").write_text(json.dumps(recs))
    p = tmp_path / "r.yaml"
    p.write_text(f"""defaults: [models/tiny.yaml, stages/single_stage.yaml]
run: {{progress: false, feature_cache_dir: {tmp_path / 'fc'}}}
data: {{on_error: skip, group_by_length: false}}
datasets:
  captions: {{type: llava, path: {files / 'd.json'}}}
  instructions: {{type: llava, path: {files / 'd.json'}, max_samples: 1}}
stages: {{finetune: {{data: [captions], max_steps: 2, batch_size: 7, gradient_checkpointing: false}}}}
""")
    with pytest.raises(UserError, match="unknown key datasets.instructions.max_samples"):
        load_recipe(p)
    p.write_text(p.read_text().replace(", max_samples: 1", ""))
    train(load_recipe(p), tmp_path / "run")
    m = list(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    # gone.png is dropped when the file is read (1), broken.png when its batch is loaded (+1 per epoch seen)
    assert m[0]["skipped_samples"] >= 1 and m[-1]["skipped_samples"] == 3
    assert len(list(read_jsonl(tmp_path / "run" / "stages" / "finetune" / "skipped.jsonl"))) == 2


def test_hf_image_feature_column(files):
    """An HF dataset with an Image column (what hub datasets like PixMo-style parquet give) and conversations."""
    import datasets

    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]
    from PIL import Image

    features = datasets.Features({"picture": datasets.Image(), "conversations": [{"from": datasets.Value("string"),
                                                                               "value": datasets.Value("string")}]})
    im = Image.new("RGB", (12, 10), (9, 99, 199))  # in memory: the dataset stores its encoded bytes
    ds = datasets.Dataset.from_dict({"picture": [im], "conversations": [conv]},
                                    features=features)
    ds.to_parquet(str(files / "d.parquet"))
    src = load_source("p", ds_cfg(type="hf", path="parquet", data_files=[str(files / "d.parquet")],
                                  columns={"image": "picture"}), "raise")
    rec = src.records[0]
    assert rec.messages[1] == {"role": "assistant", "content": "Red."}
    assert rec.images == ["hf:0:0"]  # a reference into the memory-mapped dataset, read when the sample is loaded
    from vlm.data.datasets import open_image

    assert open_image(src.image_bytes(rec.images[0])).tobytes() == im.tobytes()


def test_hf_uri_llava_files_are_fetched_from_the_dataset_repo(files, monkeypatch):
    """recipes/data/*.yaml name LLaVA-format hub files as hf://org/repo/file; offline failures are UserErrors."""
    import huggingface_hub

    (files / "blip.json").write_text(json.dumps([_rec(0)]))
    calls = []

    def fake(repo_id, filename, repo_type=None, **kw):
        calls.append((repo_id, filename, repo_type))
        if repo_id == "offline/repo":
            raise OSError("no network")
        return str(files / "blip.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    cfg = ds_cfg(type="llava", path="hf://liuhaotian/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", image_root=str(files))
    assert len(load_source("p", cfg, "raise").records) == 1
    assert calls == [("liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json", "dataset")]
    with pytest.raises(UserError, match="cannot fetch hf://offline/repo/x.json .*Download the file"):
        load_source("p", {**cfg, "path": "hf://offline/repo/x.json"}, "raise")

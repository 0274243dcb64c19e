"""Training data at scale and in LLaVA's exact formats (issue 11): memory-mapped record tables, rows named by
index and id in one-line JSON arrays, `<image>` placement, LLaVA-1.5's `plain` stage 1, lazy HF images, URL
images through a cache with retries and dead links counted, the tokenizer's vocabulary read once."""
from __future__ import annotations

import dataclasses
import http.server
import io
import json
import threading
from pathlib import Path

import pytest

from vlm.data.datasets import TrainSet, build_mixture, default_num_workers, load_source
from vlm.data.records import iter_json_rows, place_images
from vlm.errors import UserError
from vlm.recipe.schema import Data, Dataset

CONV = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]


def ds_cfg(**kw) -> dict:
    return dataclasses.asdict(Dataset(**kw))


def data_cfg(tmp_path: Path, **kw) -> dict:
    return dataclasses.asdict(Data(**{"cache_dir": str(tmp_path / "cache"), **kw}))


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (16, 16), (50 * i, 0, 0)).save(tmp_path / f"ok{i}.png")
    return tmp_path


@pytest.fixture(scope="module")
def tok():
    from vlm.model.llm import build_llm
    from vlm.testing import tiny_llm_config

    llm = build_llm({"config": tiny_llm_config("llama"), "tokenizer": "builtin:vicuna_v1"})
    return llm.tokenizer, llm.image_token_id


def _pretrain_rows(n: int) -> list[dict]:
    """LLaVA-Pretrain's blip_laion_cc_sbu_558k.json rows: id, image, 2-turn conversation with a varied prompt."""
    return [{"id": f"00{i:04d}", "image": f"ok{i % 3}.png",
             "conversations": [{"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                               {"from": "gpt", "value": f"caption number {i}"}]} for i in range(n)]


# --------------------------------------------------------------------------- where a row is
def test_broken_row_in_a_one_line_array_is_named_by_index_and_id(files):
    rows = _pretrain_rows(6)
    rows[4]["conversations"] = [{"from": "human", "value": "<image>"}]  # no gpt turn
    (files / "blip.json").write_text(json.dumps(rows))  # one line, as the real 558K file
    assert len((files / "blip.json").read_text().splitlines()) == 1
    cfg = ds_cfg(type="llava", path=str(files / "blip.json"))
    with pytest.raises(UserError, match=rf"at {files / 'blip.json'}:1 \(row 4, id '000004'\): no assistant"):
        load_source("p", cfg, "raise", data_cfg(files))
    src = load_source("p", cfg, "skip", data_cfg(files))
    assert len(src.records) == 5 and src.skipped == [f"{files / 'blip.json'}:1 (row 4, id '000004'): no assistant "
                                                     "(gpt) turn to learn from"]


def test_invalid_json_in_a_one_line_array_names_row_and_id(files, monkeypatch):
    import vlm.data.records as R

    text = json.dumps(_pretrain_rows(50))
    at = text.index('"000037"')
    bad = text[:at] + text[at:].replace('"conversations": ', '"conversations" ', 1)
    (files / "blip.json").write_text(bad)
    monkeypatch.setattr(R, "_CHUNK", 256)  # rows cross chunk boundaries, as in the 558K file
    with pytest.raises(UserError, match=r"blip\.json:1 \(row 37, id '000037'\): invalid JSON in array row 37"):
        list(iter_json_rows(files / "blip.json"))
    (files / "cut.json").write_text(text[:-40])
    with pytest.raises(UserError, match="the JSON array is not closed.*truncated"):
        list(iter_json_rows(files / "cut.json"))
    wheres = [w for w, _ in iter_json_rows(_write(files / "ok.json", text))]
    assert wheres[37] == f"{files / 'ok.json'}:1 (row 37, id '000037')" and len(wheres) == 50


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- <image> placement
def test_trailing_image_is_trained_in_front_by_default_and_kept_on_request(files):
    rows = [{"id": "sa_1", "image": "ok1.png", "conversations": [
        {"from": "human", "value": "What do you see happening in this image?\n<image>"},
        {"from": "gpt", "value": "Detailed text."}]}]
    (files / "share.json").write_text(json.dumps(rows))
    front = load_source("s", ds_cfg(type="llava", path=str(files / "share.json")), "raise", data_cfg(files))
    assert front.records[0].messages[0]["content"] == "<image>\nWhat do you see happening in this image?"
    keep = load_source("s", ds_cfg(type="llava", path=str(files / "share.json"), image_position="keep"), "raise",
                       data_cfg(files))
    assert keep.records[0].messages[0]["content"] == "What do you see happening in this image?\n<image>"
    # LLaVA's preprocess_multimodal: remove, strip, prefix "<image>\n", strip
    assert place_images([{"role": "user", "content": "  <image>  "}], "front")[0]["content"] == "<image>"
    assert place_images([{"role": "user", "content": "a <image> b"}], "front")[0]["content"] == "<image>\na  b"


# --------------------------------------------------------------------------- LLaVA-1.5 stage 1
def test_llava_two_stage_is_plain_stage1_and_the_chat_variant_is_separate():
    from vlm.recipe.schema import compose

    root = Path(__file__).resolve().parents[1] / "recipes"
    base = compose(root / "stages" / "llava_two_stage.yaml")
    chat = compose(root / "stages" / "two_stage_chat_align.yaml")
    assert base["stages"]["align"]["chat_template"] == "plain"
    assert base["stages"]["finetune"].get("chat_template") is None
    assert chat["stages"]["align"]["chat_template"] is None
    import yaml

    for grid in (root / "grids").glob("*.yaml"):
        if "base" in yaml.safe_load(grid.read_text()):  # a grid that trains (a survey grid only evaluates)
            assert "# Stages:" in grid.read_text(), f"{grid.name} does not say which stage 1 it uses"


def test_plain_format_matches_llava_preprocess_plain(tok):
    """LLaVA's preprocess_plain: <image> + caption + "\\n" tokenised with BOS; labels on caption + "\\n"."""
    from vlm.model.chat import tokenize_conversation

    tokenizer, image_id = tok
    msgs = [{"role": "user", "content": "Render a clear and concise summary of the photo.\n<image>"},
            {"role": "assistant", "content": "a dog on a beach"}]
    ids, labels = tokenize_conversation(tokenizer, msgs, sample_id=0, chat_template="plain")
    caption = tokenizer("a dog on a beach\n", add_special_tokens=False)["input_ids"]
    ref = [tokenizer.bos_token_id, image_id] + caption  # tokenizer_image_token("<image>" + caption + sep)
    assert ids == ref
    assert labels == [-100, -100] + caption


# --------------------------------------------------------------------------- the record table
def test_table_is_built_once_then_memory_mapped_and_pickles_by_path(files, monkeypatch):
    import pickle

    import vlm.data.records as R

    (files / "blip.json").write_text(json.dumps(_pretrain_rows(30)))
    cfg = ds_cfg(type="llava", path=str(files / "blip.json"))
    a = load_source("p", cfg, "raise", data_cfg(files))
    monkeypatch.setattr(R, "iter_json_rows", lambda *a: pytest.fail("the file was parsed again"))
    b = load_source("p", cfg, "raise", data_cfg(files))
    assert [r.id for r in b.records] == [r.id for r in a.records] and len(b.records) == 30
    assert b.table._table.column("messages").chunks[0].buffers()[2].address != 0  # Arrow buffers, mapped
    blob = pickle.dumps(b.table)
    assert len(blob) < 2000  # path + metadata, not the rows
    assert pickle.loads(blob).row(7).id == "000007"
    monkeypatch.undo()
    rows = _pretrain_rows(30)
    rows[7]["id"] = "changed"  # same size and path, new content: a new table (the digest memo sees the new mtime)
    (files / "blip.json").write_text(json.dumps(rows).replace('"000008"', '"00008x"'))
    assert load_source("p", cfg, "raise", data_cfg(files)).records[7].id == "changed"


def test_missing_image_rows_are_rechecked_each_load(files):
    rows = _pretrain_rows(3)
    rows[1]["image"] = "later.png"
    (files / "blip.json").write_text(json.dumps(rows))
    cfg = ds_cfg(type="llava", path=str(files / "blip.json"))
    src = load_source("p", cfg, "skip", data_cfg(files))
    assert len(src.records) == 2 and "later.png not found" in src.skipped[0]
    (files / "later.png").write_bytes((files / "ok0.png").read_bytes())
    assert len(load_source("p", cfg, "raise", data_cfg(files)).records) == 3


def test_mixture_is_index_arrays_and_lengths_vectorised(files, tok):
    (files / "blip.json").write_text(json.dumps(_pretrain_rows(10)))
    src = load_source("p", ds_cfg(type="llava", path=str(files / "blip.json")), "raise", data_cfg(files))
    mix = build_mixture([{"dataset": "p", "weight": 1.5, "max_samples": None}], {"p": src}, seed=0)
    assert len(mix) == 15 and mix.idx.dtype.kind == "i"
    tokenizer, image_id = tok
    ts = TrainSet(mix, tokenizer, image_id, 4, 512, "raise", "plain")
    assert ts.lengths() == [ts.length(i) for i in range(len(ts))]
    assert ts[0]["input_ids"].count(image_id) == 4


# --------------------------------------------------------------------------- HF images stay on disk
def test_hf_embedded_images_are_references_read_when_loaded(files, tok):
    import datasets
    from PIL import Image

    feats = datasets.Features({"picture": datasets.Image(), "conversations": [
        {"from": datasets.Value("string"), "value": datasets.Value("string")}]})
    ims = [Image.new("RGB", (12, 10), (9, 99, k)) for k in range(4)]
    datasets.Dataset.from_dict({"picture": ims, "conversations": [CONV] * 4}, features=feats).to_parquet(
        str(files / "d.parquet"))
    src = load_source("h", ds_cfg(type="hf", path="parquet", data_files=[str(files / "d.parquet")],
                                  columns={"image": "picture"}), "raise", data_cfg(files))
    assert src.records[2].images == ["hf:2:0"]  # a reference, not the bytes
    from vlm.data.images import open_image

    assert open_image(src.image_bytes("hf:2:0")).tobytes() == ims[2].tobytes()
    tokenizer, image_id = tok
    item = TrainSet(src.records, tokenizer, image_id, 2, 512, "raise")[3]
    assert item["images"][0].tobytes() == ims[3].tobytes()


# --------------------------------------------------------------------------- URL images
class _Server:
    """A local HTTP server: /ok/<k>.png images, /gone (404), /html (an error page), /flaky (503 then the image)."""

    def __init__(self, png: bytes) -> None:
        self.hits: dict[str, int] = {}
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                if self.path.startswith("/ok/") or (self.path == "/flaky" and outer.hits[self.path] > 1):
                    body, code, typ = png, 200, "image/png"
                elif self.path == "/flaky":
                    body, code, typ = b"busy", 503, "text/plain"
                elif self.path == "/html":
                    body, code, typ = b"<html>moved</html>", 200, "text/html"
                else:
                    body, code, typ = b"no", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", typ)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def server(files):
    s = _Server((files / "ok1.png").read_bytes())
    yield s
    s.httpd.shutdown()


def test_url_images_are_prefetched_once_with_retries_and_dead_links_counted(files, server, tok):
    u = server.url
    rows = [{"image_url": f"{u}/ok/{k}.png", "caption": f"c{k}"} for k in range(6)]
    rows += [{"image_url": f"{u}/gone", "caption": "x"}, {"image_url": f"{u}/html", "caption": "y"},
             {"image_url": f"{u}/flaky", "caption": "z"}]
    (files / "pixmo.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = ds_cfg(type="hf", path="json", data_files=[str(files / "pixmo.jsonl")],
                 columns={"image": "image_url", "caption": "caption"}, prompt="<image>\nDescribe this image in detail.")
    dc = data_cfg(files, url_retries=2, url_timeout=5.0)
    dc["url_backoff"] = 0.01
    src = load_source("pixmo", cfg, "raise", dc)  # dead links never stop a run: skipped and counted
    assert len(src.records) == 7 and len(src.skipped) == 2
    assert any(f"{u}/gone" in s and "HTTP 404" in s for s in src.skipped)
    assert any(f"{u}/html" in s and "not an image" in s for s in src.skipped)
    assert server.hits["/flaky"] == 2 and server.hits["/gone"] == 1  # 5xx retried, 404 not
    before = dict(server.hits)
    again = load_source("pixmo", cfg, "raise", dc)
    assert server.hits == before and len(again.skipped) == 2  # everything from the cache, dead links remembered
    tokenizer, image_id = tok
    item = TrainSet(again.records, tokenizer, image_id, 2, 512, "raise")[6]
    assert item["images"][0].size == (16, 16) and server.hits == before


# --------------------------------------------------------------------------- tokenising and workers
def test_tokenizer_vocabulary_is_not_read_per_sample(tok, monkeypatch):
    from vlm.model.chat import tokenize_conversation

    tokenizer, _ = tok
    calls = []
    real = type(tokenizer).get_vocab
    monkeypatch.setattr(type(tokenizer), "get_vocab", lambda self: calls.append(1) or real(self))
    msgs = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}]
    for k in range(20):
        tokenize_conversation(tokenizer, msgs, sample_id=k)
    assert len(calls) <= 1


def test_default_workers_leave_a_core_for_the_trainer(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers(8) == 7 and default_num_workers(1) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_num_workers(1) == 1 and default_num_workers(4) == 1


@pytest.mark.parametrize("family", ["llama3", "chatml", "vicuna_v1", "mistral", "gemma", "plain"])
def test_fast_label_spans_equal_prefix_tokenisation(family, monkeypatch):
    """Labels located by character spans of one encoding == labels from tokenising every prefix render (the
    definition), on conversations that stress the boundaries (whitespace, newlines, <image>, multi-byte text)."""
    import random

    import vlm.model.chat as chat
    from vlm.model.llm import build_llm
    from vlm.testing import tiny_llm_config

    tok = build_llm({"config": tiny_llm_config("llama"), "tokenizer": f"builtin:{family}"}).tokenizer
    rng = random.Random(0)
    pieces = ["a", "word", " ", "  ", "\n", "\n\n", "<image>", "é", "日本", "?", " ASSISTANT:", "</s>", "12", "\t"]

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))).strip() or "x"

    convs = []
    for _ in range(60):
        msgs = []
        for _ in range(rng.randint(1, 4)):
            msgs += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        convs.append(msgs)

    def run() -> list:
        out = []
        for k, m in enumerate(convs):
            try:
                out.append(chat.tokenize_conversation(tok, m, sample_id=k))
            except UserError as e:
                out.append(str(e))
        return out

    fast = run()
    assert chat._token_info(tok)[2] is True  # the fast path is taken (no offset-trimming post-processor)
    monkeypatch.setattr(chat, "_exact_offsets", lambda t: False)  # every prefix tokenised (the definition)
    chat._TOKEN_INFO.clear()
    assert chat._token_info(tok)[2] is False
    assert run() == fast
    chat._TOKEN_INFO.clear()


def test_image_transform_runs_in_the_workers_and_errors_keep_their_message(files, tok):
    """The encoder's transform applied by the TrainSet (in the DataLoader workers) gives the pixels the model's
    own preprocess gives; a broken sample found in a worker is a UserError with its own message."""
    import functools

    import torch

    from vlm.data.datasets import collate
    from vlm.testing import tiny_vlm
    from vlm.train.steps import _next_batch, _worker_transform

    vlm = tiny_vlm("clip")
    transform = _worker_transform(vlm)
    assert transform is not None
    rows = _pretrain_rows(4)
    rows[3]["image"] = "bad.png"
    (files / "bad.png").write_bytes(b"not an image")
    (files / "blip.json").write_text(json.dumps(rows))
    src = load_source("p", ds_cfg(type="llava", path=str(files / "blip.json")), "raise", data_cfg(files))
    ds = TrainSet(src.records, vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens, 512, "raise", "plain",
                  transform=transform)
    from PIL import Image

    loader = torch.utils.data.DataLoader(ds, batch_sampler=[[0, 1], [2, 3]], num_workers=1,
                                         collate_fn=functools.partial(collate, pad_id=0))
    batches = iter(loader)
    first = _next_batch(batches)
    expected = vlm.preprocess([Image.open(files / "ok0.png").convert("RGB"), Image.open(files / "ok1.png").convert("RGB")])
    assert torch.equal(torch.stack(first["images"]), expected.cpu())
    with pytest.raises(UserError) as e:
        _next_batch(batches)
    assert str(e.value).startswith(f"broken training sample at {files / 'blip.json'}:1 (row 3, id '000003'): cannot read")
    assert "Traceback" not in str(e.value)

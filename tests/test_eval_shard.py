"""`vlm eval` over several processes: each predicts its own slice, rank 0 merges and scores; resume across world
sizes. Two CPU processes (gloo, torchrun) on a tiny exported HF LLaVA must give a 1-process run's predictions."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval.base import merge_predictions, shard_files
from eval.runner import evaluate
from vlm import load_vlm
from vlm.io import read_json, read_jsonl
from vlm.model.hf_llava import export_hf_llava
from vlm.testing import tiny_vlm

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
N_ITEMS = 11  # not a multiple of the world sizes used


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("shard")
    model_dir = export_hf_llava(tiny_vlm("clip", "llama", "chatml", seed=3), tmp / "llava")
    data = tmp / "textvqa"
    data.mkdir()
    rows = []
    for i in range(N_ITEMS):
        Image.new("RGB", (32, 32), (20 * i, 255 - 20 * i, 7 * i)).save(data / f"img{i}.jpg")
        rows.append({"question_id": 100 + i, "question": f"What colour is thing {i}?" + " really" * (i % 4),
                     "image_id": f"img{i}", "answers": ["red"] * 5 + ["blue"] * 5})
    (data / "val.json").write_text(json.dumps({"data": rows}))
    task = tmp / "task.yaml"
    task.write_text(f"type: textvqa\nname: tv\ndata_file: {data / 'val.json'}\nmax_new_tokens: 5\n")
    return {"tmp": tmp, "model": f"hf-llava:{model_dir}", "task": task}


@pytest.fixture(scope="module")
def one_process(setup) -> Path:
    out = setup["tmp"] / "one"
    torch.manual_seed(0)
    evaluate(load_vlm(setup["model"]), [str(setup["task"])], out, batch_size=4)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_eval(setup: dict, out: Path, nproc: int = 2) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(_free_port()), "-m", "vlm", "eval", "--model", setup["model"], "--tasks", str(setup["task"]),
         "--out", str(out), "--batch-size", "2"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_two_processes_give_one_process_predictions(setup, one_process):
    out = setup["tmp"] / "two"
    _torchrun_eval(setup, out)
    pred = out / "eval" / "tv" / "predictions.jsonl"
    assert pred.read_bytes() == (one_process / "eval" / "tv" / "predictions.jsonl").read_bytes()
    assert not shard_files(out / "eval" / "tv")
    assert read_json(out / "results.json")["tasks"] == read_json(one_process / "results.json")["tasks"]
    assert len(list(read_jsonl(pred))) == N_ITEMS


def test_relaunch_with_another_world_size_resumes(setup, one_process):
    """A 3-process run killed part way (a torn last line in one shard) resumes under 2 processes: what is there is
    kept (marked records are not predicted again), the rest predicted, all merged in item order."""
    ref = list(read_jsonl(one_process / "eval" / "tv" / "predictions.jsonl"))
    out = setup["tmp"] / "resumed"
    task_dir = out / "eval" / "tv"
    task_dir.mkdir(parents=True)
    (task_dir / "task.json").write_bytes((one_process / "eval" / "tv" / "task.json").read_bytes())
    kept = {0: [ref[0], ref[3]], 2: [ref[2]]}  # ranks 0 and 2 of 3 had written these before the kill
    for rank, recs in kept.items():
        lines = "".join(json.dumps({**r, "prediction": "KEPT"}, sort_keys=True) + "\n" for r in recs)
        (task_dir / f"predictions.shard-{rank}.jsonl").write_text(lines + ('{"id": "torn' if rank == 2 else ""))
    _torchrun_eval(setup, out)
    got = list(read_jsonl(task_dir / "predictions.jsonl"))
    assert [r["id"] for r in got] == [r["id"] for r in ref]
    for r, want in zip(got, ref):
        if r["id"] in {"100", "103", "102"}:
            assert r["prediction"] == "KEPT"
        else:
            assert r == want
    assert not shard_files(task_dir)


def test_merge_orders_by_item_dedupes_and_keeps_foreign_ids(tmp_path):
    items = [{"id": str(i)} for i in range(5)]
    (tmp_path / "predictions.jsonl").write_text('{"id": "3", "p": "a"}\n{"id": "old", "p": "x"}\n')
    (tmp_path / "predictions.shard-0.jsonl").write_text('{"id": "4", "p": "b"}\n{"id": "0", "p": "c"}\n')
    (tmp_path / "predictions.shard-1.jsonl").write_text('{"id": "1", "p": "d"}\n{"id": "3", "p": "dup"}\n{"id"')
    merge_predictions(tmp_path, items)
    got = [(r["id"], r["p"]) for r in read_jsonl(tmp_path / "predictions.jsonl")]
    assert got == [("0", "c"), ("1", "d"), ("3", "a"), ("4", "b"), ("old", "x")]
    assert not shard_files(tmp_path)
    merge_predictions(tmp_path, items)  # nothing to merge: unchanged
    assert [(r["id"], r["p"]) for r in read_jsonl(tmp_path / "predictions.jsonl")] == got

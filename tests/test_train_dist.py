"""Resume after SIGKILL is bitwise exact; 2 processes (gloo, CPU) match 1 process at the same global batch."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.io import read_json, read_jsonl
from vlm.recipe.schema import load_recipe
from vlm.train.steps import train

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    from PIL import Image

    recs = []
    for i in range(16):
        Image.new("RGB", (20, 20), (i * 15, 255 - i * 15, 9 * i)).save(tmp_path / f"im{i}.png")
        recs.append({"id": str(i), "image": f"im{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nName it."}, {"from": "gpt", "value": f"Patch {i}" + " yes" * (i % 5)}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    p = tmp_path / "r.yaml"
    p.write_text(f"""defaults: [models/tiny.yaml, stages/llava_two_stage.yaml]
run: {{name: t, progress: false, feature_cache_dir: {tmp_path / 'fc'}}}
datasets:
  captions: {{type: llava, path: {tmp_path / 'd.json'}}}
  instructions: {{type: llava, path: {tmp_path / 'd.json'}}}
stages:
  align: {{max_steps: 2, batch_size: 4, max_length: 128}}
  finetune:
    max_steps: 8
    batch_size: 4
    max_length: 128
    save_every: 1
    gradient_checkpointing: false
    optim: {{lr: 1.0e-3, warmup_ratio: 0.25}}
    freeze: {{vision: {{mode: partial, k: 1}}, llm: {{mode: lora, r: 4, dropout: 0.2}}}}
""")
    return p


def _vlm_train(recipe: Path, out: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlm", "train", str(recipe), *overrides, "--out", str(out)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _artifacts(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for stage in ("align", "finetune"):
        art = Path(read_json(run / "stages" / stage / "artifact.json")["path"])
        out[stage] = load_file(str(art / "weights.safetensors"))
    return out


def test_sigkill_and_resume_is_bitwise_equal(recipe, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    # separate feature caches: the two runs must not feed each other features computed in other batches
    own = [f"run.feature_cache_dir={tmp_path / 'fc_ref'}"], [f"run.feature_cache_dir={tmp_path / 'fc_killed'}"]
    p_ref, p_kill = _vlm_train(recipe, ref, *own[0]), _vlm_train(recipe, killed, *own[1])
    deadline = time.time() + 300
    while time.time() < deadline and p_kill.poll() is None:
        steps = [m.get("step", 0) for m in read_jsonl(killed / "metrics.jsonl") if m.get("stage") == "finetune"]
        if steps and max(steps) >= 3:
            os.kill(p_kill.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert p_kill.wait() == -signal.SIGKILL, p_kill.stdout.read()
    assert p_ref.wait() == 0, p_ref.stdout.read()
    assert (killed / "stages" / "finetune" / "checkpoints" / "latest.json").is_file()
    p_res = _vlm_train(recipe, killed, *own[1])
    assert p_res.wait() == 0, p_res.stdout.read()

    a, b = _artifacts(ref), _artifacts(killed)
    for stage in a:
        assert a[stage].keys() == b[stage].keys()
        for k in a[stage]:
            assert torch.equal(a[stage][k], b[stage][k]), (stage, k)
    assert any("lora_" in k for k in a["finetune"]) and any(k.startswith("encoder.") for k in a["finetune"])
    fine = [m for m in read_jsonl(killed / "metrics.jsonl") if m.get("stage") == "finetune"]
    assert [m["step"] for m in fine].count(1) == 1, "resume restarted the stage instead of continuing"
    assert [m["step"] for m in read_jsonl(killed / "metrics.jsonl") if m.get("stage") == "align"] == [1, 2]
    ref_loss = {m["step"]: m["loss"] for m in read_jsonl(ref / "metrics.jsonl") if m.get("stage") == "finetune"}
    assert all(m["loss"] == ref_loss[m["step"]] for m in fine)
    assert read_json(killed / "status.json")["state"] == "done"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(recipe, tmp_path):
    """Global batch 4 = 1 process x 4 = 2 processes x 2: the same loss curve and weights (no dropout)."""
    no_dropout = ["stages.finetune.freeze.llm.dropout=0.0", "stages.finetune.save_every=0", "stages.finetune.max_steps=4"]
    dist = tmp_path / "dist"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "vlm", "train", str(recipe), *no_dropout, "stages.align.batch_size=2", "stages.finetune.batch_size=2",
         "--out", str(dist)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = tmp_path / "one"
    train(load_recipe(recipe, no_dropout), one)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    l1 = [(m["stage"], m["step"], m["loss"]) for m in read_jsonl(one / "metrics.jsonl")]
    l2 = [(m["stage"], m["step"], m["loss"]) for m in read_jsonl(dist / "metrics.jsonl")]
    assert [x[:2] for x in l1] == [x[:2] for x in l2]
    assert [x[2] for x in l1] == pytest.approx([x[2] for x in l2], rel=1e-4)
    assert read_json(dist / "manifest.json")["hardware"]["world_size"] == 2
    a, b = _artifacts(one), _artifacts(dist)
    for stage in a:
        for k in a[stage]:
            torch.testing.assert_close(a[stage][k], b[stage][k], rtol=1e-3, atol=1e-5)

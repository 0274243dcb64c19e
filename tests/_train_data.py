"""Tiny LLaVA-format data and recipes for the training tests (12-16 coloured images, short conversations)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def write_data(tmp_path: Path, n: int = 16, long_every: int = 0, words: int = 0) -> Path:
    """`n` samples `im{i}.png` + `d.json`; every `long_every`-th answer gets `words` extra words."""
    from PIL import Image

    recs = []
    for i in range(n):
        Image.new("RGB", (20, 20), (i * 15, 255 - i * 15, 9 * i)).save(tmp_path / f"im{i}.png")
        answer = f"Patch {i}" + " yes" * (i % 5)
        if long_every and i % long_every == 0:
            answer += " word" * words
        recs.append({"id": str(i), "image": f"im{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nName it."}, {"from": "gpt", "value": answer}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    return tmp_path / "d.json"


def write_recipe(tmp_path: Path, body: str = "", n: int = 16, **data_kw) -> Path:
    """The tiny model with both LLaVA stages on `write_data`'s samples; `body` is appended (YAML)."""
    data = write_data(tmp_path, n, **data_kw)
    p = tmp_path / "r.yaml"
    p.write_text(f"""defaults: [models/tiny.yaml, stages/llava_two_stage.yaml]
run: {{name: t, progress: false, feature_cache_dir: {tmp_path / 'fc'}}}
datasets:
  captions: {{type: llava, path: {data}}}
  instructions: {{type: llava, path: {data}}}
""" + body)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, *args: str, env: dict | None = None, session: bool = False) -> subprocess.Popen:
    """`torch.distributed.run --nproc_per_node N -m vlm ARGS` on CPU (gloo); `session`: in its own process group
    (to kill it with its workers)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                             "--master_port", str(free_port()), "-m", "vlm", *args], cwd=ROOT,
                            env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=session)


def hold_lock_then_release(path: str, seconds: float, ready, started: str) -> None:
    """Hold the lock until both ranks are about to wait for it, then `seconds` longer (a spawned process)."""
    from filelock import FileLock

    with FileLock(path):
        ready.set()
        while not all(Path(f"{started}.{r}").exists() for r in (0, 1)):
            time.sleep(0.05)
        time.sleep(seconds)


def wait_for_lock_rank(rank: int, port: int, lock: str, out: str) -> None:
    """One of 2 gloo ranks (3 s collective timeout) waiting for `lock` with `collective_lock` (a spawned process);
    writes how long it waited to `out.<rank>`."""
    import datetime

    import torch

    from vlm.train.sync import collective_lock

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3))
    torch.distributed.barrier()
    open(f"{out}.started.{rank}", "w").close()
    t0 = time.time()
    with collective_lock(lock, main=rank == 0, poll_s=0.5):
        waited = time.time() - t0
    torch.distributed.barrier()
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{waited:.2f}")
    torch.distributed.destroy_process_group()

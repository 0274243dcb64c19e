"""Training-data pipeline at LLaVA scale: vlm-ablate's memory-mapped record tables vs LLaVA's own approach.

A synthetic LLaVA-1.5 665K mix in the real format (one JSON array on one line; `id`, `image`, `conversations`
[{from: human|gpt, value}], ~6% text-only rows, some questions with a trailing `<image>`; small JPEGs under
coco/train2017/) is read by both sides:

- **LLaVA** (`LazySupervisedDataset`, written here from its documented behaviour): `json.load` of the whole list
  in every rank, then per item: deep copy, move `<image>` to the front, vicuna_v1 prompt, tokenise by splitting
  on `<image>`, mask the instruction parts, open the image, pad to square, CLIP-336 transform;
- **ours**: `vlm.data.datasets.load_source` (the Arrow record table, built once and memory-mapped) +
  `build_mixture` + `TrainSet` (tokenise, expand image tokens, decode the image, CLIP-336 transform in the
  worker) with the same tokenizer (SmolLM2-135M's, from the offline zoo) and the vicuna_v1 template.

Measured: time to the first batch (a fresh process per side: reading the data + DataLoader start), RSS of the
rank, USS (private memory) of each worker after its first batch and at its highest during a full pass over every
row (sampled every 2,000 batches), samples/s per worker,
tokenising time per sample, and the CPU cost of the CLIP-336 transform of a 640x480 JPEG. The full pass touches
every row (what makes forked workers copy Python objects) but preprocesses only every `--stride`-th row, so it
finishes on a small machine; samples/s is measured on full preprocessing.

    .venv/bin/python benchmarks/data_pipeline.py [--rows 665000] [--workers 2] [--stride 100]

Last line: `RATIO first_batch_llava_over_ours=... worker_growth_mib_llava=... worker_growth_mib_ours=...`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the a of in on with what is are there how many color left right top bottom person man woman dog cat car "
         "table red blue green white black small large two three sitting standing holding near behind front image "
         "picture shows scene street kitchen room sky tree water building sign bus train plate food").split()
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


# --------------------------------------------------------------------------- the synthetic mix
def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def make_mix(out: Path, rows: int, n_images: int = 256, seed: int = 0) -> Path:
    """The 665K mix's format: one JSON array, image rows (1-6 QA rounds) and text-only rows (~6%)."""
    from PIL import Image

    path = out / f"llava_mix_{rows}.json"
    if path.is_file():
        return path
    rng = random.Random(seed)
    img_dir = out / "coco" / "train2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        Image.new("RGB", (48, 40), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(img_dir / f"{i:012d}.jpg")
    data = []
    for i in range(rows):
        conv = []
        text_only = rng.random() < 0.06
        for r in range(rng.randint(1, 6)):
            q = _text(rng, 4, 16)
            if r == 0 and not text_only:
                q = f"{q}\n<image>" if rng.random() < 0.3 else f"<image>\n{q}"
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _text(rng, 3, 60)}]
        row: dict[str, Any] = {"id": f"{i:012d}"}
        if not text_only:
            row["image"] = f"coco/train2017/{rng.randrange(n_images):012d}.jpg"
        row["conversations"] = conv
        data.append(row)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))  # one line, as LLaVA-Pretrain's 558K file
    tmp.rename(path)
    return path


def tokenizer():
    from transformers import AutoTokenizer

    from vlm.world.zoo.catalogue import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve("zoo:smollm2-135m-instruct")))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def clip_transform():
    from encoders.transforms import ImageTransform

    return ImageTransform(336, resize="center_crop", mean=(0.48145466, 0.4578275, 0.40821073),
                          std=(0.26862954, 0.26130258, 0.27577711))


# --------------------------------------------------------------------------- LLaVA's approach
class LlavaLazyDataset:
    """LLaVA-1.5's LazySupervisedDataset (vicuna_v1 conversation, `preprocess_multimodal`, `preprocess_v1`,
    `tokenizer_image_token`, `expand2square`), from its documented behaviour."""

    def __init__(self, path: Path, image_folder: Path, tok: Any, transform: Any, stride: int = 1) -> None:
        with open(path) as f:
            self.list_data_dict = json.load(f)
        self.image_folder, self.tok, self.transform, self.stride = image_folder, tok, transform, stride
        self.image_id = tok.convert_tokens_to_ids("<image>")

    def __len__(self) -> int:
        return len(self.list_data_dict)

    def _tokenize_with_image(self, prompt: str) -> list[int]:
        chunks = [self.tok(c).input_ids for c in prompt.split("<image>")]
        ids: list[int] = []
        for k, c in enumerate(chunks):
            ids += c + ([self.image_id] if k < len(chunks) - 1 else [])
        return ids

    def __getitem__(self, i: int) -> dict:
        sources = self.list_data_dict[i]
        if i % self.stride:
            return {"id": sources["id"]}  # the row is touched (as the sampler's access would), not preprocessed
        conv = copy.deepcopy(sources["conversations"])
        for s in conv:  # preprocess_multimodal
            if "<image>" in s["value"]:
                s["value"] = ("<image>\n" + s["value"].replace("<image>", "").strip()).strip()
        prompt = SYSTEM + " "
        for s in conv:
            role = "USER" if s["from"] == "human" else "ASSISTANT"
            prompt += f"{role}: {s['value']}" + (" " if role == "USER" else "</s>")
        ids = self._tokenize_with_image(prompt)
        labels = list(ids)
        cur = 1
        labels[:cur] = [-100]
        for rou in prompt.split("</s>"):
            if not rou:
                break
            parts = rou.split("ASSISTANT: ")
            if len(parts) != 2:
                break
            parts[0] += "ASSISTANT: "
            n, instr = len(self._tokenize_with_image(rou)), len(self._tokenize_with_image(parts[0])) - 2
            labels[cur:cur + instr] = [-100] * len(labels[cur:cur + instr])
            cur += n
        out = {"input_ids": ids, "labels": labels}
        if "image" in sources:
            from PIL import Image

            im = Image.open(self.image_folder / sources["image"]).convert("RGB")
            w, h = im.size
            if w != h:  # expand2square
                side = max(w, h)
                sq = Image.new(im.mode, (side, side), (122, 116, 104))
                sq.paste(im, ((side - w) // 2, (side - h) // 2))
                im = sq
            out["image"] = self.transform(im)
        return out


class OursStrided:
    """Our TrainSet with the same touch-every-row / preprocess-every-stride-th rule."""

    def __init__(self, ds: Any, stride: int) -> None:
        self.ds, self.stride = ds, stride

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        if i % self.stride:
            return {"id": self.ds.records[i].id}
        return self.ds[i]


def _collate(items: list[dict]) -> int:
    return len(items)


# --------------------------------------------------------------------------- one side, in its own process
def _uss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_full_info().uss / 2**20


def _rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def build(side: str, path: Path, stride: int, cache: Path) -> Any:
    tok, tf = tokenizer(), clip_transform()
    if side == "llava":
        return LlavaLazyDataset(path, path.parent, tok, tf, stride)
    from vlm.data.datasets import TrainSet, build_mixture, load_source
    from vlm.recipe.schema import Dataset

    cfg = dataclasses.asdict(Dataset(type="llava", path=str(path)))
    src = load_source("mix", cfg, "raise", {"cache_dir": str(cache)})
    mix = build_mixture([{"dataset": "mix", "weight": 1.0, "max_samples": None}], {"mix": src}, 0)
    ds = TrainSet(mix, tok, tok.convert_tokens_to_ids("<image>"), 576, 4096, "raise", "vicuna_v1", transform=tf)
    return OursStrided(ds, stride)


def run_side(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = build(args.side, Path(args.path), args.stride, Path(args.cache))
    t_read = time.perf_counter() - t0
    gc.collect()
    rss_rank = _rss_mib(os.getpid())
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=args.workers, collate_fn=_collate,
                                         shuffle=False, prefetch_factor=4)
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - t0
    pids = [w.pid for w in it._workers]
    uss0 = [_uss_mib(p) for p in pids]
    rss0 = [_rss_mib(p) for p in pids]
    n, uss1, rss1 = 16, list(uss0), list(rss0)
    t1 = time.perf_counter()
    for k in range(1, len(loader)):  # workers stop after the last batch: sample them before it, and on the way
        n += next(it)
        if k % 2000 == 0 or k == len(loader) - 1:
            uss1 = [max(a, _uss_mib(p)) for a, p in zip(uss1, pids)]
            rss1 = [max(a, _rss_mib(p)) for a, p in zip(rss1, pids)]
    t_pass = time.perf_counter() - t1
    del it
    # samples/s of full preprocessing in one process (= one worker's rate)
    inner = ds.ds if isinstance(ds, OursStrided) else ds
    if isinstance(ds, LlavaLazyDataset):
        ds.stride = 1
    idx = random.Random(1).sample(range(len(inner)), args.samples)
    t2 = time.perf_counter()
    for i in idx:
        inner[i]
    per_worker = args.samples / (time.perf_counter() - t2)
    print(json.dumps({"side": args.side, "rows": len(inner), "read_s": t_read, "first_batch_s": t_first,
                      "rss_rank_mib": rss_rank, "worker_uss_start_mib": uss0, "worker_uss_end_mib": uss1,
                      "worker_rss_start_mib": rss0, "worker_rss_end_mib": rss1, "pass_s": t_pass, "pass_rows": n,
                      "samples_per_s_per_worker": per_worker}))


def tokenize_cost(path: Path, n: int) -> dict[str, float]:
    """Tokenising alone (our tokenize_conversation, vicuna_v1, SmolLM2's tokenizer), ms a sample."""
    from vlm.data.records import iter_json_rows, place_images, to_messages
    from vlm.model.chat import tokenize_conversation

    tok = tokenizer()
    convs = []
    for where, obj in iter_json_rows(path):
        convs.append(place_images(to_messages(obj["conversations"], where), "front"))
        if len(convs) >= n:
            break
    tokenize_conversation(tok, convs[0], sample_id="warm", chat_template="vicuna_v1")
    t = time.perf_counter()
    for k, m in enumerate(convs):
        tokenize_conversation(tok, m, sample_id=k, chat_template="vicuna_v1")
    return {"tokenize_ms_per_sample": 1000 * (time.perf_counter() - t) / len(convs),
            "turns_per_sample": sum(len(c) for c in convs) / len(convs)}


def clip_cost(n: int = 50) -> float:
    """ms to decode a 640x480 JPEG (COCO-sized) and apply the CLIP-336 transform, in one process."""
    import io

    import numpy as np
    from PIL import Image

    from vlm.data.images import open_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
    data, tf = buf.getvalue(), clip_transform()
    tf(open_image(data))
    t = time.perf_counter()
    for _ in range(n):
        tf(open_image(data))
    return 1000 * (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=665_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stride", type=int, default=100, help="preprocess every N-th row in the full pass")
    ap.add_argument("--samples", type=int, default=300, help="samples timed for samples/s per worker")
    ap.add_argument("--dir", default=str(Path.home() / ".cache" / "vlm-ablate" / "bench_data"))
    ap.add_argument("--side", choices=["llava", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return run_side(args)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    path = make_mix(out, args.rows)
    print(f"mix: {path} ({path.stat().st_size / 2**20:.0f} MiB, made in {time.perf_counter() - t:.0f} s)", flush=True)
    cache = out / "table_cache"
    res = {}
    for side in ("ours", "llava", "ours"):  # ours twice: the first run builds the table, the second maps it
        cmd = [sys.executable, __file__, "--side", side, "--path", str(path), "--cache", str(cache),
               "--workers", str(args.workers), "--stride", str(args.stride), "--samples", str(args.samples)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        key = side if side == "llava" or "ours_cold" in res else "ours_cold"
        res[key] = r
        print(key, json.dumps(r), flush=True)
    res["tokenize"] = tokenize_cost(path, 2000)
    res["clip336_ms"] = clip_cost()
    print(json.dumps({"machine": f"{platform.node()} {os.cpu_count()} CPUs", **res["tokenize"],
                      "clip336_jpeg640_ms": res["clip336_ms"]}))

    def growth(r: dict) -> float:
        return max(b - a for a, b in zip(r["worker_uss_start_mib"], r["worker_uss_end_mib"]))

    print("| | first batch s | rank RSS MiB | worker USS growth over the pass MiB | samples/s per worker |")
    print("|---|---|---|---|---|")
    for k in ("llava", "ours_cold", "ours"):
        r = res[k]
        print(f"| {k} | {r['first_batch_s']:.1f} | {r['rss_rank_mib']:.0f} | {growth(r):.0f} | "
              f"{r['samples_per_s_per_worker']:.0f} |")
    print(f"RATIO first_batch_llava_over_ours={res['llava']['first_batch_s'] / res['ours']['first_batch_s']:.2f} "
          f"worker_growth_mib_llava={growth(res['llava']):.0f} worker_growth_mib_ours={growth(res['ours']):.0f} "
          f"tokenize_ms={res['tokenize']['tokenize_ms_per_sample']:.2f}")


if __name__ == "__main__":
    main()

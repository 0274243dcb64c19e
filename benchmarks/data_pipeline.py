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

Measured, each side in a fresh process: the imports (torch, transformers, vlm) and the tokenizer load apart (the
same for both), then the
time to the first batch (reading the data + DataLoader start), the rank's RSS, each worker's USS (private memory)
after its first batch and at its highest during a full pass over every row (sampled every 2,000 batches; the pass
touches every row, which is what makes forked workers copy Python objects, but preprocesses only every
`--stride`-th row so it finishes on a small machine). Ours runs twice: cold (builds the table) and warm. Then, in
one process with both sides alternating: samples/s of full preprocessing per worker (on a 20K-row mix of the same
generator); tokenising time per sample; the CPU cost of decoding a 640x480 JPEG + the CLIP-336 transform; and
from `vlm plan`'s FLOPs per sample of LLaVA-1.5 stage 2 (at the mix's mean text length), the samples/s an H100
consumes and the workers that feed it.

    .venv/bin/python benchmarks/data_pipeline.py [--rows 665000] [--workers 2] [--stride 100] [--reps 4]

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


def build(side: str, path: Path, stride: int, cache: Path, tok: Any = None, tf: Any = None) -> Any:
    tok, tf = tok or tokenizer(), tf or clip_transform()
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
    t_start = time.perf_counter()
    import torch
    import transformers  # noqa: F401 - both sides need it (the tokenizer); imports are timed apart

    import vlm.data.datasets  # noqa: F401
    import vlm.model.chat  # noqa: F401

    torch.set_num_threads(1)
    tok, tf = tokenizer(), clip_transform()  # the trainer has its tokenizer before it reads data
    t_import = time.perf_counter() - t_start
    rss_import = _rss_mib(os.getpid())
    t0 = time.perf_counter()
    ds = build(args.side, Path(args.path), args.stride, Path(args.cache), tok, tf)
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
    print(json.dumps({"side": args.side, "rows": len(ds), "import_s": t_import, "rss_after_imports_mib": rss_import,
                      "read_s": t_read, "first_batch_s": t_first, "rss_rank_mib": rss_rank,
                      "worker_uss_start_mib": uss0, "worker_uss_end_mib": uss1, "worker_rss_start_mib": rss0,
                      "worker_rss_end_mib": rss1, "pass_s": t_pass, "pass_rows": n}))


def per_worker_rates(out: Path, reps: int, n: int) -> dict[str, Any]:
    """Samples/s of full preprocessing in one process (= one worker's rate), both sides alternating on a 20K-row
    mix of the same generator (the rate does not depend on the row count); medians of wall and CPU time."""
    import statistics

    import torch

    torch.set_num_threads(1)
    path = make_mix(out, 20_000)
    sides = {s: build(s, path, 1, out / "table_cache") for s in ("ours", "llava")}
    inner = {s: (d.ds if isinstance(d, OursStrided) else d) for s, d in sides.items()}
    rng = random.Random(1)
    wall: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(reps + 1):
        idx = rng.sample(range(20_000), n)
        for s in (("ours", "llava") if r % 2 else ("llava", "ours")):
            t, c = time.perf_counter(), time.process_time()
            for i in idx:
                inner[s][i]
            if r:  # the first round warms both up
                wall[s].append(n / (time.perf_counter() - t))
                cpu[s].append(n / (time.process_time() - c))
    return {s: {"samples_per_s_wall": statistics.median(wall[s]), "samples_per_s_cpu": statistics.median(cpu[s]),
                "min": min(wall[s]), "max": max(wall[s])} for s in sides}


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
    t, c = time.perf_counter(), time.process_time()
    ids = [tokenize_conversation(tok, m, sample_id=k, chat_template="vicuna_v1")[0] for k, m in enumerate(convs)]
    image_id = tok.convert_tokens_to_ids("<image>")
    lens = [len(x) - x.count(image_id) for x in ids]
    return {"tokenize_ms_per_sample": 1000 * (time.perf_counter() - t) / len(convs),
            "tokenize_cpu_ms_per_sample": 1000 * (time.process_time() - c) / len(convs),
            "turns_per_sample": sum(len(c) for c in convs) / len(convs), "text_tokens_per_sample": sum(lens) / len(lens)}


def h100_workers(text_tokens: int, per_worker: float, out: Path) -> dict[str, Any]:
    """Samples/s one H100 consumes in LLaVA-1.5 stage 2 (`vlm plan`'s FLOPs per sample at its default 40% MFU of
    the bf16 dense peak) and the data workers that keep it fed at `per_worker` samples/s each."""
    import math

    from vlm.plan.planner import PEAK_FLOPS, Settings, plan_target

    recipe = out / "llava15_plan.yaml"
    recipe.write_text("defaults: [models/llava15_7b.yaml, data/llava.yaml, stages/llava_two_stage.yaml]\n")
    settings = Settings(text_tokens=int(text_tokens))
    (plan,), _, _ = plan_target(recipe, [], settings)
    st = next(s for s in plan.stages if s.stage == "finetune")
    flops = st.flops_forward + st.flops_backward + st.flops_recompute
    need = settings.mfu * PEAK_FLOPS["h100"]["bf16"] / flops
    return {"seq_len": st.seq_len, "flops_per_sample": flops, "mfu": settings.mfu, "samples_per_s_per_h100": need,
            "workers_per_h100": math.ceil(need / per_worker), "per_worker_samples_per_s": per_worker}


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
    ap.add_argument("--samples", type=int, default=200, help="samples per repetition timed for samples/s per worker")
    ap.add_argument("--reps", type=int, default=4, help="alternating repetitions of the samples/s measurement")
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
               "--workers", str(args.workers), "--stride", str(args.stride)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        key = side if side == "llava" or "ours_cold" in res else "ours_cold"
        res[key] = r
        print(key, json.dumps(r), flush=True)
    res["rates"] = per_worker_rates(out, args.reps, args.samples)
    print("per-worker rates", json.dumps(res["rates"]), flush=True)
    res["tokenize"] = tokenize_cost(path, 2000)
    res["clip336_ms"] = clip_cost()
    print(json.dumps({"machine": f"{platform.node()} {os.cpu_count()} CPUs", **res["tokenize"],
                      "clip336_jpeg640_ms": res["clip336_ms"]}))
    # a COCO-sized image costs the measured decode + CLIP-336 transform on top of the tokenising (CPU time)
    per_worker = 1000 / (res["clip336_ms"] + res["tokenize"]["tokenize_cpu_ms_per_sample"])
    feed = h100_workers(round(res["tokenize"]["text_tokens_per_sample"]), per_worker, out)
    print("H100 feed (LLaVA-1.5 stage 2):", json.dumps(feed))

    def growth(r: dict) -> float:
        return max(b - a for a, b in zip(r["worker_uss_start_mib"], r["worker_uss_end_mib"]))

    print("| | imports + tokenizer s | data + first batch s | rank RSS MiB (above imports) | worker USS growth MiB | pass s |")
    print("|---|---|---|---|---|---|")
    for k in ("llava", "ours_cold", "ours"):
        r = res[k]
        print(f"| {k} | {r['import_s']:.1f} | {r['first_batch_s']:.1f} | {r['rss_rank_mib']:.0f} "
              f"({r['rss_rank_mib'] - r['rss_after_imports_mib']:.0f}) | {growth(r):.0f} | {r['pass_s']:.0f} |")
    for k, r in res["rates"].items():
        print(f"{k}: {r['samples_per_s_wall']:.0f} samples/s per worker wall (min {r['min']:.0f}, max {r['max']:.0f}), "
              f"{r['samples_per_s_cpu']:.0f} by CPU time")
    print(f"RATIO first_batch_llava_over_ours={res['llava']['first_batch_s'] / res['ours']['first_batch_s']:.2f} "
          f"worker_growth_mib_llava={growth(res['llava']):.0f} worker_growth_mib_ours={growth(res['ours']):.0f} "
          f"tokenize_ms={res['tokenize']['tokenize_ms_per_sample']:.2f}")


if __name__ == "__main__":
    main()

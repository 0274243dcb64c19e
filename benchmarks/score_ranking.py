"""Fine-grained ranking eval: `VLM.score` (image + prompt prefix run once, its KV cache shared by every class
name) against one full forward per (image, class) — the way lmms-eval and lm-eval score multiple choice.

    .venv/bin/python benchmarks/score_ranking.py            # 100 and 1,000 class names
    .venv/bin/python benchmarks/score_ranking.py --quick    # 100 class names, 1 image

The baseline is given every advantage that keeps its semantics: requests are batched (`--baseline-batch` rows
per forward, right-padded), but each row is its own request — its own image preprocessing, vision-tower pass
and full prefix + continuation forward, as lmms-eval's llava `loglikelihood` does per request. Both sides must
give the same summed log-probs (|Δ| < 1e-4, fp32) and the same top-1 class.
Last line: `RATIO score_speedup@100=<x> score_speedup@1000=<y>`.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

PROMPT = "What type of object is in this photo?"
# A small model with a realistic image-token count (224 px / patch 14 = 256 tokens) and a few-layer LLM.
MODEL = {"encoder": C.clip_vision(64, 2, 2, 224, 14), "connector": {"type": "mlp2x_gelu"},
         "llm": C.llm("llama", 128, 512, 4, 4, 2, None, tie=False)}
_ADJ = ["red", "blue", "green", "yellow", "black", "white", "grey", "brown", "spotted", "striped", "small", "large",
        "northern", "southern", "eastern", "western", "common", "lesser", "greater", "crested", "long-tailed",
        "short-billed", "golden", "silver", "dwarf", "giant", "wild", "mountain", "desert", "forest", "river", "sea",
        "royal", "painted", "pale", "dark", "bright", "hooded", "ringed", "banded"]
_NOUN = ["sparrow", "robin", "finch", "warbler", "tulip", "rose", "daisy", "orchid", "sedan", "pickup truck",
         "coupe", "van", "terrier", "spaniel", "retriever", "tabby cat", "lily", "poppy", "heron", "gull", "owl",
         "hawk", "iris", "lotus", "beetle"]


def class_names(n: int) -> list[str]:
    names = [f"{a} {b}" for b in _NOUN for a in _ADJ]
    if n > len(names):
        raise SystemExit(f"at most {len(names)} class names")
    return names[:n]


def images(n: int, seed: int = 0) -> list[Any]:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (240, 260, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def ours(vlm: Any, ims: list[Any], names: list[str], cont_batch: int) -> list[list[float]]:
    res = vlm.score(ims, [PROMPT] * len(ims), [names] * len(ims), token_budget=cont_batch)
    return [[r.sum_logprob for r in row] for row in res]


@torch.no_grad()
def full_forward(vlm: Any, ims: list[Any], names: list[str], batch: int) -> list[list[float]]:
    """One request per (image, class): prefix + continuation ids, the image re-encoded for every request."""
    prefix = vlm._prompt_ids(PROMPT, 1, True)  # the same prompt ids score() uses (chat template, N' image tokens)
    conts = [vlm._continuation_ids(n) for n in names]
    pad = vlm.tokenizer.pad_token_id if vlm.tokenizer.pad_token_id is not None else 0
    out: list[list[float]] = []
    for im in ims:
        scores: list[float] = []
        for s in range(0, len(conts), batch):
            chunk = conts[s:s + batch]
            width = len(prefix) + max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, c in enumerate(chunk):
                ids[r, :len(prefix) + len(c)] = torch.tensor(prefix + c)
                mask[r, :len(prefix) + len(c)] = 1
            pixels = vlm.preprocess([im] * len(chunk))
            logp = torch.log_softmax(vlm(ids.to(vlm.device), mask.to(vlm.device), pixels=pixels).logits.float(), -1)
            for r, c in enumerate(chunk):
                pos = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(c))
                scores.append(float(logp[r, pos, torch.tensor(c)].sum()))
        out.append(scores)
    return out


def run(vlm: Any, n_classes: int, n_images: int, reps: int, args: argparse.Namespace) -> dict:
    names, ims = class_names(n_classes), images(n_images, seed=n_classes)
    got: dict[str, list[list[float]]] = {}

    def side(name: str, fn: Any) -> Any:
        return lambda: got.__setitem__(name, fn())

    res = C.alternate({"ours: VLM.score (shared prefix)": side("ours", lambda: ours(vlm, ims, names, args.cont_batch)),
                       "one full forward per (image, class)": side("full", lambda: full_forward(vlm, ims, names,
                                                                                               args.baseline_batch))},
                      reps=reps, warmup=0, memory=False)
    a, b = torch.tensor(got["ours"]), torch.tensor(got["full"])
    return {"res": res, "max_abs_diff": float((a - b).abs().max()), "same_top1": bool((a.argmax(1) == b.argmax(1)).all()),
            "pairs": n_classes * n_images}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--images", type=int, nargs="+", default=[1, 1], help="images per class count (same order)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--reps-large", type=int, default=2, help="repetitions for 1,000+ classes (keeps the run short)")
    p.add_argument("--baseline-batch", type=int, default=16)
    p.add_argument("--token-budget", dest="cont_batch", type=int, default=1024, help="VLM.score token_budget (continuation tokens per forward)")
    p.add_argument("--quick", action="store_true", help="100 classes, 1 image, 2 repetitions")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default); see docs/performance.md")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    if args.quick:
        args.classes, args.images, args.reps = [100], [1], 2
    if len(args.images) != len(args.classes):
        args.images = (args.images + [args.images[-1]] * len(args.classes))[:len(args.classes)]
    vlm = C.build(MODEL).eval()
    print("machine:", C.machine())
    print(f"config: vision {MODEL['encoder']['config']} -> {vlm.num_image_tokens} image tokens; llm "
          f"{MODEL['llm']['config']} (vocab {vlm.language_model.config.vocab_size}, builtin:chatml tokenizer); fp32; "
          f"prompt {PROMPT!r} through the chat template ({len(vlm._prompt_ids(PROMPT, 1, True))} prefix tokens)")
    rows, ratios = [], {}
    vlm.score(images(1), [PROMPT], [["warm up"]])
    for n_cls, n_img in zip(args.classes, args.images):
        r = run(vlm, n_cls, n_img, args.reps if n_cls < 1000 else min(args.reps, args.reps_large), args)
        o, f = r["res"]["ours: VLM.score (shared prefix)"], r["res"]["one full forward per (image, class)"]
        ratios[n_cls] = (f["median"] / o["median"], f["cpu_median"] / o["cpu_median"])
        for name, t in r["res"].items():
            rows.append([n_cls, n_img, name, t["median"], t["min"], t["max"], t["cpu_median"], r["pairs"] / t["median"]])
        rows.append([n_cls, n_img, "speedup (wall / CPU)", f"{ratios[n_cls][0]:.1f}x", "", "", f"{ratios[n_cls][1]:.1f}x",
                     f"max |Δ| {r['max_abs_diff']:.1e}, same top-1: {r['same_top1']}"])
        if r["max_abs_diff"] >= 1e-4 or not r["same_top1"]:
            print(f"MISMATCH at {n_cls} classes: max |Δ| {r['max_abs_diff']:.2e}, same top-1 {r['same_top1']}")
    print(C.table(["classes", "images", "side", "median s", "min", "max", "CPU s", "pairs/s"], rows))
    print("goal: >= 10x at 100 classes, |Δ| < 1e-4")
    line = " ".join(f"score_speedup@{k}={v[0]:.1f}x" for k, v in ratios.items())
    cpu = " ".join(f"@{k}={v[1]:.1f}x" for k, v in ratios.items())
    print(f"RATIO {line} (CPU time: {cpu})" if ratios else "RATIO n/a")
    return 0 if all(not math.isnan(v[0]) for v in ratios.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

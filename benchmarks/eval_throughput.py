"""Evaluation throughput: our eval path (`eval.runner.evaluate` on a VQA task: batched generation on the KV cache,
the image prefix shared by the questions on one image) against the loop users run today — an HF `generate` per
item, batch 1, as lmms-eval's llava does it — on the same model (our VLM exported with `export_hf_llava`, loaded as
`LlavaForConditionalGeneration` + `AutoProcessor`) and the same items; both must give the same answers.

Two cases: a TextVQA-layout task, one question per image (`--items`), and a VQAv2-layout task (questions and
annotations JSON, COCO_val2014_<id>.jpg) with VQAv2 val's questions per image, 214,354 / 40,504 = 5.29
(`--vqav2-images` images, 5 or 6 questions each, spread so that the mean is that ratio; questions of an image
consecutive as in the official file — our task groups them by image whatever the order).

    .venv/bin/python benchmarks/eval_throughput.py                      # cpu-small model, 24 items / 6 images, batch 12
    .venv/bin/python benchmarks/eval_throughput.py --quick              # tiny model, 16 items / 8 images
    .venv/bin/python benchmarks/eval_throughput.py --lm-eval            # also: the lm-eval adapter, s/document

Both sides read the items' JPEGs from disk and render the prompt through the same chat template (the HF side with
`processor.apply_chat_template` and list-of-parts messages, as lmms-eval's llava_hf does); greedy decoding,
`--max-new-tokens` (the VQA tasks' default, 16). Models have random weights (no hub), so answers rarely stop at EOS
before the limit: the decode share is that of long answers.

`--lm-eval` times the `vlm_ablate` adapter on text-only lm-eval requests (a 4-way multiple-choice document: 4
loglikelihood requests; a generation document: generate_until with `until: ["\\n\\n", "Question:"]`) against
lm-eval's own `hf` model on the same LLM, and, with `--old-adapter REV`, the adapter as it was at git revision REV.
Last line: `RATIO eval_items_per_s_ours_over_hf=<x> vqav2_items_per_s_ours_over_hf=<y> [lm_eval_s_per_doc_...]`
(a case given 0 items / images is skipped).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

QUESTIONS = ["What colour is the object?", "How many stripes are there?", "Is it daytime?", "What is on the left?",
             "What animal is this?", "Which side is brighter?", "What is the man holding?", "Where is the cup?"]
# --quick: a tiny CLIP tower and a 4-layer Llama (seconds); default: the benchmarks' cpu-small model (a CLIP tower of
# DINOv2-S size, 224 px / patch 14 = 256 image tokens, and a SmolLM2-135M-sized Llama)
QUICK = {"encoder": C.clip_vision(64, 2, 2, 112, 14), "connector": {"type": "mlp2x_gelu"},
         "llm": C.llm("llama", 128, 512, 4, 4, 2, None, tie=False)}


# VQAv2 val: 214,354 questions on 40,504 images
VQAV2_QUESTIONS_PER_IMAGE = 214354 / 40504


def write_image(path: Path, i: int, rng: Any) -> None:
    """A smooth photo-like image, landscape or square, whose size resizes to whole pixels under both sides'
    rounding (224 px short edge; widths 224, 280, 336)."""
    import numpy as np
    from PIL import Image

    h, w = 224, (224, 280, 336)[i % 3]
    yy, xx = np.mgrid[0:h, 0:w]
    a, b, c = rng.uniform(0.2, 1.5, 3)
    img = np.stack([xx * a, yy * b, (xx + yy) * c / 2], -1) % 256
    Image.fromarray(img.astype(np.uint8)).save(path, quality=95)


def textvqa_case(root: Path, n: int, max_new: int, seed: int = 0) -> tuple[dict, list[tuple[Path, str]]]:
    """`n` TextVQA-layout items (val.json + <image_id>.jpg), one question per image: (task, [(image, question)])."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        write_image(root / f"{i}.jpg", i, rng)
        rows.append({"question_id": i, "image_id": str(i), "answers": ["yes"] * 10,
                     "question": QUESTIONS[i % len(QUESTIONS)] + " Look closely." * (i % 3)})
    (root / "val.json").write_text(json.dumps({"data": rows}))
    task = {"type": "textvqa", "name": "tv", "data_file": str(root / "val.json"), "max_new_tokens": max_new}
    return task, [(root / f"{r['image_id']}.jpg", r["question"]) for r in rows]


def vqav2_case(root: Path, n_images: int, max_new: int, seed: int = 1) -> tuple[dict, list[tuple[Path, str]]]:
    """A VQAv2-layout task on `n_images` images: image i gets floor((i+1)r) - floor(ir) questions, r = VQAv2 val's
    questions per image (5 or 6 each, mean r), consecutive per image."""
    import numpy as np

    rng = np.random.default_rng(seed)
    questions, annotations, pairs = [], [], []
    for i in range(n_images):
        image = root / f"COCO_val2014_{i:012d}.jpg"
        write_image(image, i, rng)
        for k in range(int((i + 1) * VQAV2_QUESTIONS_PER_IMAGE) - int(i * VQAV2_QUESTIONS_PER_IMAGE)):
            qid = i * 1000 + k
            text = QUESTIONS[(i + 3 * k) % len(QUESTIONS)] + " Look closely." * (k % 3)
            questions.append({"question_id": qid, "image_id": i, "question": text})
            annotations.append({"question_id": qid, "answer_type": "other", "answers": [{"answer": "yes"}] * 10})
            pairs.append((image, text))
    (root / "questions.json").write_text(json.dumps({"questions": questions}))
    (root / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    task = {"type": "vqav2", "name": "vqav2", "questions_file": str(root / "questions.json"),
            "annotations_file": str(root / "annotations.json"), "max_new_tokens": max_new}
    return task, pairs


def ours(vlm: Any, task: dict, out: Path, batch: int) -> list[str]:
    from eval.runner import evaluate
    from vlm.io import read_jsonl

    evaluate(vlm, [task], out, batch_size=batch, overwrite=True)
    return [r["prediction"] for r in read_jsonl(out / "eval" / task["name"] / "predictions.jsonl")]


def hf_per_item(hf: Any, proc: Any, pairs: list[tuple[Path, str]], max_new: int) -> list[str]:
    """lmms-eval's llava loop: one item at a time through the processor's chat template and `generate`."""
    from PIL import Image

    answers = []
    for path, question in pairs:
        image = Image.open(path).convert("RGB")
        text = f"{question}\nAnswer the question using a single word or phrase."
        msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        inputs = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt").to(hf.device)
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=max_new, do_sample=False, use_cache=True)
        answers.append(proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def throughput(args: argparse.Namespace, vlm: Any, hf: Any, proc: Any, name: str, task: dict,
               pairs: list[tuple[Path, str]], tmp: Path) -> float:
    """Both sides on one case, alternating; prints its table and returns HF time / our time."""
    got: dict[str, list[str]] = {}
    sides = {"ours (vlm eval path)": lambda: got.__setitem__("ours", ours(vlm, task, tmp / "out", args.batch)),
             "HF generate per item": lambda: got.__setitem__("hf", hf_per_item(hf, proc, pairs, args.max_new_tokens))}
    res = C.alternate(sides, reps=args.reps, warmup=0, device=args.device, memory=False)
    n, images = len(pairs), len({p for p, _ in pairs})
    same = sum(a == b for a, b in zip(got["ours"], got["hf"]))
    print(f"\n{name}: {n} items on {images} images ({n / images:.2f} per image), batch {args.batch}, max_new_tokens "
          f"{args.max_new_tokens}, image tokens {vlm.num_image_tokens}; identical answers: {same}/{n}")
    print("| side | median s | min | max | CPU s | items/s |\n|---|---|---|---|---|---|")
    for side, r in res.items():
        print(f"| {side} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | {r['cpu_median']:.2f} | "
              f"{n / r['median']:.3f} |")
    if same != n:
        bad = [(a, b) for a, b in zip(got["ours"], got["hf"]) if a != b][:3]
        raise SystemExit(f"{name}: answers differ: {bad}")
    return res["HF generate per item"]["median"] / res["ours (vlm eval path)"]["median"]


def throughputs(args: argparse.Namespace, vlm: Any, tmp: Path) -> dict[str, float]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm.model.hf_llava import export_hf_llava

    export = export_hf_llava(vlm, tmp / "hf")
    # the PIL backend resizes as our encoders do (the torchvision one antialiases tensors and differs slightly)
    proc = AutoProcessor.from_pretrained(export, backend="pil")
    hf = LlavaForConditionalGeneration.from_pretrained(export, attn_implementation="sdpa").eval().to(args.device)
    cases = {"eval": (textvqa_case, args.items, "TextVQA layout, 1 question per image"),
             "vqav2": (vqav2_case, args.vqav2_images, "VQAv2 layout, VQAv2 val's questions per image")}
    ratios = {}
    for key, (make, n, title) in cases.items():
        if n:
            (tmp / key).mkdir()
            task, pairs = make(tmp / key, n, args.max_new_tokens)
            ratios[key] = throughput(args, vlm, hf, proc, title, task, pairs, tmp / key)
    return ratios


# --------------------------------------------------------------------------- lm-eval adapter
def _load_adapter(rev: str | None) -> Any:
    """The adapter class (the current one, or its source at git revision `rev`, loaded without re-registering)."""
    if rev is None:
        from eval.lm_eval_adapter import VLMAblateLM

        return VLMAblateLM
    import lm_eval.api.registry as registry

    src = subprocess.run(["git", "show", f"{rev}:eval/lm_eval_adapter.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType("old_lm_eval_adapter")
    keep = registry.register_model
    registry.register_model = lambda *names: (lambda cls: cls)
    try:
        exec(compile(src, f"{rev}:eval/lm_eval_adapter.py", "exec"), mod.__dict__)
    finally:
        registry.register_model = keep
    return mod.VLMAblateLM


def lm_eval_docs(n: int) -> tuple[list[list[Any]], list[list[Any]]]:
    from lm_eval.api.instance import Instance

    def req(kind: str, *args: Any) -> Any:
        return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)

    mc, gen = [], []
    for i in range(n):
        q = f"Question: {QUESTIONS[i % len(QUESTIONS)]} (case {i})\nAnswer:"
        mc.append([req("loglikelihood", q, f" {c}") for c in ("red", "blue", "a green one", "none of them")])
        gen.append([req("generate_until", f"Question: what is {i} + {i + 7}?\nAnswer:",
                        {"until": ["\n\n", "Question:"], "max_gen_toks": 32, "do_sample": False})])
    return mc, gen


def lm_eval_times(args: argparse.Namespace, vlm: Any) -> dict[str, float]:
    from lm_eval.models.huggingface import HFLM

    mc, gen = lm_eval_docs(args.docs)
    flat = lambda docs: [r for d in docs for r in d]  # noqa: E731
    models = {"now": _load_adapter(None)(model=vlm, batch_size=args.batch),
              "hf": HFLM(pretrained=vlm.language_model, tokenizer=vlm.tokenizer, batch_size=args.batch,
                                 max_length=2048)}
    if args.old_adapter:
        models[f"old@{args.old_adapter}"] = _load_adapter(args.old_adapter)(model=vlm, batch_size=args.batch)
    out: dict[str, float] = {}
    results: dict[str, tuple] = {}
    print(f"\nlm-eval: {args.docs} multiple-choice documents (4 choices), {args.docs} generation documents "
          f"(max_gen_toks 32, until \\n\\n / Question:), batch {args.batch}")
    print("| model (now: vlm_ablate; hf: lm-eval's hf; old@REV: vlm_ablate at REV) | s/doc multiple choice | "
          "s/doc generation |\n|---|---|---|")
    for name, lm in models.items():
        t0 = time.perf_counter()
        ll = lm.loglikelihood(flat(mc), disable_tqdm=True)
        t1 = time.perf_counter()
        g = lm.generate_until(flat(gen), disable_tqdm=True)
        t2 = time.perf_counter()
        results[name] = (ll, g)
        out[name] = ((t1 - t0) / args.docs, (t2 - t1) / args.docs)
        print(f"| {name} | {out[name][0]:.3f} | {out[name][1]:.3f} |")
    now, ref = results["now"], results["hf"]
    print(f"now vs hf: generations identical {sum(a == b for a, b in zip(now[1], ref[1]))}/{len(ref[1])}, "
          f"is_greedy identical {sum(a[1] == b[1] for a, b in zip(now[0], ref[0]))}/{len(ref[0])}, "
          f"max |Δ loglik| {max(abs(a[0] - b[0]) for a, b in zip(now[0], ref[0])):.2e}")
    return {f"{k}_{kind}": v[i] for k, v in out.items() for i, kind in enumerate(("mc", "gen"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--items", type=int, default=24, help="TextVQA-layout items (one per image); 0 skips the case")
    ap.add_argument("--vqav2-images", type=int, help="images of the VQAv2-layout case (default 6, --quick 8; 0 skips it)")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides, fp32)")
    ap.add_argument("--lm-eval", action="store_true")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--old-adapter", help="git revision whose eval/lm_eval_adapter.py to time as well")
    args = ap.parse_args()
    if args.quick:
        args.items = min(args.items, 16)
    if args.vqav2_images is None:
        args.vqav2_images = 8 if args.quick else 6
    C.set_threads(args.threads)
    print("machine:", C.machine(), "load average:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    vlm = C.build(QUICK if args.quick else C.MODELS["cpu-small"], seed=0).eval().to(args.device)
    with tempfile.TemporaryDirectory() as d:
        ratios = throughputs(args, vlm, Path(d))
    line = "RATIO " + " ".join(f"{k}_items_per_s_ours_over_hf={v:.2f}" for k, v in ratios.items())
    if args.lm_eval:
        t = lm_eval_times(args, vlm)
        line += " " + " ".join(f"lm_eval_s_per_doc_{k}={v:.3f}" for k, v in t.items())
    print(line)


if __name__ == "__main__":
    main()

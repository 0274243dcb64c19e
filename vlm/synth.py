"""`vlm data synth`: the procedural synthetic fine-grained world (see docs/synthetic_world.md).

    from vlm.synth import generate_world
    manifest = generate_world("data/world", seed=0, preset="demo")

Same seed and settings → byte-identical files. The world is generated into a hidden staging dir next to
`out_dir` and renamed into place when complete, so a crash never leaves a half-written world behind; running
again with the same settings on a complete world is a no-op.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from vlm.errors import UserError
from vlm.synth_render import FAMILIES, render_scene
from vlm.synth_sets import (
    CAPTION_PROMPTS, SPEC_SUBSETS, VQA_SUFFIX, build_classes, caption_record, classification_scene,
    coarse_caption, dense_caption, rng_for, spec_case, vqa_questions, vqa_scene,
)

GENERATOR_VERSION = "1"
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(families=2, classes_per_family=2, train_per_class=2, test_per_class=1, image_size=48,
                 vqa_train=4, vqa_eval=4, spec_cases=2, spec_max_count=3),
    "quick": dict(families=4, classes_per_family=4, train_per_class=24, test_per_class=8, image_size=96,
                  vqa_train=200, vqa_eval=100, spec_cases=12, spec_max_count=4),
    "demo": dict(families=4, classes_per_family=8, train_per_class=30, test_per_class=10, image_size=112,
                 vqa_train=400, vqa_eval=150, spec_cases=24, spec_max_count=5),
}
LIMITS = {  # inclusive bounds of every setting
    "families": (1, len(FAMILIES)), "classes_per_family": (1, 16), "train_per_class": (1, 100_000),
    "test_per_class": (1, 100_000), "image_size": (32, 1024), "vqa_train": (0, 1_000_000), "vqa_eval": (0, 1_000_000),
    "spec_cases": (0, 100_000), "spec_max_count": (2, 9),
}
VQA_OBJECTS = (2, 5)
VQA_QUESTIONS_PER_IMAGE = 3


def resolve_config(preset: str = "demo", **overrides: Any) -> dict[str, Any]:
    """The preset's settings with non-None overrides applied, validated."""
    if preset not in PRESETS:
        raise UserError(f"unknown synthetic-world preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    cfg = dict(PRESETS[preset])
    for key, value in overrides.items():
        if key not in LIMITS:
            raise UserError(f"unknown synthetic-world setting {key!r}; known settings: {', '.join(LIMITS)}.")
        if value is not None:
            cfg[key] = value
    for key, (lo, hi) in LIMITS.items():
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise UserError(f"synthetic-world setting {key}={v!r} is out of range; it must be an integer in [{lo}, {hi}].")
    if cfg["families"] < 2 and cfg["spec_cases"]:
        raise UserError("the SPEC-style set needs at least 2 object families (relative position/size pair two "
                        "families); set families >= 2 or spec_cases=0.")
    return cfg


class _Writer:
    """Writes files under a root and records each file's sha256 (paths use '/')."""

    def __init__(self, root: Path):
        self.root, self.files = root, {}

    def bytes(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files[rel] = hashlib.sha256(data).hexdigest()

    def json(self, rel: str, obj: Any) -> None:
        self.bytes(rel, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))

    def jsonl(self, rel: str, rows: list[dict]) -> None:
        self.bytes(rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))

    def image(self, rel: str, scene: dict) -> None:
        buf = io.BytesIO()
        render_scene(scene).save(buf, format="PNG", compress_level=6)
        self.bytes(rel, buf.getvalue())

    def digest(self, prefix: str | tuple[str, ...] = "") -> str:
        h = hashlib.sha256()
        for rel in sorted(r for r in self.files if r.startswith(prefix)):
            h.update(f"{rel}\0{self.files[rel]}\n".encode())
        return h.hexdigest()


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="synth images", unit="img", disable=not enabled, leave=False)


def _generate(w: _Writer, seed: int, cfg: dict[str, Any], progress: bool) -> dict[str, Any]:
    S = cfg["image_size"]
    classes = build_classes(cfg["families"], cfg["classes_per_family"])
    families = sorted({c["family"] for c in classes}, key=list(FAMILIES).index)
    n_spec = cfg["spec_cases"] * (3 + 3 + 9 + 4 + 2 + cfg["spec_max_count"])
    n_cls = len(classes) * (cfg["train_per_class"] + cfg["test_per_class"])
    bar = _progress(n_cls + cfg["vqa_train"] + cfg["vqa_eval"] + n_spec, progress)
    scenes: list[dict] = []
    sets: dict[str, dict] = {}

    def image(rel: str, scene: dict, meta: dict) -> None:
        w.image(rel, scene)
        scenes.append({"image": rel, "set": meta.pop("set"), "meta": meta, "scene": scene})
        bar.update()

    # 1. fine-grained classification (+ 2. the captions of its training images)
    w.json("classification/classes.json", classes)
    coarse, dense = [], []
    for split in ("train", "test"):
        per = cfg[f"{split}_per_class"]
        order = [(c, i) for i in range(per) for c in range(len(classes))]
        rng_for(seed, "order", split).shuffle(order)
        rows = []
        for n, (c, i) in enumerate(order):
            rng = rng_for(seed, "cls", split, c, i)
            scene = classification_scene(classes[c], rng, S)
            rel = f"images/{split}_{n:05d}.png"
            image(f"classification/{rel}", scene, {"set": f"classification_{split}", "label": classes[c]["name"]})
            rows.append({"image": rel, "label": classes[c]["name"]})
            if split == "train":
                prompt = rng.choice(CAPTION_PROMPTS)
                sid = f"synth_cap_{n:05d}"
                coarse.append(caption_record(sid, f"classification/{rel}", prompt, coarse_caption(scene, rng)))
                dense.append(caption_record(sid, f"classification/{rel}", prompt, dense_caption(scene, rng)))
        w.jsonl(f"classification/{split}.jsonl", rows)
        sets[f"classification_{split}"] = {"file": f"classification/{split}.jsonl", "count": len(rows), "per_class": per}
    sets["classification_classes"] = {"file": "classification/classes.json", "count": len(classes)}
    w.json("captions_coarse.json", coarse)
    w.json("captions_dense.json", dense)
    sets["captions_coarse"] = {"file": "captions_coarse.json", "count": len(coarse)}
    sets["captions_dense"] = {"file": "captions_dense.json", "count": len(dense)}

    # 3. general VQA on multi-object scenes
    train = []
    for n in range(cfg["vqa_train"]):
        rng = rng_for(seed, "vqa_train", n)
        scene = vqa_scene(rng, S, families, VQA_OBJECTS)
        qs = vqa_questions(scene, rng, families, VQA_QUESTIONS_PER_IMAGE)
        rel = f"vqa_train/images/{n:05d}.png"
        image(rel, scene, {"set": "vqa_train", "questions": qs})
        conv = []
        for j, q in enumerate(qs):
            conv.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + f"{q['question']}\n{VQA_SUFFIX}"})
            conv.append({"from": "gpt", "value": q["answer"]})
        train.append({"id": f"synth_vqa_{n:05d}", "image": rel, "conversations": conv})
    w.json("vqa_train.json", train)
    sets["vqa_train"] = {"file": "vqa_train.json", "count": len(train), "questions": sum(len(t["conversations"]) // 2 for t in train)}

    questions, annotations, image_files = [], [], {}
    for n in range(cfg["vqa_eval"]):
        rng = rng_for(seed, "vqa_eval", n)
        image_id = n + 1
        scene = vqa_scene(rng, S, families, VQA_OBJECTS)
        qs = vqa_questions(scene, rng, families, VQA_QUESTIONS_PER_IMAGE)
        image_files[str(image_id)] = f"images/{image_id}.png"
        image(f"vqa_eval/images/{image_id}.png", scene, {"set": "vqa_eval", "image_id": image_id, "questions": qs})
        for j, q in enumerate(qs):
            qid = image_id * 1000 + j
            questions.append({"question_id": qid, "image_id": image_id, "question": q["question"]})
            annotations.append({
                "question_id": qid, "image_id": image_id, "question_type": q["question_type"],
                "answer_type": q["answer_type"], "multiple_choice_answer": q["answer"],
                "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)],
            })
    info = {"description": "vlm-ablate synthetic world, general VQA", "data_type": "synth", "data_subtype": "eval"}
    w.json("vqa_eval/questions.json", {**info, "questions": questions})
    w.json("vqa_eval/annotations.json", {**info, "annotations": annotations})
    w.json("vqa_eval/images.json", image_files)
    sets["vqa_eval"] = {"file": "vqa_eval/questions.json", "count": len(image_files), "questions": len(questions)}

    # 4. SPEC-style matching
    for subset in SPEC_SUBSETS if cfg["spec_cases"] else ():
        i2t, t2i = [], []
        for case in range(cfg["spec_cases"]):
            rng = rng_for(seed, "spec", subset, case)
            case_scenes, texts, values = spec_case(subset, rng, classes, S, cfg["spec_max_count"])
            paths = [f"images/{case:04d}_{k}.png" for k in range(len(texts))]
            for k, (p, sc) in enumerate(zip(paths, case_scenes)):
                image(f"spec/{subset}/{p}", sc, {"set": f"spec_{subset}", "case": case, "k": k, "value": values[k], "text": texts[k]})
            perm = list(range(len(texts)))
            rng.shuffle(perm)
            for k in range(len(texts)):
                i2t.append({"query": paths[k], "keys": [texts[j] for j in perm], "label": perm.index(k)})
                t2i.append({"query": texts[k], "keys": [paths[j] for j in perm], "label": perm.index(k)})
        w.json(f"spec/{subset}/image2text.json", i2t)
        w.json(f"spec/{subset}/text2image.json", t2i)
        sets[f"spec_{subset}"] = {"file": f"spec/{subset}/image2text.json", "cases": cfg["spec_cases"],
                                  "k": len(i2t) // cfg["spec_cases"], "count": len(i2t)}
    bar.close()
    w.jsonl("scenes.jsonl", scenes)

    prefixes = {"classification_train": "classification/", "classification_test": "classification/",
                "classification_classes": "classification/", "captions_coarse": ("captions_coarse", "classification/images/train_"),
                "captions_dense": ("captions_dense", "classification/images/train_"), "vqa_train": "vqa_train",
                "vqa_eval": "vqa_eval/"}
    for name, info in sets.items():
        info["sha256"] = w.digest(prefixes.get(name, f"spec/{name[5:]}/"))
    return {
        "generator": "vlm.synth", "version": GENERATOR_VERSION, "seed": seed, "config": cfg,
        "families": families, "classes": classes, "sets": sets,
        "files": dict(sorted(w.files.items())), "sha256": w.digest(),
    }


def _is_complete(out: Path, seed: int, preset: str, cfg: dict) -> dict | None:
    """The manifest of an intact world at `out` generated with these settings, else None."""
    try:
        m = json.loads((out / "world.json").read_text(encoding="utf-8"))
        if (m.get("version"), m.get("seed"), m.get("preset"), m.get("config")) != (GENERATOR_VERSION, seed, preset, cfg):
            return None
        for rel, digest in m["files"].items():
            if hashlib.sha256((out / rel).read_bytes()).hexdigest() != digest:
                return None
        return m
    except (OSError, ValueError, KeyError, TypeError):
        return None


def generate_world(out_dir: str | os.PathLike, *, seed: int = 0, preset: str = "demo", force: bool = False,
                   progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Generate the world into `out_dir` and return its manifest (also written to `out_dir/world.json`).

    `settings` override the preset (`families`, `classes_per_family`, `train_per_class`, `test_per_class`,
    `image_size`, `vqa_train`, `vqa_eval`, `spec_cases`, `spec_max_count`). An existing complete world with the
    same settings is kept as is; a different or damaged one is replaced only with `force=True` (which always
    regenerates).
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"the synthetic-world seed must be an integer, got {seed!r}.")
    cfg = resolve_config(preset, **settings)
    out = Path(out_dir)
    done = None if force else _is_complete(out, seed, preset, cfg)
    if done is not None:
        return done
    if out.exists() and any(out.iterdir()):
        if not (out / "world.json").exists():
            raise UserError(f"{out} exists and is not a synthetic world (no world.json); choose an empty or new --out.")
        if not force:
            raise UserError(f"{out} holds a synthetic world with other settings (or a damaged one); pass --force to "
                            "replace it, or choose another --out.")
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        w = _Writer(stage)
        manifest = _generate(w, seed, cfg, progress)
        manifest["preset"] = preset
        (stage / "world.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def load_scenes(world_dir: str | os.PathLike) -> dict[str, dict]:
    """Every image of a world (path relative to the world dir) → its record: `set`, `meta`, `scene`."""
    out = {}
    with open(Path(world_dir) / "scenes.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            out[rec["image"]] = rec
    return out


# ------------------------------------------------------------------------------------------ CLI

def configure_data(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_cmd", required=True, metavar="{synth}")
    p = sub.add_parser("synth", help="generate the synthetic fine-grained world",
                       description="Generate the synthetic fine-grained world (classification, captions, VQA, "
                                   "SPEC-style sets). Same seed and settings give byte-identical files.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=list(PRESETS), default="demo", help="size preset (default: demo)")
    for key in LIMITS:
        lo, hi = LIMITS[key]
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None,
                       help=f"override the preset ({lo}..{hi})")
    p.add_argument("--force", action="store_true", help="regenerate, replacing an existing world (even one with other settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_data(args: argparse.Namespace) -> int:
    t0 = time.time()
    settings = {k: getattr(args, k) for k in LIMITS}
    m = generate_world(args.out, seed=args.seed, preset=args.preset, force=args.force, progress=not args.quiet, **settings)
    sets = m["sets"]
    print(f"synthetic world in {args.out} (seed {m['seed']}, preset {m['preset']}, {len(m['classes'])} classes, "
          f"{len(m['files'])} files, {time.time() - t0:.1f}s)")
    for name, info in sets.items():
        extra = f", {info['questions']} questions" if "questions" in info else ""
        print(f"  {name:32s} {info['count']:6d}{extra}  {info['file']}")
    return 0

"""General VQA tasks: VQAv2, TextVQA, GQA, POPE, MME (short answers, greedy generation) and the
multiple-choice MMBench (circular) and ScienceQA-IMG. Data from an HF dataset (`hf`, `config`,
`split`) or the benchmark's own local files (see docs/eval_tasks.md for each layout)."""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Hashable, Optional

from eval.base import TASKS, Task
from eval.data import B64Image, HFImage, hf_rows, load_hf, open_image, read_records
from eval.metrics import (ANSWER_PARSERS, LETTERS, VQA_NORMALIZE_MODES, ItemScore, by_metric, circular_accuracy,
                          extract_choice, gqa_exact_match, letter_probabilities, mme_metrics, mme_parse,
                          pope_item_scores, pope_metrics, pope_parse, ratio_of_sums, vqa_accuracy)
from vlm.config import Positive
from vlm.errors import UserError

SHORT = "<image>\n{question}\nAnswer the question using a single word or phrase."
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."


def image_ref_key(ref: Any) -> Hashable | None:
    """A key equal for references to the same image: a file path, a dataset cell, inline base64 (a list: the tuple
    of its keys); None where the reference says nothing (raw bytes, an image object)."""
    if isinstance(ref, (list, tuple)):
        keys = tuple(image_ref_key(r) for r in ref)
        return None if None in keys else keys
    if isinstance(ref, (str, Path)):
        return ("path", str(ref))
    if isinstance(ref, HFImage):
        return ("hf", id(ref.ds), ref.index, ref.column)
    if isinstance(ref, B64Image):
        return ("b64", ref.data)
    return None


def open_shared(refs: list[Any], root: Path | None) -> list[Any]:
    """`open_image` of each reference, where equal images come back as one object: a reference is opened once, and
    images with equal pixels (hub rows that each carry a copy of an image) are merged. `VLM.generate` computes the
    prompt prefix of an image object once for all the questions on it."""
    opened: dict[Hashable, Any] = {}
    by_pixels: dict[tuple, Any] = {}

    def one(ref: Any) -> Any:
        key = image_ref_key(ref)
        if key is None or key not in opened:
            image = open_image(ref, root)
            digest = (image.mode, image.size, hashlib.blake2b(image.tobytes(), digest_size=16).digest())
            image = by_pixels.setdefault(digest, image)
            if key is not None:
                opened[key] = image
            return image
        return opened[key]

    return [None if r is None else [one(x) for x in r] if isinstance(r, (list, tuple)) else one(r) for r in refs]


def _need(cfg: dict, *keys: str) -> None:
    if not any(cfg.get(k) for k in keys):
        raise UserError(f"task {cfg.get('name')!r} ({cfg.get('type')}) needs one of {list(keys)} as its data source.")


class ShortAnswerTask(Task):
    """Greedy generation of a short answer per item; subclasses load rows and score records."""
    options = {"prompt": str, "max_new_tokens": Positive, "image_root": Optional[str], "hf": Optional[str], "split": str,
               "config": Optional[str]}

    family = "general"
    default_prompt = SHORT
    default_split = "validation"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.prompt = cfg.get("prompt", self.default_prompt)
        self.max_new_tokens = int(cfg.get("max_new_tokens", 16))
        self.root: Path | None = Path(cfg["image_root"]) if cfg.get("image_root") else None

    def _hf(self, image_column: str = "image") -> list[dict]:
        ds = load_hf(self.cfg["hf"], self.cfg.get("split", self.default_split), self.cfg.get("config"))
        return hf_rows(ds, [image_column] if image_column in ds.column_names else [])

    def group_key(self, item: dict) -> Hashable | None:
        return image_ref_key(item["image"])

    def predict(self, model: Any, batch: list[dict]) -> list[dict]:
        images = open_shared([it["image"] for it in batch], self.root)
        prompts = [self.prompt.format(question=it["question"]) for it in batch]
        outs = model.generate(images, prompts, chat_template=self.chat_template, max_new_tokens=self.max_new_tokens)
        return [self.record(it, out) for it, out in zip(batch, outs)]

    def record(self, item: dict, output: str) -> dict:
        return {k: v for k, v in item.items() if k != "image"} | {"prediction": output}


@TASKS.register("vqav2", "textvqa")
class VQATask(ShortAnswerTask):
    """VQA accuracy. `normalize`: `official` (VQAv2's vqaEval.py, the vqav2 default), `textvqa` (TextVQA's
    evaluator, always normalising both sides; the textvqa default) or `always` (lmms-eval's VQAv2)."""
    options = {"normalize": str, "questions_file": Optional[str], "annotations_file": Optional[str],
               "data_file": Optional[str], "image_template": str}

    headline = "acc"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.normalize = cfg.get("normalize", "textvqa" if cfg.get("type") == "textvqa" else "official")
        if self.normalize not in VQA_NORMALIZE_MODES:
            raise UserError(f"task {self.name!r}: normalize must be one of {list(VQA_NORMALIZE_MODES)}, "
                            f"got {self.normalize!r}.")

    def items(self) -> list[dict]:
        _need(self.cfg, "hf", "questions_file", "data_file")
        if self.cfg.get("hf"):
            rows = self._hf()
        elif self.cfg["type"] == "vqav2":
            rows = self._vqav2_local()
        else:  # TextVQA_0.5.1_val.json: {"data": [{question_id, question, image_id, answers}]}
            data = json.loads(Path(self.cfg["data_file"]).read_text())["data"]
            self.root = self.root or Path(self.cfg["data_file"]).parent
            rows = [{**d, "image": f"{d['image_id']}.jpg"} for d in data]
        out = []
        for r in rows:
            answers = [a["answer"] if isinstance(a, dict) else a for a in r["answers"]]
            out.append({"id": str(r["question_id"]), "question": r["question"], "image": r["image"], "answers": answers,
                        "answer_type": r.get("answer_type", "all")})
        return out

    def _vqav2_local(self) -> list[dict]:
        _need(self.cfg, "questions_file")
        qs = json.loads(Path(self.cfg["questions_file"]).read_text())["questions"]
        anns = {a["question_id"]: a for a in json.loads(Path(self.cfg["annotations_file"]).read_text())["annotations"]}
        tmpl = self.cfg.get("image_template", "COCO_val2014_{image_id:012d}.jpg")
        self.root = self.root or Path(self.cfg["questions_file"]).parent
        return [{**q, "answers": anns[q["question_id"]]["answers"], "answer_type": anns[q["question_id"]]["answer_type"],
                 "image": tmpl.format(image_id=q["image_id"])} for q in qs]

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        """`acc`, and with several answer types `acc/<type>` (each item counts in its own type only)."""
        types = sorted({r["answer_type"] for r in records})
        per: dict[str, dict[str, ItemScore]] = {}
        for r in records:
            acc = vqa_accuracy(r["prediction"], r["answers"], self.normalize)
            per[str(r["id"])] = {"acc": acc} | ({f"acc/{t}": [acc if r["answer_type"] == t else 0.0,
                                                              float(r["answer_type"] == t)] for t in types}
                                                if len(types) > 1 else {})
        return by_metric(per)

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return {m: ratio_of_sums(v) for m, v in self.item_scores(records).items()}


@TASKS.register("gqa")
class GQATask(ShortAnswerTask):
    """GQA exact match after `gqa_normalize`. Local: the official questions JSON (qid → {imageId,
    question, answer}) and `image_root/<imageId>.jpg`."""
    options = {"data_file": Optional[str], "images_config": Optional[str]}

    headline = "acc"
    default_split = "testdev"

    def items(self) -> list[dict]:
        _need(self.cfg, "hf", "data_file")
        if self.cfg.get("hf"):
            rows = self._hf()
            if self.cfg.get("images_config"):  # lmms-lab/GQA keeps images in a config of their own
                ims = load_hf(self.cfg["hf"], self.cfg.get("split", self.default_split), self.cfg["images_config"])
                by_id = {r["id"]: r["image"] for r in hf_rows(ims, ["image"])}
                rows = [{**r, "image": by_id[r["imageId"]]} for r in rows]
        else:
            self.root = self.root or Path(self.cfg["data_file"]).parent
            rows = [{**r, "image": f"{r['imageId']}.jpg"} for r in read_records(self.cfg["data_file"])]
        return [{"id": str(r["id"]), "question": r["question"], "image": r["image"], "answer": r["answer"]} for r in rows]

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        return {"acc": {str(r["id"]): gqa_exact_match(r["prediction"], r["answer"]) for r in records}}

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return {m: ratio_of_sums(v) for m, v in self.item_scores(records).items()}


@TASKS.register("pope")
class POPETask(ShortAnswerTask):
    """POPE: yes/no parsed with POPE's rule; acc, precision, recall, F1, yes-ratio per category (as LLaVA's
    eval_pope reports them), their mean over categories (`<metric>_category_mean`) and pooled over all
    items (the headline `f1`). Hub (lmms-lab/POPE): `id` is the global id (`question_id` restarts in each
    category). Local: `data_files: {category: pope jsonl}` with lines {question_id, image, text, label}."""
    options = {"data_files": Any}

    headline = "f1"
    default_split = "test"

    def items(self) -> list[dict]:
        _need(self.cfg, "hf", "data_files")
        if self.cfg.get("hf"):
            rows = self._hf()
            if rows and "id" not in rows[0] and "category" in rows[0]:
                raise UserError(f"task {self.name!r}: POPE hub data without a global `id` column; its `question_id` "
                                "restarts in each category. Use lmms-lab/POPE or local `data_files`.")
            return [{"id": str(r["id"]) if "id" in r else str(r["question_id"]), "question": r["question"],
                     "image": r["image"], "label": r["answer"].strip().lower(), "category": r.get("category", "all")}
                    for r in rows]
        out = []
        self.root = self.root or Path(next(iter(self.cfg["data_files"].values()))).parent
        for cat, path in self.cfg["data_files"].items():
            for r in read_records(path):
                out.append({"id": f"{cat}-{r['question_id']}", "question": r["text"], "image": r["image"],
                            "label": r["label"].strip().lower(), "category": cat})
        return out

    def record(self, item: dict, output: str) -> dict:
        return super().record(item, output) | {"pred": pope_parse(output)}

    def metrics(self, records: list[dict]) -> dict[str, float]:
        out = pope_metrics([r["pred"] for r in records], [r["label"] for r in records])
        cats = sorted({r["category"] for r in records})
        per_cat = {}
        for c in cats:
            rs = [r for r in records if r["category"] == c]
            per_cat[c] = pope_metrics([r["pred"] for r in rs], [r["label"] for r in rs])
            out |= {f"{c}/{k}": v for k, v in per_cat[c].items()}
        for k in list(per_cat[cats[0]]):
            out[f"{k}_category_mean"] = sum(m[k] for m in per_cat.values()) / len(per_cat)
        return out

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        """Pooled acc, precision, recall and F1 (the headline) as item shares (`eval.metrics.pope_item_scores`)."""
        return by_metric({str(r["id"]): pope_item_scores(r) for r in records})


@TASKS.register("mme")
class MMETask(ShortAnswerTask):
    """MME: yes/no per question (MME's parser), acc and acc+ per category, perception/cognition scores.
    Local: the release folder, one subfolder per category holding `<img>.txt` files of
    `question<TAB>answer` lines next to the images (or in `questions_answers_YN/` + `images/`)."""
    options = {"path": Optional[str]}

    headline = "acc"
    default_prompt = "<image>\n{question}"
    default_split = "test"

    def items(self) -> list[dict]:
        _need(self.cfg, "hf", "path")
        if self.cfg.get("hf"):
            return [{"id": f"{r['question_id']}-{i}", "image_key": r["question_id"], "question": r["question"],
                     "image": r["image"], "answer": r["answer"], "category": r["category"]}
                    for i, r in enumerate(self._hf())]
        out = []
        for cat_dir in sorted(p for p in Path(self.cfg["path"]).iterdir() if p.is_dir()):
            qa_dir = cat_dir / "questions_answers_YN" if (cat_dir / "questions_answers_YN").is_dir() else cat_dir
            img_dir = cat_dir / "images" if (cat_dir / "images").is_dir() else cat_dir
            for txt in sorted(qa_dir.glob("*.txt")):
                img = next((p for p in img_dir.glob(txt.stem + ".*") if p.suffix.lower() in (".jpg", ".png", ".jpeg")), None)
                if img is None:
                    raise UserError(f"MME: no image for {txt}.")
                for j, line in enumerate(l for l in txt.read_text(encoding="utf-8").splitlines() if l.strip()):
                    q, a = line.rsplit("\t", 1)
                    out.append({"id": f"{cat_dir.name}/{txt.stem}-{j}", "image_key": f"{cat_dir.name}/{img.name}",
                                "question": q, "image": str(img), "answer": a, "category": cat_dir.name})
        return out

    def record(self, item: dict, output: str) -> dict:
        return super().record(item, output) | {"pred": mme_parse(output)}

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return mme_metrics({**r, "image": r["image_key"]} for r in records)

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        """`acc` per question (the headline); acc+ and the category scores are per image, not item shares."""
        return {"acc": {str(r["id"]): float(r["pred"] == r["answer"].strip().lower()) for r in records}}


class ChoiceTask(Task):
    """Multiple choice by generation + rule-based letter extraction (`mode: generate`, default; the rule is
    `answer_parser`, see eval.metrics.ANSWER_PARSERS) or by the renormalised letter probabilities
    (`mode: likelihood`)."""
    options = {"mode": str, "answer_parser": str, "image_root": Optional[str], "max_new_tokens": Positive,
               "hf": Optional[str], "split": str, "config": Optional[str], "data_file": Optional[str]}

    family = "general"
    default_parser = "vlmevalkit"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.mode = cfg.get("mode", "generate")
        if self.mode not in ("generate", "likelihood"):
            raise UserError(f"task {self.name!r}: mode must be 'generate' or 'likelihood'.")
        self.parser = cfg.get("answer_parser", self.default_parser)
        if self.parser not in ANSWER_PARSERS:
            raise UserError(f"task {self.name!r}: answer_parser must be one of {list(ANSWER_PARSERS)}, "
                            f"got {self.parser!r}.")
        self.root: Path | None = Path(cfg["image_root"]) if cfg.get("image_root") else None

    def prompt(self, item: dict) -> str:
        opts = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(item["options"]))
        hint = f"{item['hint']}\n" if item.get("hint") else ""
        return f"<image>\n{hint}{item['question']}\n{opts}\n{LETTER_SUFFIX}"

    def group_key(self, item: dict) -> Hashable | None:
        return image_ref_key(item["image"])

    def predict(self, model: Any, batch: list[dict]) -> list[dict]:
        images = open_shared([it["image"] for it in batch], self.root)
        prompts = [self.prompt(it) for it in batch]
        recs = [{k: v for k, v in it.items() if k != "image"} for it in batch]
        if self.mode == "generate":
            outs = model.generate(images, prompts, chat_template=self.chat_template,
                                  max_new_tokens=int(self.cfg.get("max_new_tokens", 16)))
            for rec, out in zip(recs, outs):
                rec.update(prediction=out, pred=extract_choice(out, rec["options"], self.parser))
        else:
            scores = model.score(images, prompts, [list(LETTERS[: len(it["options"])]) for it in batch],
                                 chat_template=self.chat_template)
            for rec, sc in zip(recs, scores):
                probs = letter_probabilities([s["sum_logprob"] for s in sc])
                rec.update(probs=probs, pred=LETTERS[probs.index(max(probs))])
        for rec in recs:
            rec["correct"] = rec["pred"] == rec["answer"]
        return recs

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        return by_metric({str(r["id"]): {"acc": float(r["correct"]), "parse_failure": float(r["pred"] is None)}
                          for r in records})

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return {m: ratio_of_sums(v) for m, v in self.item_scores(records).items()}


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v).strip() not in ("", "nan")


@TASKS.register("mmbench")
class MMBenchTask(ChoiceTask):
    """MMBench with CircularEval: every question is asked once per rotation of its options and counts
    only when all rotations are right; answers parsed with VLMEvalKit's rule by default. Local: the
    official TSV (base64 `image` column)."""
    options = {"circular": bool}

    headline = "circular_acc"

    def items(self) -> list[dict]:
        _need(self.cfg, "hf", "data_file")
        if self.cfg.get("hf"):
            ds = load_hf(self.cfg["hf"], self.cfg.get("split", "dev"), self.cfg.get("config", "en"))
            rows = hf_rows(ds, ["image"])
        else:
            rows = read_records(self.cfg["data_file"])
            for r in rows:
                r["image"] = B64Image(r["image"])
        seen, out = set(), []
        circular = bool(self.cfg.get("circular", True))
        for r in rows:
            idx = int(float(r["index"])) % 1_000_000
            if idx in seen:  # the TSV may already hold circular copies (index + k·1e6): we rotate ourselves
                continue
            seen.add(idx)
            opts = [str(r[L]) for L in "ABCDEFGH" if L in r and _present(r[L])]
            gold = opts.index(str(r[r["answer"]]))
            for rot in range(len(opts) if circular else 1):
                rotated = opts[rot:] + opts[:rot]
                out.append({"id": f"{idx}-r{rot}", "group": idx, "question": r["question"],
                            "hint": str(r["hint"]) if _present(r.get("hint")) else "", "options": rotated,
                            "answer": LETTERS[(gold - rot) % len(opts)], "category": r.get("category", ""),
                            "image": r["image"]})
        return out

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return circular_accuracy(records) | {"parse_failure": sum(r["pred"] is None for r in records) / len(records)}

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        """The unit of `circular_acc` is the question (all its rotations right); the other metrics are per rotation."""
        groups: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            groups[str(r["group"])].append(bool(r["correct"]))
        return {"circular_acc": {g: float(all(v)) for g, v in groups.items()}} | by_metric(
            {str(r["id"]): {"vanilla_acc": float(r["correct"]), "parse_failure": float(r["pred"] is None)}
             for r in records})


@TASKS.register("scienceqa")
class ScienceQATask(ChoiceTask):
    """ScienceQA-IMG: the test questions that have an image (hub rows whose image cell is empty are
    dropped); answers parsed with LLaVA's eval_science_qa rule by default. Local: the official
    `problems.json` (pid → {question, choices, answer, hint, image, split}) with images at
    `image_root/<split>/<pid>/`."""

    headline = "acc"
    default_parser = "llava_scienceqa"

    def items(self) -> list[dict]:
        _need(self.cfg, "hf", "data_file")
        split = self.cfg.get("split", "test")
        if self.cfg.get("hf"):
            ds = load_hf(self.cfg["hf"], split, self.cfg.get("config", "ScienceQA-IMG"))
            rows = [dict(r, id=f"{split}-{i}") for i, r in enumerate(hf_rows(ds, ["image"]))]
        else:
            root = Path(self.cfg.get("image_root") or Path(self.cfg["data_file"]).parent / "images")
            rows = [dict(r, image=str(root / split / str(r["id"]) / r["image"]))
                    for r in read_records(self.cfg["data_file"]) if r.get("split") == split and r.get("image")]
        return [{"id": str(r["id"]), "question": r["question"], "hint": r.get("hint") or "",
                 "options": list(r["choices"]), "answer": LETTERS[int(r["answer"])], "image": r["image"]}
                for r in rows if r.get("image") is not None]

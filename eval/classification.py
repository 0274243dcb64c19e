"""Fine-grained image classification as a VLM task (type `classification`).

Data: one adapter for an HF dataset (`hf`, `split`, `image_column`, `label_column`; class names from
the ClassLabel feature, `classes_file` or a shipped list `classnames: <name>` from eval/classnames/) or a
local folder (`path`: `<split>.jsonl` with lines `{"image": "rel/path.png", "label": "class name"}` and
`classes.json`). A classes file is a JSON list (by label index) of names or `{"name", "synonyms"}`, or a
JSON object from the dataset's own label names to those. Class names must be unique (case-insensitive).

Protocols (`protocols: [mc, open, likelihood]`, any subset):
- `mc`: K-way multiple choice with hard negatives (Ghosh et al.), options mined once per dataset and
  saved with seed and mining method; scored by the letter probabilities (each letter scored as a
  one-token continuation with `score`, renormalised over the K letters) and, with `mc_generate`, by
  greedy generation + rule-based letter parsing (parse failures count as wrong and are reported).
- `open`: `What type of object is in this photo?`, greedy; correct when a gold name or synonym occurs
  in the answer, case-insensitively (Zhang et al.).
- `likelihood`: every class name scored after the prefix `The photo features a` with one shared
  prompt prefix per image; ranking by sum and by mean log-prob, top-1 / top-5 (Zhang et al.).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from eval.base import TASKS, Task
from eval.data import hf_rows, load_hf, open_image, read_records
from eval.metrics import (ANSWER_PARSERS, LETTERS, ItemScore, by_metric, extract_choice, letter_probabilities,
                          name_in_answer, ratio_of_sums, topk_correct)
from vlm.config import Positive
from vlm.errors import UserError
from vlm.io import atomic_write_json, read_json

MC_PROMPT = "<image>\n{question}\n{options}\nAnswer with the option's letter from the given choices directly."
OPEN_PROMPT = "<image>\n{question}"
DEFAULT_QUESTION = "What type of object is in this photo?"
ANSWER_PREFIX = "The photo features a"
PROTOCOLS = ("mc", "open", "likelihood")
CLASSNAMES_DIR = Path(__file__).parent / "classnames"


def _clean(name: str) -> str:
    return re.sub(r"^\d+\.", "", name).replace("_", " ").strip()


# the keys `ClassificationData` reads (tasks that classify a labelled image set share them)
DATA_OPTIONS: dict[str, Any] = {"hf": Optional[str], "config": Optional[str], "split": str, "path": Optional[str], "classnames": Optional[str], "classes_file": Optional[str], "name_separator": Optional[str], "clean_names": bool, "image_column": str, "label_column": str}

class ClassificationData:
    """Rows `{id, image, label}` (image a lazy reference, label an int) plus class names and synonyms."""

    def __init__(self, cfg: dict[str, Any], split: str) -> None:
        self.root: Path | None = None
        names: list[str] | None = None
        synonyms: list[list[str]] = []
        if cfg.get("hf"):
            img_col, lab_col = cfg.get("image_column", "image"), cfg.get("label_column", "label")
            ds = load_hf(cfg["hf"], split, cfg.get("config"))
            if lab_col not in ds.column_names:
                raise UserError(f"dataset {cfg['hf']!r} has no label column {lab_col!r}; columns: {ds.column_names}.")
            feature = ds.features[lab_col]
            if hasattr(feature, "names"):
                names = list(feature.names)
            rows = hf_rows(ds.select_columns([img_col, lab_col]), [img_col])
            raw = [{"id": f"{split}-{i}", "image": r[img_col], "label": r[lab_col]} for i, r in enumerate(rows)]
        elif cfg.get("path"):
            base = Path(cfg["path"])
            self.root = base
            raw = [{"id": r.get("id", r["image"]), "image": r["image"], "label": r["label"]}
                   for r in read_records(base / f"{split}.jsonl")]
            if not cfg.get("classes_file") and (base / "classes.json").exists():
                names, synonyms = self._read_classes(base / "classes.json")
        else:
            raise UserError(f"classification task {cfg.get('name')!r} needs `hf: <dataset id or saved folder>` "
                            "or `path: <folder with <split>.jsonl and classes.json>`.")
        if cfg.get("classes_file") and cfg.get("classnames"):
            raise UserError(f"task {cfg.get('name')!r}: give `classes_file` or `classnames`, not both.")
        if cfg.get("classnames"):
            path = CLASSNAMES_DIR / f"{cfg['classnames']}.json"
            if not path.exists():
                known = sorted(p.stem for p in CLASSNAMES_DIR.glob("*.json"))
                raise UserError(f"task {cfg.get('name')!r}: no shipped class-name list {cfg['classnames']!r}; "
                                f"known: {known}.")
            names, synonyms = self._read_classes(path, names)
        elif cfg.get("classes_file"):
            names, synonyms = self._read_classes(Path(cfg["classes_file"]), names)
        if names is None:
            raise UserError(f"task {cfg.get('name')!r}: no class names (the label column is not a ClassLabel "
                            "and no classes_file / classes.json was given).")
        sep = cfg.get("name_separator")
        if sep:  # e.g. ImageNet's "tench, Tinca tinca": first is the name, the rest synonyms
            parts = [n.split(sep) for n in names]
            synonyms = [p[1:] + (synonyms[i] if i < len(synonyms) else []) for i, p in enumerate(parts)]
            names = [p[0] for p in parts]
        if cfg.get("clean_names", False):
            names = [_clean(n) for n in names]
        _check_unique(names, cfg.get("name"))
        self.names = names
        self.synonyms = [synonyms[i] if i < len(synonyms) else [] for i in range(len(names))]
        index = {n: i for i, n in enumerate(self.names)}
        self.rows = []
        for r in raw:
            label = r["label"]
            if isinstance(label, str):
                key = _clean(label) if cfg.get("clean_names", False) else label
                if key not in index:
                    raise UserError(f"task {cfg.get('name')!r}: label {label!r} of item {r['id']!r} is not a known class.")
                label = index[key]
            self.rows.append({"id": str(r["id"]), "image": r["image"], "label": int(label)})

    @staticmethod
    def _read_classes(path: Path, label_names: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
        """Names and synonyms from a classes file: a list by label index, or an object keyed by the
        dataset's own label names (`label_names`, e.g. a ClassLabel's '1', '10', '100', ...)."""
        if not path.exists():
            raise UserError(f"classes file {path} does not exist.")
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            if label_names is None:
                raise UserError(f"classes file {path} maps label names to class names, but the dataset has no "
                                "label names (no ClassLabel feature); use a list by label index.")
            missing = [n for n in label_names if n not in data]
            extra = sorted(set(data) - set(label_names))
            if missing or extra:
                raise UserError(f"classes file {path} does not match the dataset's labels: missing {missing[:5]}, "
                                f"unknown {extra[:5]}.")
            data = [data[n] for n in label_names]
        elif label_names is not None and len(data) != len(label_names):
            raise UserError(f"classes file {path} lists {len(data)} classes but the dataset has {len(label_names)}.")
        names = [d["name"] if isinstance(d, dict) else str(d) for d in data]
        syn = [list(d.get("synonyms", [])) if isinstance(d, dict) else [] for d in data]
        return names, syn

    def classes_hash(self) -> str:
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()[:16]


def _check_unique(names: list[str], task: Any) -> None:
    """Two classes with one name (up to case and spacing) would give identical options and an
    unanswerable question: refuse them."""
    seen: dict[str, int] = {}
    dups = []
    for i, n in enumerate(names):
        key = " ".join(n.lower().split())
        if key in seen:
            dups.append(f"{names[seen[key]]!r} (class {seen[key]}) / {n!r} (class {i})")
        else:
            seen[key] = i
    if dups:
        raise UserError(f"task {task!r}: duplicate class names: {'; '.join(dups[:5])}"
                        f"{f' and {len(dups) - 5} more' if len(dups) > 5 else ''}. Give one unique name per "
                        "class with `classes_file` (or a shipped list with `classnames`).")


# --- hard-negative mining -----------------------------------------------------------------------------

def _cosine(emb: np.ndarray) -> np.ndarray:
    emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    return emb @ emb.T


def class_similarity(names: list[str], method: str, model: Any = None) -> np.ndarray:
    """[C, C] similarity of class names.

    `clip:<path>`: cosine of a CLIP-style model's text embeddings of "a photo of a {name}.";
    `llm`: cosine of the mean input embedding of each name's tokens in the VLM's own LLM;
    `tfidf`: cosine of character 2-4-gram TF-IDF vectors (model-free, identical for every run).
    """
    if method.startswith("clip:"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = method.split(":", 1)[1]
        tok, clip = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
        with torch.no_grad():
            batch = tok([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
            out = clip.get_text_features(**batch)
            emb = getattr(out, "pooler_output", out)
        return _cosine(emb.float().numpy())
    if method == "llm":
        import torch

        llm = getattr(model, "llm", None)
        if llm is None or not hasattr(llm, "tokenizer"):
            raise UserError("option mining 'llm' needs a model with `.llm.tokenizer` and `.llm.model`.")
        table = llm.model.get_input_embeddings().weight
        rows = []
        with torch.no_grad():
            for n in names:
                ids = llm.tokenizer(" " + n, add_special_tokens=False)["input_ids"]
                rows.append(table[torch.tensor(ids, device=table.device)].float().mean(0).cpu().numpy())
        return _cosine(np.stack(rows))
    if method == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4)).fit_transform([n.lower() for n in names])
        return (vec @ vec.T).toarray()
    raise UserError(f"unknown option mining method {method!r}; use 'clip:<model path>', 'llm' or 'tfidf'.")


def mine_options(data: ClassificationData, k: int, seed: int, method: str, model: Any = None) -> dict[str, Any]:
    """Options of every item: the gold class and its K-1 most similar classes, in a seeded random order."""
    if k < 2 or k > min(len(data.names), len(LETTERS)):
        raise UserError(f"mc k={k} must be between 2 and min(#classes={len(data.names)}, 26).")
    sim = class_similarity(data.names, method, model)
    np.fill_diagonal(sim, -np.inf)
    negatives = [list(np.argsort(-sim[c], kind="stable")[: k - 1]) for c in range(len(data.names))]
    items = {}
    for row in data.rows:
        opts = [row["label"]] + [int(i) for i in negatives[row["label"]]]
        random.Random(f"{seed}:{row['id']}").shuffle(opts)
        items[row["id"]] = opts
    return {"k": k, "seed": seed, "method": method, "classes_sha": data.classes_hash(), "items": items}


def _options_path(cfg: dict[str, Any], k: int, seed: int) -> Path:
    if cfg.get("options_file"):
        return Path(cfg["options_file"])
    cache = Path(os.environ.get("VLM_ABLATE_CACHE", Path.home() / ".cache" / "vlm-ablate"))
    return cache / "eval_options" / f"{cfg['name']}-{cfg.get('split', 'test')}-k{k}-seed{seed}.json"


# --- the task -----------------------------------------------------------------------------------------

@TASKS.register("classification")
class ClassificationTask(Task):
    options = {**DATA_OPTIONS, "question": str, "answer_prefix": str, "answer_parser": str, "headline": str,
               "protocols": list[str], "k": Positive, "seed": int, "mc_generate": bool, "max_new_tokens": Positive,
               "mining": Optional[str], "mining_model": Optional[str], "options_file": Optional[str]}
    family = "fine_grained"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.protocols = list(cfg.get("protocols", ["mc"]))
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise UserError(f"task {self.name!r}: protocols {bad or '[]'} unknown; choose from {list(PROTOCOLS)}.")
        self.k = int(cfg.get("k", 5))
        self.seed = int(cfg.get("seed", 0))
        self.question = cfg.get("question", DEFAULT_QUESTION)
        self.answer_prefix = cfg.get("answer_prefix", ANSWER_PREFIX)
        self.mc_generate = bool(cfg.get("mc_generate", True))
        self.parser = cfg.get("answer_parser", "vlmevalkit")
        if self.parser not in ANSWER_PARSERS:
            raise UserError(f"task {self.name!r}: answer_parser must be one of {list(ANSWER_PARSERS)}, "
                            f"got {self.parser!r}.")
        self.max_new_tokens = int(cfg.get("max_new_tokens", 20))
        default_head = {"mc": "mc_acc", "open": "open_acc", "likelihood": "likelihood_sum_top1"}[self.protocols[0]]
        self.headline = cfg.get("headline", default_head)
        self._data: ClassificationData | None = None
        self.mined_options: dict[str, list[int]] = {}  # item id -> its k option class ids

    @property
    def data(self) -> ClassificationData:
        if self._data is None:
            self._data = ClassificationData(self.cfg, self.cfg.get("split", "test"))
        return self._data

    def items(self) -> list[dict]:
        return list(self.data.rows)

    def prepare(self, model: Any, task_dir: Path) -> dict[str, Any]:
        if "mc" not in self.protocols:
            return {}
        path = _options_path(self.cfg, self.k, self.seed)
        if path.exists():
            mined = read_json(path)
            if mined.get("classes_sha") != self.data.classes_hash() or mined.get("k") != self.k:
                raise UserError(f"options file {path} was mined for other classes or another k; "
                                "delete it or point `options_file` elsewhere.")
        else:
            method = self.cfg.get("mining") or (f"clip:{self.cfg['mining_model']}" if self.cfg.get("mining_model")
                                               else "llm" if hasattr(getattr(model, "llm", None), "tokenizer")
                                               else "tfidf")
            mined = mine_options(self.data, self.k, self.seed, method, model)
            atomic_write_json(path, mined)
        missing = [r["id"] for r in self.limited_items() if r["id"] not in mined["items"]]
        if missing:
            raise UserError(f"options file {path} lacks items such as {missing[:3]}; delete it to mine again.")
        self.mined_options = mined["items"]
        atomic_write_json(task_dir / "options.json", mined)
        return {"options": {"file": str(path), "k": self.k, "seed": mined["seed"], "method": mined["method"]}}

    def _mc_prompt(self, opts: list[int]) -> str:
        lines = "\n".join(f"{LETTERS[j]}. {self.data.names[c]}" for j, c in enumerate(opts))
        return MC_PROMPT.format(question=self.question, options=lines)

    def predict(self, model: Any, batch: list[dict]) -> list[dict]:
        images = [open_image(it["image"], self.data.root) for it in batch]
        recs = [{"id": it["id"], "label": it["label"]} for it in batch]
        names = self.data.names
        if "mc" in self.protocols:
            opts = [self.mined_options[it["id"]] for it in batch]
            prompts = [self._mc_prompt(o) for o in opts]
            letters = [list(LETTERS[: len(o)]) for o in opts]
            scores = model.score(images, prompts, letters, chat_template=self.chat_template)
            gens = (model.generate(images, prompts, chat_template=self.chat_template, max_new_tokens=self.max_new_tokens)
                    if self.mc_generate else [None] * len(batch))
            for rec, o, sc, gen in zip(recs, opts, scores, gens):
                probs = letter_probabilities([s["sum_logprob"] for s in sc])
                gold = LETTERS[o.index(rec["label"])]
                rec.update(mc_options=o, mc_answer=gold, mc_probs=probs, mc_pred=LETTERS[int(np.argmax(probs))])
                if gen is not None:
                    rec.update(mc_gen_text=gen, mc_gen_pred=extract_choice(gen, [names[c] for c in o], self.parser))
        if "open" in self.protocols:
            prompts = [OPEN_PROMPT.format(question=self.question)] * len(batch)
            gens = model.generate(images, prompts, chat_template=self.chat_template, max_new_tokens=self.max_new_tokens)
            for rec, gen in zip(recs, gens):
                gold = [names[rec["label"]], *self.data.synonyms[rec["label"]]]
                rec.update(open_text=gen, open_correct=name_in_answer(gen, gold))
        if "likelihood" in self.protocols:
            pre = f"{self.answer_prefix} " if self.answer_prefix else ""
            conts = [pre + n for n in names] + ([self.answer_prefix] if self.answer_prefix else [])
            prompts = [OPEN_PROMPT.format(question=self.question)] * len(batch)
            scores = model.score(images, prompts, [conts] * len(batch), chat_template=self.chat_template)
            for rec, sc in zip(recs, scores):
                base_sum, base_n = (sc[-1]["sum_logprob"], sc[-1]["num_tokens"]) if self.answer_prefix else (0.0, 0)
                # log p(name | prompt, prefix) = log p(prefix + name) - log p(prefix)
                sums = [s["sum_logprob"] - base_sum for s in sc[: len(names)]]
                means = [v / max(s["num_tokens"] - base_n, 1) for v, s in zip(sums, sc[: len(names)])]
                for tag, vals in (("sum", sums), ("mean", means)):
                    top = sorted(range(len(vals)), key=lambda i: (-vals[i], i))[:5]
                    rec[f"likelihood_{tag}_top5"] = top
                    rec[f"likelihood_{tag}_top1_correct"] = topk_correct(vals, rec["label"], 1)
                    rec[f"likelihood_{tag}_top5_correct"] = topk_correct(vals, rec["label"], 5)
        return recs

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        per: dict[str, dict[str, ItemScore]] = {}
        for r in records:
            s: dict[str, ItemScore] = {}
            if "mc" in self.protocols:
                s["mc_acc"] = float(r["mc_pred"] == r["mc_answer"])
                s["mc_gold_prob"] = float(r["mc_probs"][LETTERS.index(r["mc_answer"])])
                if self.mc_generate:
                    s["mc_gen_acc"] = float(r["mc_gen_pred"] == r["mc_answer"])
                    s["mc_gen_parse_failure"] = float(r["mc_gen_pred"] is None)
            if "open" in self.protocols:
                s["open_acc"] = float(bool(r["open_correct"]))
            if "likelihood" in self.protocols:
                for tag in ("sum", "mean"):
                    for k in ("top1", "top5"):
                        s[f"likelihood_{tag}_{k}"] = float(bool(r[f"likelihood_{tag}_{k}_correct"]))
            per[str(r["id"])] = s
        return by_metric(per)

    def metrics(self, records: list[dict]) -> dict[str, float]:
        out = {m: ratio_of_sums(v) for m, v in self.item_scores(records).items()}
        if self.headline not in out:
            raise UserError(f"task {self.name!r}: headline {self.headline!r} is not among its metrics {sorted(out)}.")
        return out

"""Pairwise fine-grained V&L benchmarks scored by caption log-likelihood given the image
(Bugliarello et al., ACL 2023): Winoground, VALSE, SVO-Probes; and VSR as true/false by the
probability of the first answer token. A caption's score is its log-prob after a caption prompt
(mean by default; `score: sum` to change)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from eval.base import SCORE_OPTION, TASKS, Task, score_field
from eval.data import find_image, hf_rows, load_hf, open_image, read_records
from eval.metrics import ItemScore, grouped_accuracy, ratio_of_sums, winoground_scores
from eval.spec import CAPTION_PROMPT
from vlm.errors import UserError


class PairwiseTask(Task):
    options = {**SCORE_OPTION, "prompt": str, "hf": Optional[str], "data_file": Optional[str], "image_root": Optional[str],
               "split": str, "config": Optional[str]}
    family = "diagnostic"
    default_split = "test"
    image_columns: tuple[str, ...] = ()

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.field = score_field(cfg, "mean")
        self.prompt = cfg.get("prompt", CAPTION_PROMPT)
        self.root: Path | None = Path(cfg["image_root"]) if cfg.get("image_root") else None

    def rows(self) -> list[dict]:
        if self.cfg.get("hf"):
            ds = load_hf(self.cfg["hf"], self.cfg.get("split", self.default_split), self.cfg.get("config"))
            return hf_rows(ds, [c for c in self.image_columns if c in ds.column_names])
        if self.cfg.get("data_file"):
            path = Path(self.cfg["data_file"])
            self.root = self.root or path.parent
            return read_records(path)
        raise UserError(f"task {self.name!r} ({self.cfg.get('type')}) needs `hf:` or `data_file:`.")

    def caption_scores(self, model: Any, pairs: list[tuple[Any, list[str]]]) -> list[list[float]]:
        """Score each (image ref, [captions]) pair: one shared prompt prefix per image."""
        images = [open_image(im, self.root) for im, _ in pairs]
        res = model.score(images, [self.prompt] * len(pairs), [c for _, c in pairs], chat_template=self.chat_template)
        return [[r[self.field] for r in rr] for rr in res]


@TASKS.register("winoground")
class WinogroundTask(PairwiseTask):
    """Text, image and group scores (Thrush et al. 2022). Local: JSONL lines {id, caption_0,
    caption_1, image_0, image_1} with images at `image_root/<image_i>.png`."""
    options = {"image_ext": str}

    headline = "group"
    image_columns = ("image_0", "image_1")

    def items(self) -> list[dict]:
        ext = self.cfg.get("image_ext", ".png")
        out = []
        for r in self.rows():
            ims = [r[f"image_{i}"] for i in (0, 1)]
            ims = [im + ext if isinstance(im, str) and not Path(im).suffix else im for im in ims]
            out.append({"id": str(r["id"]), "captions": [r["caption_0"], r["caption_1"]], "images": ims})
        return out

    def predict(self, model: Any, batch: list[dict]) -> list[dict]:
        flat = self.caption_scores(model, [(im, it["captions"]) for it in batch for im in it["images"]])
        recs = []
        for b, it in enumerate(batch):
            by_image = flat[2 * b : 2 * b + 2]  # by_image[i][c]
            s = [[by_image[i][c] for i in (0, 1)] for c in (0, 1)]
            recs.append({"id": it["id"], "scores": s, **winoground_scores(s)})
        return recs

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        return {k: {str(r["id"]): float(bool(r[k])) for r in records} for k in ("text", "image", "group")}

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return {m: ratio_of_sums(v) for m, v in self.item_scores(records).items()}


@TASKS.register("valse")
class VALSETask(PairwiseTask):
    """Pairwise accuracy acc_r: the caption must outscore its foil. Local: `data_files: {piece: json}`
    in the release's format (key → {image_file, caption, foil, mturk, ...}). Images: `image_roots:
    {piece: folder or [folders]}` (the pieces' images come from different source datasets), falling
    back to `image_root`. Only validated samples are scored (`mturk.caption >= 2`, the release's
    filter) unless `valid_only: false`."""
    options = {"data_files": Any, "valid_only": bool, "image_roots": Any}

    headline = "acc"

    def items(self) -> list[dict]:
        files = self.cfg.get("data_files") or ({"valse": self.cfg["data_file"]} if self.cfg.get("data_file") else None)
        if not files:
            raise UserError(f"task {self.name!r}: VALSE needs `data_files: {{piece: path}}` or `data_file`.")
        roots = dict(self.cfg.get("image_roots") or {})
        unknown = sorted(set(roots) - set(files))
        if unknown:
            raise UserError(f"task {self.name!r}: image_roots names piece(s) {unknown} that are not in data_files.")
        valid_only = bool(self.cfg.get("valid_only", True))
        out = []
        for piece, path in files.items():
            piece_roots = roots.get(piece, self.cfg.get("image_root"))
            if piece_roots is None:
                raise UserError(f"task {self.name!r}: VALSE piece {piece!r} has no image folder; set "
                                f"`image_roots: {{{piece}: <folder>}}` (or `image_root` for all pieces).")
            piece_roots = [str(r) for r in (piece_roots if isinstance(piece_roots, list) else [piece_roots])]
            for r in read_records(path):
                if valid_only:
                    votes = (r.get("mturk") or {}).get("caption")
                    if votes is None:
                        raise UserError(f"VALSE {path}: sample {r['id']!r} has no `mturk.caption` vote count, so the "
                                        "validated-only filter cannot be applied; use the release's files or set "
                                        "`valid_only: false`.")
                    if int(votes) < 2:
                        continue
                out.append({"id": f"{piece}/{r['id']}", "piece": piece, "image": r["image_file"],
                            "roots": piece_roots, "caption": r["caption"], "foil": r["foil"]})
        return out

    def predict(self, model: Any, batch: list[dict]) -> list[dict]:
        flat = self.caption_scores(model, [(find_image(it["image"], it["roots"]), [it["caption"], it["foil"]])
                                           for it in batch])
        return [{"id": it["id"], "piece": it["piece"], "scores": s, "correct": s[0] > s[1]} for it, s in zip(batch, flat)]

    def metrics(self, records: list[dict]) -> dict[str, float]:
        out = grouped_accuracy(records, "piece")
        pieces = [v for k, v in out.items() if k.startswith("piece=")]
        out["acc_piece_mean"] = sum(pieces) / len(pieces)
        return out

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        """Pooled `acc` (the headline) and `acc_piece_mean` (each item weighted 1 / its piece's size)."""
        sizes: dict[str, int] = {}
        for r in records:
            sizes[str(r["piece"])] = sizes.get(str(r["piece"]), 0) + 1
        return {"acc": {str(r["id"]): float(bool(r["correct"])) for r in records},
                "acc_piece_mean": {str(r["id"]): [float(bool(r["correct"])) / sizes[str(r["piece"])],
                                                  1.0 / sizes[str(r["piece"])]] for r in records}}


@TASKS.register("svo_probes")
class SVOProbesTask(PairwiseTask):
    """The sentence must be more likely under its positive image than its negative one; accuracy
    overall and by negative type (subject / verb / object). Local: SVO-Probes CSV (sentence,
    pos_image_id, neg_image_id, subj_neg, verb_neg, obj_neg) with `image_root/<id>.jpg`.

    As in the release's evaluation notebook, only rows negative in exactly one type are scored, in the
    overall accuracy too; rows flagged in several types (or none) are left out and counted in
    results.json under `excluded`."""
    options = {"image_template": str}

    headline = "acc"
    image_columns = ("pos_image", "neg_image")

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.excluded: dict[str, int] | None = None

    def prepare(self, model: Any, task_dir: Path) -> dict[str, Any]:
        self.items()
        return {"excluded": self.excluded}

    def items(self) -> list[dict]:
        tmpl = self.cfg.get("image_template", "{}.jpg")
        out = []
        excluded = {"multiple_types": 0, "no_type": 0}
        for i, r in enumerate(self.rows()):
            types = [t for t in ("subj", "verb", "obj") if _flag(r.get(f"{t}_neg"))]
            if len(types) != 1:
                excluded["multiple_types" if types else "no_type"] += 1
                continue
            neg = types[0]
            pos = r["pos_image"] if "pos_image" in r else tmpl.format(r["pos_image_id"])
            negim = r["neg_image"] if "neg_image" in r else tmpl.format(r["neg_image_id"])
            out.append({"id": str(r.get("id", i)), "sentence": r["sentence"], "pos": pos, "neg": negim, "neg_type": neg})
        self.excluded = excluded
        return out

    def predict(self, model: Any, batch: list[dict]) -> list[dict]:
        flat = self.caption_scores(model, [(im, [it["sentence"]]) for it in batch for im in (it["pos"], it["neg"])])
        return [{"id": it["id"], "neg_type": it["neg_type"], "scores": [flat[2 * b][0], flat[2 * b + 1][0]],
                 "correct": flat[2 * b][0] > flat[2 * b + 1][0]} for b, it in enumerate(batch)]

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return grouped_accuracy(records, "neg_type")

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        return {"acc": {str(r["id"]): float(bool(r["correct"])) for r in records}}


def _flag(value: Any) -> bool:
    """A subj_neg/verb_neg/obj_neg cell: 'True'/'False' in the CSV, booleans on the hub."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0", "", "none", "nan"):
        return False
    raise UserError(f"SVO-Probes: negative-type flag {value!r} is neither True nor False.")


@TASKS.register("vsr")
class VSRTask(PairwiseTask):
    """VSR: true iff p(first answer token = "Yes") > p("No") for the question of whether the caption
    describes the image. Local: JSONL lines {image, caption, label (1/0), relation} + `image_root`."""
    options = {"answers": list[str]}

    headline = "acc"
    image_columns = ("image",)
    QUESTION = "<image>\nDoes this caption correctly describe the image? {caption}\nAnswer yes or no."

    def items(self) -> list[dict]:
        return [{"id": str(r.get("id", i)), "image": r["image"], "caption": r["caption"], "label": int(r["label"]),
                 "relation": r.get("relation", "")} for i, r in enumerate(self.rows())]

    def predict(self, model: Any, batch: list[dict]) -> list[dict]:
        yes_no = list(self.cfg.get("answers", ["Yes", "No"]))
        prompt = self.cfg.get("prompt", self.QUESTION)
        images = [open_image(it["image"], self.root) for it in batch]
        res = model.score(images, [prompt.format(caption=it["caption"]) for it in batch], [yes_no] * len(batch),
                          chat_template=self.chat_template)
        recs = []
        for it, r in zip(batch, res):
            pred = int(r[0]["sum_logprob"] > r[1]["sum_logprob"])
            recs.append({"id": it["id"], "relation": it["relation"], "label": it["label"], "pred": pred,
                         "correct": pred == it["label"]})
        return recs

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        return {"acc": {str(r["id"]): float(bool(r["correct"])) for r in records}}

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return {m: ratio_of_sums(v) for m, v in self.item_scores(records).items()}

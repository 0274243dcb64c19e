"""SPEC (Peng et al., CVPR 2024): image-text matching where the K candidates differ in one attribute
(absolute/relative size, absolute/relative spatial position, existence, count).

Layout (the release's, wjpoom/SPEC `spec/dataset.py`): `path/<subset>/image2text.json` and
`text2image.json`, lists of `{query, keys[K], label}`; image paths relative to the subset folder (or
`image_root/<subset>`). Subsets: absolute_size, relative_size, absolute_spatial, relative_spatial,
existence, count. All six are required unless `subsets:` names some; an unknown subset name or a
missing subset folder is an error, and so (when `subsets:` is not given) is a folder holding SPEC
files under a name SPEC does not have. A text's score given an image is its
log-likelihood after a caption prompt (mean log-prob by default, `score: sum` to change).
I2T: the image query picks the best of K texts; T2I: the text query picks the image under which it is
most likely. Accuracy per subset and direction; headline = unweighted mean over subsets of (I2T+T2I)/2.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from eval.base import SCORE_OPTION, TASKS, Task, score_field
from eval.data import open_image
from eval.metrics import ItemScore, argmax_correct, spec_metrics
from vlm.errors import UserError

SUBSETS = ("absolute_size", "relative_size", "absolute_spatial", "relative_spatial", "existence", "count")
SPEC_FILES = ("image2text.json", "text2image.json")
CAPTION_PROMPT = "<image>\nDescribe the image in one sentence."


@TASKS.register("spec")
class SPECTask(Task):
    options = {**SCORE_OPTION, "prompt": str, "path": str, "subsets": Optional[list[str]], "image_root": Optional[str]}
    family = "diagnostic"
    headline = "mean"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        if not cfg.get("path"):
            raise UserError(f"task {self.name!r}: SPEC needs `path:` (the folder holding the subset folders).")
        self.field = score_field(cfg, "mean")
        self.prompt = cfg.get("prompt", CAPTION_PROMPT)

    def items(self) -> list[dict]:
        root = Path(self.cfg["path"])
        if not root.is_dir():
            raise UserError(f"SPEC: {root} is not a folder; point `path` at the folder holding the subset folders.")
        subsets = list(self.cfg.get("subsets") or SUBSETS)
        unknown = [s for s in subsets if s not in SUBSETS]
        if unknown:
            raise UserError(f"SPEC: unknown subset(s) {unknown} in `subsets`; SPEC's are {list(SUBSETS)}.")
        strays = [] if self.cfg.get("subsets") else sorted(
            p.name for p in root.iterdir()
            if p.is_dir() and p.name not in SUBSETS and any((p / f).exists() for f in SPEC_FILES))
        if strays:
            raise UserError(f"SPEC: {root} holds subset folder(s) {strays} that SPEC does not have (its subsets are "
                            f"{list(SUBSETS)}); rename them to the release's names.")
        missing = [s for s in subsets if not (root / s).is_dir()]
        if missing:
            raise UserError(f"SPEC: subset folder(s) {missing} missing under {root}; the release has all of "
                            f"{list(SUBSETS)} (list the ones to run in `subsets:` to run fewer).")
        groups: list[list[dict]] = []
        for sub in subsets:
            img_root = Path(self.cfg["image_root"]) / sub if self.cfg.get("image_root") else root / sub
            for direction, fname in (("i2t", "image2text.json"), ("t2i", "text2image.json")):
                path = root / sub / fname
                if not path.exists():
                    raise UserError(f"SPEC: {path} is missing.")
                group: list[dict] = []
                groups.append(group)
                for n, e in enumerate(json.loads(path.read_text(encoding="utf-8"))):
                    if not 0 <= int(e["label"]) < len(e["keys"]):
                        raise UserError(f"SPEC: {path} entry {n} has label {e['label']} outside its {len(e['keys'])} keys.")
                    group.append({"id": f"{sub}/{direction}/{n}", "subset": sub, "direction": direction,
                                "query": e["query"], "keys": list(e["keys"]), "label": int(e["label"]),
                                "root": str(img_root)})
        # Round-robin over (subset, direction) so that a `limit` keeps every subset and both directions.
        return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]

    def predict(self, model: Any, batch: list[dict]) -> list[dict]:
        images, prompts, conts, owner = [], [], [], []
        for b, it in enumerate(batch):
            if it["direction"] == "i2t":
                images.append(open_image(it["query"], it["root"]))
                prompts.append(self.prompt)
                conts.append(it["keys"])
                owner.append(b)
            else:
                for key in it["keys"]:
                    images.append(open_image(key, it["root"]))
                    prompts.append(self.prompt)
                    conts.append([it["query"]])
                    owner.append(b)
        flat = model.score(images, prompts, conts, chat_template=self.chat_template)
        scores: list[list[float]] = [[] for _ in batch]
        for b, res in zip(owner, flat):
            scores[b].extend(r[self.field] for r in res)
        return [{"id": it["id"], "subset": it["subset"], "direction": it["direction"], "label": it["label"],
                 "scores": sc, "correct": argmax_correct(sc, it["label"])} for it, sc in zip(batch, scores)]

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return spec_metrics(records)

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        """`i2t`, `t2i` and `mean` as item shares: the mean over subsets (and directions) weights each item by
        1 / (its subset-direction's size x the number of subset-directions averaged)."""
        cells: dict[tuple[str, str], int] = {}
        for r in records:
            cells[(r["subset"], r["direction"])] = cells.get((r["subset"], r["direction"]), 0) + 1
        per_dir = {d: sum(1 for (_, dd) in cells if dd == d) for d in ("i2t", "t2i")}
        out: dict[str, dict[str, ItemScore]] = {"i2t": {}, "t2i": {}, "mean": {}}
        for r in records:
            d, c = r["direction"], float(bool(r["correct"]))
            w = 1.0 / cells[(r["subset"], d)] / per_dir[d]
            out[d][str(r["id"])] = [c * w, w]
            # the mean of the directions scored: each direction's weights sum to 1 / (directions present)
            wm = w / sum(1 for n in per_dir.values() if n)
            out["mean"][str(r["id"])] = [c * wm, wm]
        return {m: v for m, v in out.items() if v}

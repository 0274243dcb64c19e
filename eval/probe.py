"""Linear probe of the VLM's own vision encoder (type `linear_probe`): "the eyes see it" ceiling.

Features: the encoder's output tokens `[B, N, D]` pooled by mean (`pool: mean`) or the CLS token
(`pool: cls`, needs `has_cls` and a token selection that keeps it). A multinomial logistic regression
(scikit-learn, L2, `C`) is fit on standardised train features and tested on the eval split.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
from tqdm.auto import tqdm

from eval.base import TASKS, Task, write_item_scores
from eval.classification import DATA_OPTIONS, ClassificationData
from eval.data import open_image
from eval.metrics import ItemScore, ratio_of_sums
from vlm.config import Positive, Range
from vlm.errors import UserError
from vlm.io import atomic_write_json, atomic_write_text


@TASKS.register("linear_probe")
class LinearProbeTask(Task):
    options = {**DATA_OPTIONS, "pool": str, "train_split": str, "train_limit": Optional[Positive],
               "C": Annotated[float, Range(gt=0)], "max_iter": Positive}
    family = "probe"
    headline = "acc"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.pool = cfg.get("pool", "mean")
        if self.pool not in ("mean", "cls"):
            raise UserError(f"task {self.name!r}: pool must be 'mean' or 'cls', got {self.pool!r}.")

    def _features(self, encoder: Any, data: ClassificationData, rows: list[dict], bs: int, desc: str) -> np.ndarray:
        import torch

        params = list(encoder.parameters()) if hasattr(encoder, "parameters") else []
        device = params[0].device if params else torch.device("cpu")
        out = []
        with torch.no_grad():
            for i in tqdm(range(0, len(rows), bs), desc=desc, unit="batch"):
                ims = [open_image(r["image"], data.root) for r in rows[i : i + bs]]
                pixels = encoder.preprocess(ims)
                pixels = ({k: v.to(device) for k, v in pixels.items()} if isinstance(pixels, dict) else pixels.to(device))
                tokens = encoder(pixels) if callable(encoder) else encoder.forward(pixels)
                if self.pool == "cls":
                    if not getattr(encoder, "has_cls", False) or getattr(encoder, "select_tokens", "patch") == "patch":
                        raise UserError(f"task {self.name!r}: pool 'cls' needs an encoder that outputs its CLS token.")
                    feats = tokens[:, 0]
                else:
                    feats = tokens.mean(1)
                out.append(feats.float().cpu().numpy())
        return np.concatenate(out)

    def run(self, model: Any, task_dir: Path, batch_size: int = 8, overwrite: bool = False) -> dict[str, Any]:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        task_dir = Path(task_dir)
        if getattr(model, "encoder", None) is None:
            raise UserError(f"task {self.name!r}: a linear probe reads the model's own vision encoder, and "
                            f"{type(model).__name__} exposes none (an `hf:` model); probe its encoder with a run or "
                            "zoo spec, or use a `zero_shot` task for a contrastive encoder.")
        train = ClassificationData(self.cfg, self.cfg.get("train_split", "train"))
        test = ClassificationData(self.cfg, self.cfg.get("split", "test"))
        train_rows = train.rows[: self.cfg["train_limit"]] if self.cfg.get("train_limit") else train.rows
        test_rows = test.rows[: int(self.limit)] if self.limit is not None else test.rows
        if len({r["label"] for r in train_rows}) < 2:
            raise UserError(f"task {self.name!r}: the train split needs at least two classes.")
        bs = int(self.cfg.get("batch_size", batch_size))
        x_tr = self._features(model.encoder, train, train_rows, bs, f"{self.name} train")
        x_te = self._features(model.encoder, test, test_rows, bs, f"{self.name} test")
        scaler = StandardScaler().fit(x_tr)
        clf = LogisticRegression(C=float(self.cfg.get("C", 1.0)), max_iter=int(self.cfg.get("max_iter", 1000)))
        clf.fit(scaler.transform(x_tr), [r["label"] for r in train_rows])
        proba = clf.predict_proba(scaler.transform(x_te))
        classes = list(clf.classes_)
        records = []
        for r, p in zip(test_rows, proba):
            order = [int(classes[i]) for i in np.argsort(-p, kind="stable")]
            records.append({"id": r["id"], "label": r["label"], "pred": order[0], "top5": order[:5]})
        atomic_write_text(task_dir / "predictions.jsonl", "".join(json.dumps(x) + "\n" for x in records))
        metrics = self.metrics(records)
        write_item_scores(self, task_dir, self.item_scores(records), metrics)
        metrics.update(num_train=len(train_rows), feature_dim=int(x_tr.shape[1]))
        result = {"task": self.name, "type": "linear_probe", "family": self.family, "headline": self.headline,
                  "score": metrics["acc"], "num_items": len(records), "metrics": metrics}
        atomic_write_json(task_dir / "results.json", result)
        return result

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        return {"acc": {str(r["id"]): float(r["pred"] == r["label"]) for r in records},
                "top5": {str(r["id"]): float(r["label"] in r["top5"]) for r in records}}

    def metrics(self, records: list[dict]) -> dict[str, float]:
        return {m: ratio_of_sums(v) for m, v in self.item_scores(records).items()}

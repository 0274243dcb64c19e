"""The task interface, the task registry and the resumable per-item loop every task shares.

A task is built from a config dict `{type: ..., name: ..., ...}` by `TASKS.build(cfg)`. It lists its
items (light dicts with an `id`; images as lazy references), predicts a batch of them with the model
(`score` / `generate`) and turns the stored per-item records into metrics. Records are appended to
`eval/<task>/predictions.jsonl` per batch, so a killed evaluation continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from vlm.errors import UserError
from vlm.io import append_jsonl, atomic_write_json, read_json, read_jsonl
from vlm.registry import Registry

TASKS: Registry["Task"] = Registry("eval task", plugins="eval", skip=("lm_eval", "runner"))

FAMILIES = ("fine_grained", "general", "diagnostic", "probe")


class Task:
    """Base class. Subclasses set `family` and `headline`, and implement `items`, `predict`, `metrics`."""

    family: str = "diagnostic"
    headline: str = "acc"

    def __init__(self, cfg: dict[str, Any]) -> None:
        if not cfg.get("name"):
            raise UserError(f"eval task config {cfg!r} has no 'name'; give every task a unique name.")
        self.cfg = dict(cfg)
        self.name = str(cfg["name"])
        self.chat_template = bool(cfg.get("chat_template", True))
        self.limit = cfg.get("limit")

    # --- to implement -------------------------------------------------------------------------------
    def items(self) -> list[dict]:
        raise NotImplementedError

    def predict(self, model: Any, batch: list[dict]) -> list[dict]:
        raise NotImplementedError

    def metrics(self, records: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    def prepare(self, model: Any, task_dir: Path) -> dict[str, Any]:
        """Hook run once before predicting (e.g. mining options); returns extra info for results.json."""
        return {}

    # --- shared -------------------------------------------------------------------------------------
    def limited_items(self) -> list[dict]:
        items = self.items()
        if self.limit is not None:
            items = items[: int(self.limit)]
        ids = [str(it["id"]) for it in items]
        if len(set(ids)) != len(ids):
            raise UserError(f"task {self.name!r}: item ids are not unique; the data has duplicate ids.")
        return items

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self, model: Any, task_dir: Path, batch_size: int = 8, overwrite: bool = False) -> dict[str, Any]:
        """Predict every item not yet in predictions.jsonl (batched), then score them all."""
        task_dir = Path(task_dir)
        pred_path = task_dir / "predictions.jsonl"
        cfg_path = task_dir / "task.json"
        if overwrite and task_dir.exists():
            for p in (pred_path, cfg_path, task_dir / "results.json"):
                p.unlink(missing_ok=True)
        if cfg_path.exists() and read_json(cfg_path).get("fingerprint") != self.fingerprint():
            raise UserError(
                f"{task_dir} holds predictions of task {self.name!r} made with a different config; "
                "delete that folder or rerun with --overwrite to start this task afresh.")
        atomic_write_json(cfg_path, {"config": self.cfg, "fingerprint": self.fingerprint()})
        extra = self.prepare(model, task_dir)
        items = self.limited_items()
        done = {str(r["id"]) for r in read_jsonl(pred_path)}
        todo = [it for it in items if str(it["id"]) not in done]
        bs = int(self.cfg.get("batch_size", batch_size))
        with tqdm(total=len(items), initial=len(items) - len(todo), desc=self.name, unit="item") as bar:
            for start in range(0, len(todo), bs):
                batch = todo[start : start + bs]
                for rec in self.predict(model, batch):
                    append_jsonl(pred_path, rec)
                bar.update(len(batch))
        wanted = {str(it["id"]) for it in items}
        records = [r for r in read_jsonl(pred_path) if str(r["id"]) in wanted]
        if not records:
            raise UserError(f"task {self.name!r} has no items; check its data source.")
        metrics = self.metrics(records)
        result = {"task": self.name, "type": self.cfg.get("type"), "family": self.family,
                  "headline": self.headline, "score": metrics[self.headline], "num_items": len(records),
                  "metrics": metrics, **extra}
        atomic_write_json(task_dir / "results.json", result)
        return result


def score_field(cfg: dict[str, Any], default: str = "mean") -> str:
    which = cfg.get("score", default)
    if which not in ("mean", "sum"):
        raise UserError(f"task {cfg.get('name')!r}: score must be 'mean' or 'sum' (log-prob), got {which!r}.")
    return f"{which}_logprob"


def chunks(seq: Sequence, n: int) -> list:
    return [seq[i : i + n] for i in range(0, len(seq), n)]

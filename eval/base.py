"""The task interface, the task registry and the resumable per-item loop every task shares.

A task is built from a config dict `{type: ..., name: ..., ...}` by `TASKS.build(cfg)`. It lists its
items (light dicts with an `id`; images as lazy references), predicts a batch of them with the model
(`score` / `generate`) and turns the stored per-item records into metrics. Records are appended to
`eval/<task>/predictions.jsonl` per batch, so a killed evaluation continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Hashable, Literal, Optional, Sequence

from tqdm.auto import tqdm

from eval.metrics import ItemScore, ratio_of_sums
from vlm.config import Positive
from vlm.errors import UserError
from vlm.io import append_jsonl_records, atomic_write_json, atomic_write_text, read_json, read_jsonl
from vlm.registry import Registry

TASKS: Registry["Task"] = Registry("eval task", plugins="eval", skip=("lm_eval", "runner"))

FAMILIES = ("fine_grained", "general", "diagnostic", "probe")


@dataclass(frozen=True)
class Shard:
    """This process's part of an evaluation over `world` processes (`accelerate launch` / torchrun): it predicts
    every `world`-th item still to do, from its `rank`; `barrier` waits for all processes. Rank 0 merges and scores.
    Passed explicitly (never guessed from an initialised process group: training evaluates on its main process
    only)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None, compare=False)

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Shard()

# keys every task config may hold; each task class lists its own in `options` (name -> type hint). `TASKS.build` and
# `TASKS.check` check a config against `config_schema()` (the union along the class's bases) with `vlm.config.check`:
# a misspelt key or a value of the wrong type is an error before any data is read
COMMON_OPTIONS: dict[str, Any] = {"type": str, "name": str, "limit": Optional[Positive], "batch_size": Positive,
                                  "chat_template": bool}
# how a likelihood task turns a continuation's token log-probs into its score (`score_field`)
SCORE_OPTION: dict[str, Any] = {"score": Literal["mean", "sum"]}


class Task:
    """Base class. Subclasses set `family` and `headline`, and implement `items`, `predict`, `metrics`."""

    family: str = "diagnostic"
    headline: str = "acc"
    options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def config_schema(cls) -> dict[str, Any]:
        """Every key a config of this task may hold -> its type hint (`options` of the class and its bases)."""
        schema = dict(COMMON_OPTIONS)
        for klass in reversed(cls.__mro__):
            schema.update(vars(klass).get("options", {}))
        return schema

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

    def item_scores(self, records: list[dict]) -> dict[str, dict[str, ItemScore]]:
        """What every item contributes to each metric that adds up over items: metric -> {unit id -> a score, or
        [numerator, denominator] for a weighted mean or a ratio such as F1} (`eval.metrics.as_num_den`). A unit is a
        record, or a group of records that is scored as one (a circular MMBench question). Must hold the headline;
        `run` checks that every metric here equals `metrics`' value and writes them to `item_scores.json`, where
        the report reads its standard errors and paired effects (lm-eval's split of per-item compute from
        aggregation)."""
        raise NotImplementedError

    def group_key(self, item: dict) -> Hashable | None:
        """Items with the same key are predicted side by side (`run` puts them in the same batch where it can, and
        on the same process): tasks whose items share an image return the image's reference, so the model
        computes that image's prompt prefix once (`VLM.generate`). None: the item stands alone."""
        return None

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

    def run(self, model: Any, task_dir: Path, batch_size: int = 8, overwrite: bool = False,
            shard: Shard = SINGLE) -> dict[str, Any]:
        """Predict every item not yet predicted (batched), then score them all.

        Over several processes (`shard`), each predicts its own slice of the items still to do into its own
        `predictions.shard-<rank>.jsonl`; rank 0 merges every file into `predictions.jsonl` (item order) and scores.
        Items of one `group_key` are predicted one after another, on one process; the finished predictions file is
        in item order whatever order they were predicted in.
        """
        task_dir = Path(task_dir)
        pred_path = task_dir / "predictions.jsonl"
        cfg_path = task_dir / "task.json"
        if shard.main:
            if overwrite and task_dir.exists():
                for p in (pred_path, cfg_path, task_dir / "results.json", *shard_files(task_dir)):
                    p.unlink(missing_ok=True)
            if cfg_path.exists() and read_json(cfg_path).get("fingerprint") != self.fingerprint():
                raise UserError(
                    f"{task_dir} holds predictions of task {self.name!r} made with a different config; "
                    "delete that folder or rerun with --overwrite to start this task afresh.")
            atomic_write_json(cfg_path, {"config": self.cfg, "fingerprint": self.fingerprint()})
            extra = self.prepare(model, task_dir)
        shard.barrier()
        if not shard.main:  # after rank 0, so what it prepared once (mined options) is read, not redone
            extra = self.prepare(model, task_dir)
        items = self.limited_items()
        done = {str(r["id"]) for p in (pred_path, *shard_files(task_dir)) for r in read_jsonl(p)}
        shard.barrier()  # every process has read the same `done` before any of them appends
        remaining = [it for it in items if str(it["id"]) not in done]
        todo = [it for group in group_items(remaining, self.group_key)[shard.rank :: shard.world] for it in group]
        out_path = pred_path if shard.world == 1 else task_dir / f"predictions.shard-{shard.rank}.jsonl"
        _drop_torn_line(out_path)
        bs = int(self.cfg.get("batch_size", batch_size))
        # one process: all items, those done before counted in; several: rank 0's own slice
        desc, total, initial = ((self.name, len(items), len(items) - len(remaining)) if shard.world == 1
                                else (f"{self.name} [rank 0 of {shard.world}]", len(todo), 0))
        with tqdm(total=total, initial=initial, desc=desc, unit="item", disable=not shard.main) as bar:
            for start in range(0, len(todo), bs):
                batch = todo[start : start + bs]
                append_jsonl_records(out_path, self.predict(model, batch))  # one fsync per batch
                bar.update(len(batch))
        shard.barrier()
        if not shard.main:
            shard.barrier()  # rank 0 merges and scores
            return read_json(task_dir / "results.json")
        merge_predictions(task_dir, items)
        wanted = {str(it["id"]) for it in items}
        records = [r for r in read_jsonl(pred_path) if str(r["id"]) in wanted]
        if not records:
            raise UserError(f"task {self.name!r} has no items; check its data source.")
        metrics = self.metrics(records)
        write_item_scores(self, task_dir, self.item_scores(records), metrics)
        result = {"task": self.name, "type": self.cfg.get("type"), "family": self.family,
                  "headline": self.headline, "score": metrics[self.headline], "num_items": len(records),
                  "metrics": metrics, **extra}
        atomic_write_json(task_dir / "results.json", result)
        shard.barrier()
        return result


def group_items(items: Sequence[dict], key: Callable[[dict], Hashable | None]) -> list[list[dict]]:
    """Items with an equal, not-None `key` gathered into one group, placed where the first of them is; every other
    item is a group of its own."""
    groups: list[list[dict]] = []
    where: dict[Hashable, list[dict]] = {}
    for it in items:
        k = key(it)
        if k is None:
            groups.append([it])
        elif k in where:
            where[k].append(it)
        else:
            where[k] = [it]
            groups.append(where[k])
    return groups


def shard_files(task_dir: Path) -> list[Path]:
    """Per-process prediction files of a task dir (any world size: a relaunch may use another)."""
    return sorted(Path(task_dir).glob("predictions.shard-*.jsonl"))


def merge_predictions(task_dir: Path, items: Sequence[dict]) -> None:
    """Fold every `predictions.shard-*.jsonl` into `predictions.jsonl`: one record per id (the first seen), in item
    order (records of ids no longer among the items keep their order, after them); then delete the shard files.
    A lone `predictions.jsonl` written in another order (items predicted grouped by image) is put in item order.
    Atomic, and safe to repeat after a kill between the write and the deletes (duplicates are dropped)."""
    task_dir = Path(task_dir)
    parts = shard_files(task_dir)
    pred_path = task_dir / "predictions.jsonl"
    records: dict[str, dict] = {}
    written: list[str] = []
    for path in (pred_path, *parts):
        for rec in read_jsonl(path):
            written.append(str(rec["id"]))
            records.setdefault(str(rec["id"]), rec)
    order = {str(it["id"]): i for i, it in enumerate(items)}
    merged = sorted(records.values(), key=lambda r: order.get(str(r["id"]), len(order)))
    if not parts and written == [str(r["id"]) for r in merged]:
        return
    atomic_write_text(pred_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in merged))
    for path in parts:
        path.unlink()


def _drop_torn_line(path: Path) -> None:
    """Rewrite a JSONL file whose last line was cut off by a kill, so appending to it stays readable."""
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in read_jsonl(path)))


def write_item_scores(task: Task, task_dir: Path, scores: dict[str, dict[str, ItemScore]],
                      metrics: dict[str, float]) -> None:
    """Check a task's per-item scores against its metrics (a disagreement is a bug in the task) and write them."""
    if task.headline not in scores:
        raise RuntimeError(f"task {task.name!r} ({type(task).__name__}) gives no per-item scores for its headline "
                           f"{task.headline!r}.")
    for metric, per_item in scores.items():
        if metric not in metrics or abs(ratio_of_sums(per_item) - metrics[metric]) > 1e-9:
            raise RuntimeError(f"task {task.name!r}: its per-item scores for {metric!r} add up to "
                               f"{ratio_of_sums(per_item)!r}, its metric is {metrics.get(metric)!r}.")
    atomic_write_json(Path(task_dir) / "item_scores.json", {"task": task.name, "headline": task.headline,
                                                           "family": task.family, "scores": scores})


def score_field(cfg: dict[str, Any], default: str = "mean") -> str:
    which = cfg.get("score", default)
    if which not in ("mean", "sum"):
        raise UserError(f"task {cfg.get('name')!r}: score must be 'mean' or 'sum' (log-prob), got {which!r}.")
    return f"{which}_logprob"


def chunks(seq: Sequence, n: int) -> list:
    return [seq[i : i + n] for i in range(0, len(seq), n)]

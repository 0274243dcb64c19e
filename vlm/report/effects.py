"""The statistics of a grid report: every number with its standard error, and axis effects against noise.

Every metric of an eval task is a ratio of sums over its items, `R = Σ num_i / Σ den_i`: a plain mean has
`den_i = 1`, a mean over subsets weights each item by `1 / |its subset|`, F1 is `Σ 2tp_i / Σ (2tp_i + fp_i + fn_i)`.
Each task writes what every item contributes (`scores` in its predictions, see `eval.base.Task.item_scores`), so
one formula covers them all: the linearised item influence `z_i = (num_i − R·den_i) / mean(den)` has mean 0 and
`SE(R) = sd(z) / √n` (the delta method; for a plain mean this is the usual sd/√n). Two runs evaluated on the same
items differ by `R_B − R_A` with `SE = sd(z^B − z^A) / √n` — the paired error, much smaller than either alone.

A headline summary (`fine_grained`, `general`) is the mean over its tasks' headline metrics; tasks have disjoint
items, so `SE = √(Σ SE_t²) / T`; `gap = fine_grained − general` with `SE = √(SE_fg² + SE_gen²)`.

An axis effect (level − reference) pools every pair of points that differ in that axis only: per item, the
influence differences are averaged over the pairs, so the SE is the item-sampling error of the pooled effect.
Points are paired on the items they all evaluated. Items outside that set (one point ran with another `limit`,
lost a shard, ...) are never dropped silently: every effect carries `n` (items paired) and `unpaired` (items left
out, per side), and `AxisEffect.unpaired` names the points and task for the report's note. The same task name on
different data (as recorded in `eval/<task>/task.json`) is a broken contract and an error.

Training randomness is a second noise: where the grid has a seed axis, `seed_noise` measures how much a point's
score moves when only the seed changes, and an effect is marked only when it exceeds both (`beyond_noise`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from eval.metrics import ItemScore, as_num_den
from vlm.errors import UserError

SUMMARIES = ("fine_grained", "general", "gap")


@dataclass(frozen=True)
class Estimate:
    """A value with its standard error over `n` items (`se` is 0 when n < 2). A paired effect's `unpaired` counts
    the items of its (reference, other) side that were left out because not every compared point evaluated them."""

    value: float
    se: float
    n: int
    unpaired: tuple[int, int] = (0, 0)

    def beyond(self, k: float = 2.0) -> bool:
        return self.se > 0 and abs(self.value) > k * self.se


@dataclass
class TaskScores:
    """One task of one run: its family, headline metric, and per metric every item's contribution."""

    task: str
    family: str
    headline: str
    items: dict[str, dict[str, ItemScore]]  # metric -> item id -> contribution
    config: dict[str, Any] = field(default_factory=dict)  # as recorded in eval/<task>/task.json ({} if not)


@dataclass
class PointScores:
    """What the statistics need of one grid point."""

    id: str
    labels: dict[str, str]
    tasks: dict[str, TaskScores] = field(default_factory=dict)


def influence(scores: Mapping[str, ItemScore]) -> tuple[float, dict[str, float]]:
    """The ratio `R = Σnum / Σden` and every item's linearised influence on it (see the module docstring)."""
    if not scores:
        raise UserError("no item scores to estimate from.")
    try:
        pairs = {i: as_num_den(x) for i, x in scores.items()}
    except ValueError as e:
        raise UserError(f"{e}; the item_scores.json of this task is damaged: rerun `vlm eval RUN_DIR`.") from None
    total_den = sum(d for _, d in pairs.values())
    if total_den <= 0:  # precision/recall/F1 with nothing to count: 0, as the scorers define them
        return 0.0, dict.fromkeys(pairs, 0.0)
    ratio = sum(n for n, _ in pairs.values()) / total_den
    mean_den = total_den / len(pairs)
    return ratio, {i: (n - ratio * d) / mean_den for i, (n, d) in pairs.items()}


def _se(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def estimate(scores: Mapping[str, ItemScore]) -> Estimate:
    """A metric from its item contributions, with its standard error."""
    ratio, z = influence(scores)
    return Estimate(ratio, _se(list(z.values())), len(z))


ScorePairs = Sequence[tuple[Mapping[str, ItemScore], Mapping[str, ItemScore]]]


def shared_items(pairs: ScorePairs) -> set[str]:
    """The items every score map of every (reference, other) pair holds: those a paired effect uses."""
    return set.intersection(*(set(a) & set(b) for a, b in pairs)) if pairs else set()


def paired_effect(pairs: ScorePairs) -> Estimate:
    """Mean over (reference, other) score maps of `R_other − R_reference`, on the items all of them share; the SE
    is that of the per-item influence differences averaged over the pairs. `unpaired` counts, summed over the
    pairs, each side's items left out of that shared set."""
    if not pairs:
        raise UserError("no pairs of points to compare.")
    common = shared_items(pairs)
    if not common:
        raise UserError("the compared points share no eval items; evaluate them on the same items.")
    diffs, z_sum = [], dict.fromkeys(common, 0.0)
    for a, b in pairs:
        ra, za = influence({i: a[i] for i in common})
        rb, zb = influence({i: b[i] for i in common})
        diffs.append(rb - ra)
        for i in common:
            z_sum[i] += zb[i] - za[i]
    k = len(pairs)
    unpaired = (sum(len(set(a) - common) for a, _ in pairs), sum(len(set(b) - common) for _, b in pairs))
    return Estimate(sum(diffs) / k, _se([v / k for v in z_sum.values()]), len(common), unpaired)


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def mean_of(estimates: Sequence[Estimate]) -> Estimate:
    """Mean of estimates over disjoint item sets (independent errors)."""
    k = len(estimates)
    unpaired = (0, 0)
    for e in estimates:
        unpaired = _add(unpaired, e.unpaired)
    return Estimate(sum(e.value for e in estimates) / k, math.sqrt(sum(e.se ** 2 for e in estimates)) / k,
                    sum(e.n for e in estimates), unpaired)


def difference(a: Estimate, b: Estimate) -> Estimate:
    """`a − b` for estimates over disjoint item sets."""
    return Estimate(a.value - b.value, math.sqrt(a.se ** 2 + b.se ** 2), a.n + b.n, _add(a.unpaired, b.unpaired))


# ---------------------------------------------------------------- one point


def _headline_items(t: TaskScores) -> dict[str, ItemScore]:
    if t.headline not in t.items:
        raise UserError(f"task {t.task!r} has no per-item scores for its headline metric {t.headline!r}; "
                        "re-run its evaluation with this version (`vlm eval RUN_DIR --overwrite`).")
    return t.items[t.headline]


def point_summary(point: PointScores) -> dict[str, Estimate]:
    """`task` -> its headline estimate, plus `fine_grained`, `general` and `gap` where the families exist."""
    out = {name: estimate(_headline_items(t)) for name, t in point.tasks.items()}
    fams = {fam: [out[n] for n, t in point.tasks.items() if t.family == fam] for fam in ("fine_grained", "general")}
    for fam, ests in fams.items():
        if ests:
            out[fam] = mean_of(ests)
    if "fine_grained" in out and "general" in out:
        out["gap"] = difference(out["fine_grained"], out["general"])
    return out


# ---------------------------------------------------------------- axes


def _level(point: PointScores, factor: Sequence[str]) -> str:
    return "+".join(point.labels[a] for a in factor)


def twin_pairs(points: Sequence[PointScores], factors: Sequence[Sequence[str]], factor: Sequence[str],
               reference: str, level: str) -> list[tuple[PointScores, PointScores]]:
    """(reference point, level point) for every setting of the other factors where both exist."""
    others = [f for f in factors if list(f) != list(factor)]
    by_ctx: dict[tuple, dict[str, PointScores]] = {}
    for p in points:
        by_ctx.setdefault(tuple(_level(p, f) for f in others), {})[_level(p, factor)] = p
    return [(ctx[reference], ctx[level]) for ctx in by_ctx.values() if reference in ctx and level in ctx]


@dataclass(frozen=True)
class Unpaired:
    """One compared pair of points whose paired effect on `task` left items out: `n` items were paired, and
    `only_reference` / `only_other` items of each point were not, because not every compared point evaluated them
    (another `limit`, a lost shard, ...)."""

    task: str
    reference: str
    other: str
    n: int
    only_reference: int
    only_other: int


# the config entries that say which data a task reads: the same task name must mean the same data at every point
DATA_KEYS = ("type", "hf", "config", "split", "path", "data_file", "data_files", "questions_file", "annotations_file",
             "classes_file", "classnames", "image_root", "image_roots", "images_config")


def check_same_data(a: PointScores, b: PointScores, task: str) -> None:
    """Two points compared on `task` must have evaluated it on the same data (as their task.json recorded it);
    a point without a record is not checked."""
    ca, cb = a.tasks[task].config, b.tasks[task].config
    if not ca or not cb:
        return
    diff = [k for k in DATA_KEYS if ca.get(k) != cb.get(k)]
    if diff:
        what = "; ".join(f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in diff)
        raise UserError(
            f"task {task!r} was evaluated on different data by the points {a.id} and {b.id}, which the report "
            f"compares ({what}; recorded in {a.id}/eval/{task}/task.json and {b.id}/eval/{task}/task.json). A task "
            "name must mean the same data at every point of a grid: re-evaluate the odd point with the grid's task "
            "config (`vlm eval RUN_DIR --overwrite`), or give the other data its own task name.")


def _task_effect(pairs: list[tuple[PointScores, PointScores]], task: str) -> tuple[Estimate, tuple[Unpaired, ...]]:
    for a, b in pairs:
        check_same_data(a, b, task)
    maps = [(_headline_items(a.tasks[task]), _headline_items(b.tasks[task])) for a, b in pairs]
    common = shared_items(maps)
    if not common:
        names = ", ".join(f"{a.id} vs {b.id}" for a, b in pairs)
        raise UserError(f"task {task!r}: the compared points ({names}) share no eval item ids; evaluate them on the "
                        "same items (the same data and `limit`: `vlm eval RUN_DIR --overwrite`).")
    unpaired = tuple(Unpaired(task, a.id, b.id, len(common), len(set(ma) - common), len(set(mb) - common))
                     for (a, b), (ma, mb) in zip(pairs, maps) if set(ma) != common or set(mb) != common)
    return paired_effect(maps), unpaired


def _effect(pairs: list[tuple[PointScores, PointScores]], metric: str) -> tuple[Estimate, tuple[Unpaired, ...]] | None:
    """Pooled paired effect on a task (`metric` = task name: its headline) or on a summary, with every pair whose
    items were not all paired."""
    if not pairs:
        return None
    if metric not in SUMMARIES:
        if not all(metric in a.tasks and metric in b.tasks for a, b in pairs):
            return None
        return _task_effect(pairs, metric)
    if metric == "gap":
        fg, gen = _effect(pairs, "fine_grained"), _effect(pairs, "general")
        return (difference(fg[0], gen[0]), fg[1] + gen[1]) if fg and gen else None
    tasks = sorted(set.intersection(*({n for n, t in p.tasks.items() if t.family == metric}
                                      for a, b in pairs for p in (a, b))))
    effects = [_effect(pairs, t) for t in tasks]
    if not tasks or not all(effects):
        return None
    return mean_of([e[0] for e in effects if e]), tuple(u for e in effects if e for u in e[1])


def seed_noise(points: Sequence[PointScores], factors: Sequence[Sequence[str]], seed_factor: Sequence[str],
               metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """metric -> {"sd", "pairs", "diffs"}: for every point trained with another seed than the first, the change of
    its score from its first-seed twin (same settings, same items). `sd` is their root mean square: the spread of a
    difference between two independently trained points that training randomness alone produces; an effect pooled
    over k point pairs has seed noise `sd / √k`."""
    levels = list(dict.fromkeys(_level(p, seed_factor) for p in points))
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        diffs = []
        for level in levels[1:]:
            for a, b in twin_pairs(points, factors, seed_factor, levels[0], level):
                for task in set(a.tasks) & set(b.tasks):
                    check_same_data(a, b, task)
                sa, sb = point_summary(a).get(metric), point_summary(b).get(metric)
                if sa and sb:
                    diffs.append(sb.value - sa.value)
        if diffs:
            out[metric] = {"sd": math.sqrt(sum(d * d for d in diffs) / len(diffs)), "pairs": len(diffs), "diffs": diffs}
    return out


@dataclass
class AxisEffect:
    axis: str
    level: str
    reference: str
    metric: str
    effect: Estimate
    pairs: int
    seed_sd: float | None = None  # seed noise of this pooled effect (sd / √pairs), where a seed axis exists
    unpaired: tuple[Unpaired, ...] = ()  # the compared pairs whose items were not all paired (see `Unpaired`)

    @property
    def marked(self) -> bool:
        """Beyond both noises: |Δ| > 2 SE over items and, with a seed axis, |Δ| > 2 × its seed noise."""
        return beyond_noise(self.effect, self.seed_sd)


def beyond_noise(effect: Estimate, seed_sd: float | None) -> bool:
    return effect.beyond(2.0) and (seed_sd is None or abs(effect.value) > 2.0 * seed_sd)


def axis_effects(points: Sequence[PointScores], factors: Sequence[Sequence[str]], seed_axis: str | None = None,
                 metrics: Sequence[str] | None = None) -> list[AxisEffect]:
    """Every factor (an axis, or zipped axes) but the seed, every non-reference level, every metric (the summaries
    then each task's headline): the pooled paired effect with its item SE and, where `seed_axis` names an axis,
    its seed noise. Only finished points are passed in; a level with no twin of the reference is left out."""
    if metrics is None:
        tasks = sorted({n for p in points for n in p.tasks})
        metrics = [*SUMMARIES, *tasks]
    seed_factor = next((f for f in factors if seed_axis in f), None) if seed_axis else None
    noise = seed_noise(points, factors, seed_factor, metrics) if seed_factor else {}
    out = []
    for factor in factors:
        if factor == seed_factor:
            continue
        levels = list(dict.fromkeys(_level(p, factor) for p in points))
        for level in levels[1:]:
            pairs = twin_pairs(points, factors, factor, levels[0], level)
            for metric in metrics:
                found = _effect(pairs, metric)
                if found is None:
                    continue
                sd = noise[metric]["sd"] / math.sqrt(len(pairs)) if metric in noise else None
                out.append(AxisEffect("+".join(factor), level, levels[0], metric, found[0], len(pairs), sd, found[1]))
    return out

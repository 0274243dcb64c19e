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
    """A value with its standard error over `n` items (`se` is 0 when n < 2)."""

    value: float
    se: float
    n: int

    def beyond(self, k: float = 2.0) -> bool:
        return self.se > 0 and abs(self.value) > k * self.se


@dataclass
class TaskScores:
    """One task of one run: its family, headline metric, and per metric every item's contribution."""

    task: str
    family: str
    headline: str
    items: dict[str, dict[str, ItemScore]]  # metric -> item id -> contribution


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


def paired_effect(pairs: Sequence[tuple[Mapping[str, ItemScore], Mapping[str, ItemScore]]]) -> Estimate:
    """Mean over (reference, other) score maps of `R_other − R_reference`, on the items all of them share; the SE
    is that of the per-item influence differences averaged over the pairs."""
    if not pairs:
        raise UserError("no pairs of points to compare.")
    common = set.intersection(*(set(a) & set(b) for a, b in pairs))
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
    return Estimate(sum(diffs) / k, _se([v / k for v in z_sum.values()]), len(common))


def mean_of(estimates: Sequence[Estimate]) -> Estimate:
    """Mean of estimates over disjoint item sets (independent errors)."""
    k = len(estimates)
    return Estimate(sum(e.value for e in estimates) / k, math.sqrt(sum(e.se ** 2 for e in estimates)) / k,
                    sum(e.n for e in estimates))


def difference(a: Estimate, b: Estimate) -> Estimate:
    """`a − b` for estimates over disjoint item sets."""
    return Estimate(a.value - b.value, math.sqrt(a.se ** 2 + b.se ** 2), a.n + b.n)


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


def _effect(pairs: list[tuple[PointScores, PointScores]], metric: str) -> Estimate | None:
    """Pooled paired effect on a task (`metric` = task name: its headline) or on a summary."""
    if not pairs:
        return None
    if metric not in SUMMARIES:
        if not all(metric in a.tasks and metric in b.tasks for a, b in pairs):
            return None
        return paired_effect([(_headline_items(a.tasks[metric]), _headline_items(b.tasks[metric])) for a, b in pairs])
    if metric == "gap":
        fg, gen = _effect(pairs, "fine_grained"), _effect(pairs, "general")
        return difference(fg, gen) if fg and gen else None
    tasks = sorted(set.intersection(*({n for n, t in p.tasks.items() if t.family == metric}
                                      for a, b in pairs for p in (a, b))))
    effects = [_effect(pairs, t) for t in tasks]
    return mean_of([e for e in effects if e]) if tasks and all(effects) else None


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
                eff = _effect(pairs, metric)
                if eff is None:
                    continue
                sd = noise[metric]["sd"] / math.sqrt(len(pairs)) if metric in noise else None
                out.append(AxisEffect("+".join(factor), level, levels[0], metric, eff, len(pairs), sd))
    return out

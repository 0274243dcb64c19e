"""The report's statistics (vlm.report.effects, vlm.report.findings) on hand-worked cases."""
from __future__ import annotations

import math

import pytest

from vlm.errors import UserError
from vlm.report.effects import (Estimate, PointScores, TaskScores, Unpaired, axis_effects, beyond_noise, difference,
                                estimate, mean_of, paired_effect, point_summary, seed_noise)
from vlm.report.findings import axis_role, findings, stage1_trained_levels


def test_mean_metric_and_its_standard_error():
    e = estimate({"a": 1, "b": 0, "c": 1, "d": 0})
    assert e.value == 0.5 and e.n == 4
    assert e.se == pytest.approx(math.sqrt(1 / 3) / 2)  # sample sd sqrt(1/3), over sqrt(4)


def test_ratio_metric_f1_uses_the_delta_method():
    # POPE-style F1 = sum 2tp / sum (2tp + fp + fn): one tp, one fp, one fn, one tn -> 2/4
    e = estimate({"tp": [2, 2], "fp": [0, 1], "fn": [0, 1], "tn": [0, 0]})
    assert e.value == pytest.approx(0.5)
    # influences (num - R den) / mean(den): 1, -0.5, -0.5, 0 -> sample var 0.5 -> se sqrt(0.5 / 4)
    assert e.se == pytest.approx(math.sqrt(0.5 / 4))


def test_weighted_items_give_the_mean_of_subset_means():
    # subset X: two items weight 1/2; subset Y: one item weight 1 -> (0.5 + 1.0) / 2
    assert estimate({"x1": [0.5, 0.5], "x2": [0.0, 0.5], "y1": [1.0, 1.0]}).value == pytest.approx(0.75)


def test_paired_effect_uses_the_per_item_differences():
    a = {"1": 1, "2": 0, "3": 1, "4": 0}
    b = {"1": 1, "2": 1, "3": 1, "4": 0}
    e = paired_effect([(a, b)])
    assert e.value == pytest.approx(0.25)
    assert e.se == pytest.approx(0.25)  # differences 0,1,0,0: sd 0.5, over sqrt(4)
    # unpaired, each run alone has SE ~0.25-0.29: pairing is what resolves small effects
    assert paired_effect([(a, b), (a, a)]).value == pytest.approx(0.125)


def test_paired_effect_on_disjoint_items_is_an_error():
    with pytest.raises(UserError, match="share no eval items"):
        paired_effect([({"1": 1}, {"2": 1})])


def test_combining_independent_estimates():
    m = mean_of([Estimate(0.4, 0.03, 100), Estimate(0.6, 0.04, 50)])
    assert (m.value, m.se, m.n) == (pytest.approx(0.5), pytest.approx(0.025), 150)
    d = difference(Estimate(0.4, 0.03, 100), Estimate(0.6, 0.04, 50))
    assert (d.value, d.se) == (pytest.approx(-0.2), pytest.approx(0.05))


def _point(pid, labels, fg, gen):
    return PointScores(pid, labels, {
        "birds": TaskScores("birds", "fine_grained", "acc", {"acc": dict(enumerate(fg))}),
        "vqa": TaskScores("vqa", "general", "acc", {"acc": dict(enumerate(gen))}),
    })


def test_point_summary_fine_general_gap():
    s = point_summary(_point("p", {}, [1, 1, 0, 0], [1, 1, 1, 0]))
    assert s["fine_grained"].value == 0.5 and s["general"].value == 0.75
    assert s["gap"].value == pytest.approx(-0.25)
    assert s["gap"].se == pytest.approx(math.sqrt(s["fine_grained"].se ** 2 + s["general"].se ** 2))


def test_missing_headline_scores_are_an_error():
    p = PointScores("p", {}, {"birds": TaskScores("birds", "fine_grained", "acc", {"other": {"1": 1}})})
    with pytest.raises(UserError, match="no per-item scores for its headline"):
        point_summary(p)


def _grid():
    """enc (a, b) x seed (0, 1): encoder b is better on 8 fine-grained items, the same on general."""
    fg_a = [0] * 8 + [1] * 12
    fg_b = [1] * 8 + [1] * 12
    gen = [1, 0] * 10
    pts = [
        _point("a0", {"enc": "a", "seed": "0"}, fg_a, gen),
        _point("b0", {"enc": "b", "seed": "0"}, fg_b, gen),
        _point("a1", {"enc": "a", "seed": "1"}, fg_a[:1] + [1] + fg_a[2:], gen),  # seed 1 moves one item
        _point("b1", {"enc": "b", "seed": "1"}, fg_b, gen),
    ]
    return pts, [["enc"], ["seed"]]


def test_axis_effects_pool_pairs_and_measure_seed_noise():
    pts, factors = _grid()
    noise = seed_noise(pts, factors, ["seed"], ["fine_grained"])
    # seed 1 - seed 0: a: +1/20, b: 0 -> RMS sqrt((0.05^2 + 0) / 2)
    assert noise["fine_grained"]["sd"] == pytest.approx(math.sqrt(0.05 ** 2 / 2))
    effects = {(e.axis, e.metric): e for e in axis_effects(pts, factors, seed_axis="seed")}
    assert ("seed", "fine_grained") not in effects  # the seed axis is noise, not an effect
    fg = effects[("enc", "fine_grained")]
    # pair seed 0: +8/20; pair seed 1: +7/20 -> 0.375; per-item differences averaged over pairs: 7 x 1, 1 x 0.5
    assert fg.effect.value == pytest.approx(0.375) and fg.pairs == 2
    d = [1.0] * 7 + [0.5] + [0.0] * 12
    m = sum(d) / 20
    assert fg.effect.se == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in d) / 19 / 20))
    assert fg.seed_sd == pytest.approx(noise["fine_grained"]["sd"] / math.sqrt(2))
    assert fg.marked
    assert effects[("enc", "general")].effect.value == 0 and not effects[("enc", "general")].marked
    assert effects[("enc", "gap")].effect.value == pytest.approx(0.375)


def test_beyond_noise_needs_both_noises():
    e = Estimate(0.1, 0.04, 100)
    assert beyond_noise(e, None) and beyond_noise(e, 0.049)
    assert not beyond_noise(e, 0.05)            # 0.1 is not > 2 x 0.05
    assert not beyond_noise(Estimate(0.1, 0.05, 100), None)


def test_axis_roles_from_changed_keys():
    assert axis_role(["model.encoder"], "align") == "encoder"
    assert axis_role(["model.encoder", "model.connector.factor"], "align") == "encoder"
    assert axis_role(["model.llm"], "align") == "llm"
    assert axis_role(["stages.align.freeze.llm"], "align") == "stage1_llm"
    assert axis_role(["stages.finetune.freeze.llm"], "align") is None
    assert axis_role(["stages.align.data"], "align") == "captions"
    assert axis_role(["datasets.captions.file"], "align") == "captions"
    assert axis_role(["run.seed"], "align") == "seed"
    assert stage1_trained_levels({"frozen": {"mode": "frozen"}, "unfrozen": {"mode": "full", "lr": 5e-5},
                                  "lora": {"mode": "lora"}}) == {"unfrozen", "lora"}


def test_findings_on_a_hand_worked_grid():
    pts, factors = _grid()
    effects = axis_effects(pts, factors, seed_axis="seed")
    out = {f.claim.split()[2]: f for f in findings(effects, {"enc": "encoder", "seed": "seed"}, {})}
    enc = out["vision"]
    assert enc.verdict == "supports" and enc.axis == "enc" and "+0.375" in enc.evidence
    stage1 = out["LLM"]
    assert stage1.verdict == "cannot tell" and "no axis" in stage1.evidence


def test_stage1_finding_orients_by_the_trained_level():
    # reference is the trained level here: the frozen level is worse, so training helps
    pts = [_point("t", {"s1": "unfrozen"}, [1] * 15 + [0] * 5, [1, 0] * 10),
           _point("f", {"s1": "frozen"}, [0] * 15 + [0] * 5, [1, 0] * 10)]
    effects = axis_effects(pts, [["s1"]])
    f = findings(effects, {"s1": "stage1_llm"}, {"s1": {"unfrozen"}})[1]
    assert f.verdict == "supports", f.evidence


def test_captions_finding_needs_a_resolved_small_effect():
    same = [1, 0] * 200
    pts = [_point("d", {"cap": "dense"}, same, same), _point("c", {"cap": "coarse"}, same, same)]
    f = findings(axis_effects(pts, [["cap"]]), {"cap": "captions"}, {})[2]
    assert f.verdict == "supports"  # the same answer on all 400 items: a resolved zero effect
    noisy = [_point("d", {"cap": "dense"}, [1, 0] * 5, [1, 0] * 5), _point("c", {"cap": "coarse"}, [0, 1] * 5, [0, 1] * 5)]
    f = findings(axis_effects(noisy, [["cap"]]), {"cap": "captions"}, {})[2]
    assert f.verdict == "cannot tell", f.evidence  # Δ 0 but every item flipped: ± 2 SE spans far beyond 0.05
    shifted = [1] * 300 + [0] * 100
    pts[1] = _point("c", {"cap": "coarse"}, [1, 0] * 200, shifted)
    pts[0] = _point("d", {"cap": "dense"}, [1, 0] * 200, [1, 0] * 200)
    f = findings(axis_effects(pts, [["cap"]]), {"cap": "captions"}, {})[2]
    assert f.verdict == "contradicts", f.evidence


# ---------------------------------------------------------------- items one point evaluated and another did not


def test_paired_effect_counts_the_items_it_could_not_pair():
    a = {"1": 1, "2": 0, "3": 1, "4": 0, "5": 1}
    b = {"1": 1, "2": 1, "3": 1, "4": 0, "6": 0, "7": 1}  # no item 5; items 6 and 7 are b's alone
    e = paired_effect([(a, b)])
    # paired on 1-4 only: the effect of test_paired_effect_uses_the_per_item_differences, unchanged
    assert (e.value, e.se, e.n) == (pytest.approx(0.25), pytest.approx(0.25), 4)
    assert e.unpaired == (1, 2)
    assert paired_effect([(a, a)]).unpaired == (0, 0)


def test_axis_effect_on_fewer_items_says_how_many_and_which_points():
    """Point b evaluated the fine-grained task on its first 16 of 20 items (another `limit`): the effect is on
    those 16, n says so, and the pair is named with each side's unpaired count; general is untouched."""
    fg_a, fg_b, gen = [0] * 8 + [1] * 12, [1] * 20, [1, 0] * 10
    a = _point("a", {"enc": "a"}, fg_a, gen)
    b = _point("b", {"enc": "b"}, fg_b, gen)
    b.tasks["birds"].items["acc"] = {i: 1 for i in range(16)}
    effects = {e.metric: e for e in axis_effects([a, b], [["enc"]])}
    birds = effects["birds"]
    # items 0-15: a right on 8-15, b on all -> +8/16; per-item differences 8 x 1, 8 x 0: each 0.5 from the mean,
    # sample variance 16 x 0.25 / 15, over 16 items
    assert birds.effect.value == pytest.approx(0.5) and birds.effect.n == 16
    assert birds.effect.se == pytest.approx(math.sqrt(16 * 0.25 / 15 / 16))
    assert birds.effect.unpaired == (4, 0)
    assert birds.unpaired == (Unpaired("birds", "a", "b", 16, 4, 0),)
    assert effects["fine_grained"].unpaired == birds.unpaired and effects["fine_grained"].effect.unpaired == (4, 0)
    assert effects["gap"].unpaired == birds.unpaired
    assert effects["vqa"].unpaired == () and effects["vqa"].effect.n == 20 and effects["vqa"].effect.unpaired == (0, 0)
    assert effects["general"].effect.n == 20 and effects["gap"].effect.n == 36


def test_the_same_task_on_different_data_is_an_error():
    a = _point("enc=a", {"enc": "a"}, [1, 0, 1, 0], [1, 0, 1, 0])
    b = _point("enc=b", {"enc": "b"}, [1, 1, 1, 0], [1, 0, 1, 0])
    a.tasks["birds"].config = {"name": "birds", "type": "classification", "hf": "cub", "limit": 4}
    b.tasks["birds"].config = {"name": "birds", "type": "classification", "hf": "cub", "limit": 8}
    assert axis_effects([a, b], [["enc"]])  # another limit is not another data set (its items are noted, not an error)
    b.tasks["birds"].config = {"name": "birds", "type": "classification", "hf": "nabirds", "limit": 4}
    with pytest.raises(UserError, match=r"(?s)task 'birds' was evaluated on different data by the points enc=a and "
                                        r"enc=b.*hf: 'cub' vs 'nabirds'.*enc=a/eval/birds/task.json.*vlm eval"):
        axis_effects([a, b], [["enc"]])
    # seed twins are compared too (the seed noise assumes the same items)
    a2 = _point("s1", {"enc": "a", "seed": "1"}, [1, 0, 1, 0], [1, 0, 1, 0])
    a.labels["seed"], a2.tasks["birds"].config = "0", b.tasks["birds"].config
    with pytest.raises(UserError, match="different data"):
        seed_noise([a, a2], [["enc"], ["seed"]], ["seed"], ["fine_grained"])


def test_no_shared_items_names_the_task_and_points():
    a = _point("a", {"enc": "a"}, [1, 0], [1, 0])
    b = _point("b", {"enc": "b"}, [1, 0], [1, 0])
    b.tasks["birds"].items["acc"] = {"x": 1, "y": 0}
    with pytest.raises(UserError, match="task 'birds': the compared points \\(a vs b\\) share no eval item ids"):
        axis_effects([a, b], [["enc"]])

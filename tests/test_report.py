"""`vlm report`: paired axis effects with their SEs (hand-worked), findings, CSV/markdown coverage of failed and
missing runs, and the self-contained HTML rendered in headless Chromium with every plot loaded."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from vlm.errors import UserError
from vlm.io import append_jsonl, atomic_write_json
from vlm.report.collect import collect
from vlm.report.effects import AxisEffect, axis_effects
from vlm.report.render import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
AXES = {"enc": ["a", "b"], "llm": ["x", "y"], "pt": ["p", "q"]}
FAILED, MISSING = "enc=b,llm=y,pt=q", "enc=a,llm=x,pt=q"


def scores(enc: str, llm: str, pt: str) -> tuple[float, float]:
    """A better encoder lifts fine-grained most, a better LLM lifts general most, with an enc×llm interaction."""
    b, y, q = enc == "b", llm == "y", pt == "q"
    return 0.3 + 0.2 * b + 0.05 * y + 0.01 * q + 0.1 * b * y, 0.5 + 0.02 * b + 0.1 * y


ITEMS = 100


def item_scores(score: float) -> dict[str, float]:
    """100 items, the first round(100 x score) right: nested sets, so paired differences are hand-countable."""
    k = round(score * ITEMS)
    return {f"q{i:03d}": float(i < k) for i in range(ITEMS)}


def write_run(run: Path, fine: float, general: float, probe: float = 0.9) -> None:
    tasks = {"flowers": ("fine_grained", "classification", "mc_acc", fine,
                         {"mc_acc": fine, "open_acc": fine / 2, "likelihood_sum_top1": fine / 3}),
             "pets": ("fine_grained", "classification", "mc_acc", fine - 0.1, {"mc_acc": fine - 0.1}),
             "flowers_probe": ("probe", "linear_probe", "acc", probe, {"acc": probe, "top5": 1.0}),
             "vqav2": ("general", "vqav2", "acc", general, {"acc": general})}
    summary = {}
    for name, (family, typ, head, score, metrics) in tasks.items():
        res = {"task": name, "type": typ, "family": family, "headline": head, "score": score, "num_items": 5,
               "metrics": metrics}
        atomic_write_json(run / "eval" / name / "results.json", res)
        atomic_write_json(run / "eval" / name / "item_scores.json", {
            "task": name, "family": family, "headline": head, "scores": {head: item_scores(score)}})
        summary[name] = {k: v for k, v in res.items() if k != "task"}
    fg = (fine + fine - 0.1) / 2  # the mean of the fine-grained tasks' headlines, as eval.runner.summarize
    atomic_write_json(run / "results.json", {"tasks": summary, "fine_grained": fg, "general": general,
                                             "gap": fg - general})
    (run / "recipe.yaml").write_text(
        "eval:\n  tasks:\n    - {type: classification, name: flowers, hf: nelorth/oxford-flowers}\n"
        "    - {type: classification, name: pets, hf: pets}\n"
        "    - {type: linear_probe, name: flowers_probe, hf: nelorth/oxford-flowers}\n"
        "    - {type: vqav2, name: vqav2}\n")
    for step in (10, 20, 30):
        append_jsonl(run / "metrics.jsonl", {"stage": "finetune", "step": step, "loss": 1.0 / step})
        append_jsonl(run / "metrics.jsonl", {"stage": "finetune", "step": step, "global_step": step,
                                             "eval": {"flowers": fine * step / 30}})


def make_grid_dir(root: Path) -> Path:
    """A grid dir as `vlm grid` leaves it: 8 points, one failed, one never started."""
    points = []
    for enc in AXES["enc"]:
        for llm in AXES["llm"]:
            for pt in AXES["pt"]:
                pid = f"enc={enc},llm={llm},pt={pt}"
                points.append({"id": pid, "labels": {"enc": enc, "llm": llm, "pt": pt}, "overrides": {}})
                if pid == MISSING:
                    continue
                rec = {"state": "done", "attempts": 1}
                if pid == FAILED:
                    rec = {"state": "failed", "attempts": 1, "error": "train exited with code 1 (CUDA OOM)"}
                else:
                    write_run(root / pid, *scores(enc, llm, pt))
                atomic_write_json(root / "_grid" / "points" / f"{pid}.json", rec)
    atomic_write_json(root / "_grid" / "plan.json", {"name": "toy", "axes": list(AXES), "groups": [[a] for a in AXES],
                                                     "points": points, "base": "x.yaml"})
    return root


def _effects(root: Path) -> dict[tuple[str, str, str], AxisEffect]:
    data = collect(root)
    return {(e.axis, e.level, e.metric): e for e in axis_effects(data.finished, data.factors, data.seed_axis)}


def test_axis_effects_are_mean_paired_differences(tmp_path):
    effects = _effects(make_grid_dir(tmp_path))
    # enc b vs a: pairs (llm, pt) = (x,p): +0.2 and (y,p): +0.3 (interaction); (x,q) missing, (y,q) failed
    fg = effects[("enc", "b", "fine_grained")]
    assert fg.effect.value == pytest.approx(0.25) and fg.pairs == 2 and fg.reference == "a"
    # flowers, first k items right: (x,p) a 30 -> b 50, (y,p) a 35 -> b 65; per item averaged over the 2 pairs:
    # items 35-49 move in both (1.0), 30-34 and 50-64 in one (0.5); pets is the same shape 10 items lower
    d = [1.0] * 15 + [0.5] * 20 + [0.0] * 65
    m = sum(d) / 100
    se_task = (sum((x - m) ** 2 for x in d) / 99 / 100) ** 0.5
    assert fg.effect.se == pytest.approx((2 * se_task ** 2) ** 0.5 / 2)  # mean of flowers and pets (same shape)
    assert effects[("enc", "b", "general")].effect.value == pytest.approx(0.02)
    gap = effects[("enc", "b", "gap")]
    assert gap.effect.value == pytest.approx(0.23)
    assert gap.effect.se == pytest.approx((fg.effect.se ** 2 + effects[("enc", "b", "general")].effect.se ** 2) ** 0.5)
    # llm y vs x: (a,p): +0.05, (b,p): +0.15; general +0.1 everywhere
    assert effects[("llm", "y", "fine_grained")].effect.value == pytest.approx(0.10)
    assert effects[("llm", "y", "general")].effect.value == pytest.approx(0.1)
    assert effects[("pt", "q", "fine_grained")].effect.value == pytest.approx(0.01)
    assert effects[("pt", "q", "general")].pairs == 2
    # per task too: flowers' headline moves like fine_grained here
    assert effects[("enc", "b", "flowers")].effect.value == pytest.approx(0.25)


def test_zipped_axes_form_one_factor(tmp_path):
    root = make_grid_dir(tmp_path)
    plan = json.loads((root / "_grid" / "plan.json").read_text())
    plan["groups"] = [["enc", "llm"], ["pt"]]
    atomic_write_json(root / "_grid" / "plan.json", plan)
    effects = _effects(root)
    assert sorted({(a, lv) for a, lv, _ in effects}) == [("enc+llm", "a+y"), ("enc+llm", "b+x"), ("enc+llm", "b+y"),
                                                        ("pt", "q")]
    # b+y vs a+x at pt=p only (a+x at q is missing): 0.2 + 0.05 + 0.1
    by = effects[("enc+llm", "b+y", "fine_grained")]
    assert by.effect.value == pytest.approx(0.35) and by.pairs == 1


def test_missing_item_scores_are_an_error(tmp_path):
    root = make_grid_dir(tmp_path)
    (root / "enc=a,llm=x,pt=p" / "eval" / "pets" / "item_scores.json").unlink()
    with pytest.raises(UserError, match="no item_scores.json.*vlm eval"):
        collect(root)


def test_axis_roles_come_from_what_the_axis_changes(tmp_path):
    root = make_grid_dir(tmp_path)
    plan = json.loads((root / "_grid" / "plan.json").read_text())
    for p in plan["points"]:
        lab = p["labels"]
        p["overrides"] = {"model.encoder": {"type": lab["enc"]}, "model.llm": {"path": lab["llm"]},
                          "stages.align.freeze.llm": {"mode": "frozen" if lab["pt"] == "p" else "full"}}
    atomic_write_json(root / "_grid" / "plan.json", plan)
    for p in plan["points"]:
        if (root / p["id"]).exists():
            (root / p["id"] / "recipe.yaml").write_text("stages:\n  align: {}\n  finetune: {}\n")
    data = collect(root)
    assert data.roles == {"enc": "encoder", "llm": "llm", "pt": "stage1_llm"}
    assert data.trained_levels == {"pt": {"q"}}


def test_report_files_cover_every_run(tmp_path):
    root = make_grid_dir(tmp_path)
    out = build_report(root)
    with open(root / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8  # failed and missing runs are rows too
    by = {r["run_id"]: r for r in rows}
    assert by[FAILED]["state"] == "failed" and "CUDA OOM" in by[FAILED]["error"] and by[FAILED]["fine_grained"] == ""
    assert by[MISSING]["state"] == "pending"
    ok = by["enc=b,llm=y,pt=p"]
    assert (ok["enc"], ok["llm"], ok["pt"]) == ("b", "y", "p")
    assert float(ok["fine_grained"]) == pytest.approx(0.60) and float(ok["general"]) == pytest.approx(0.62)
    # SE of flowers (65/100 right) sqrt(.65 x .35 / 99), of pets (55/100) sqrt(.55 x .45 / 99): fine_grained's is
    # sqrt(sum of squares) / 2
    se_fg = ((0.65 * 0.35 / 99) + (0.55 * 0.45 / 99)) ** 0.5 / 2
    assert float(ok["fine_grained_se"]) == pytest.approx(se_fg)
    assert float(ok["flowers.open_acc"]) == pytest.approx(0.325) and float(ok["vqav2.score"]) == pytest.approx(0.62)
    md = (root / "report.md").read_text()
    assert "8 planned runs: 6 finished with results, 2 missing or failed." in md
    for title in ("Axis effects", "Axis effects per task", "Findings", "Tasks and their headline metrics",
                  "Per dataset — fine-grained classification", "Per dataset — general VQA",
                  "Per protocol", "Protocol open (open_acc)", "Encoder ceilings", "Missing or failed runs"):
        assert title in md, title
    assert "`" not in "".join(line for line in md.splitlines() if line.startswith("#"))  # no literal backticks
    # each point's summary with its SE; enc b vs a on fine-grained with its SE, no seed axis so no seed noise
    assert "| enc=b,llm=y,pt=p | done | b | y | p | 0.600 ± 0.035 | 0.620 ± 0.049 | -0.020 ± 0.060 |" in md
    # general: items 50-51 and 60-61 move in one pair each (0.5): SE sqrt((4 x .48² + 96 x .02²) / 99 / 100) = 0.010
    assert "| enc | – | b vs a | +0.250 ± 0.026 * | +0.020 ± 0.010 * | +0.230 ± 0.028 * | – / – | 2 |" in md
    assert "| mc_acc |" in md and "| flowers | fine-grained classification | classification | mc_acc |" in md
    problems = md[md.index("## Missing or failed runs"):]
    assert FAILED in problems and MISSING in problems and "CUDA OOM" in problems
    # the probe pairs with the VLM task on the same data source: 0.9 vs flowers' mc_acc 0.65
    assert "| enc=b,llm=y,pt=p | flowers | flowers_probe | 0.900 | 0.650 | mc_acc | 0.250 |" in md
    assert set(out) >= {"fine-grained vs general", "axis effects: fine-grained next to general", "linear-probe ceiling",
                        "training dynamics"}
    assert sorted(p.name for p in (root / "plots").iterdir()) == [
        "axis_effects.png", "dynamics.png", "fine_vs_general.png", "probe_ceiling.png"]
    html = (root / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "plots/" not in html  # self-contained


def test_report_of_an_empty_grid_lists_every_point_as_missing(tmp_path):
    root = tmp_path
    points = [{"id": f"a={v}", "labels": {"a": v}, "overrides": {}} for v in ("1", "2")]
    atomic_write_json(root / "_grid" / "plan.json", {"name": "e", "axes": ["a"], "groups": [["a"]], "points": points})
    build_report(root)
    md = (root / "report.md").read_text()
    assert "2 planned runs: 0 finished with results, 2 missing or failed." in md
    assert md.count("| pending |") >= 2 and not (root / "plots").exists()
    assert "Findings" not in md or "cannot tell" in md


def test_no_problems_table_when_every_run_finished(tmp_path):
    root = make_grid_dir(tmp_path)
    plan = json.loads((root / "_grid" / "plan.json").read_text())
    plan["points"] = [p for p in plan["points"] if p["id"] not in (FAILED, MISSING)]
    atomic_write_json(root / "_grid" / "plan.json", plan)
    build_report(root)
    assert "Missing or failed runs" not in (root / "report.md").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_html_report_renders_its_plots_in_headless_chromium(tmp_path):
    root = make_grid_dir(tmp_path / "grid")
    build_report(root)
    # A copy of the page with a probe script: after load it writes how many images decoded with a real size.
    probe = ("<script>window.addEventListener('load', () => { const im = [...document.images];"
             "document.body.insertAdjacentHTML('beforeend', '<pre id=\"imgcheck\">' +"
             "im.filter(i => i.complete && i.naturalWidth > 100).length + '/' + im.length + '</pre>'); });</script>")
    page = tmp_path / "check.html"
    page.write_text((root / "report.html").read_text().replace("</body>", probe + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert '<pre id="imgcheck">4/4</pre>' in dom, dom[-2000:]
    assert "Missing or failed runs" in dom and FAILED in dom


def test_dynamics_include_a_reused_stage_1_from_its_artifact(tmp_path):
    """A run that reused a shared stage-1 artifact has no stage-1 records of its own; the artifact carries them."""
    root = make_grid_dir(tmp_path)
    art = tmp_path / "store" / "align-abc"
    art.mkdir(parents=True)
    (art / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"stage": "align", "step": 5, "eval": {"flowers": 0.2}}, {"stage": "align", "step": 8, "eval": {"flowers": 0.25}})))
    run = root / "enc=a,llm=x,pt=p"
    atomic_write_json(run / "stages" / "align" / "artifact.json", {"key": "abc", "path": str(art)})
    row = next(r for r in collect(root).rows if r.id == run.name)
    align = [(d["step"], d["align: flowers"]) for d in row.dynamics if "align: flowers" in d]
    assert align == [(5, 0.2), (8, 0.25)]  # the last step of the stage is there too
    assert [d["step"] for d in row.dynamics if "finetune: flowers" in d] == [10, 20, 30]


def test_report_prints_items_paired_and_notes_unpaired_items(tmp_path):
    """One point evaluated flowers on 80 of its 100 items (another `limit`): the effects that involve it pair the
    80, print n, and a note under the tables names the points, the task and each side's unpaired count."""
    root = make_grid_dir(tmp_path)
    build_report(root)
    md = (root / "report.md").read_text()
    # every item paired: the numbers of test_report_files_cover_every_run, now with n (flowers + pets / vqav2)
    assert "| enc | – | b vs a | +0.250 ± 0.026 * | +0.020 ± 0.010 * | +0.230 ± 0.028 * | – / – | 2 | 200 / 100 |" in md
    assert "| enc=b,llm=y,pt=p | done | b | y | p | 0.600 ± 0.035 | 0.620 ± 0.049 | -0.020 ± 0.060 | 200 / 100 |" in md
    assert "Unpaired" not in md
    short = root / "enc=b,llm=x,pt=p" / "eval" / "flowers" / "item_scores.json"
    doc = json.loads(short.read_text())
    doc["scores"]["mc_acc"] = {k: v for k, v in doc["scores"]["mc_acc"].items() if int(k[1:]) < 80}
    atomic_write_json(short, doc)
    build_report(root)
    md = (root / "report.md").read_text()
    # enc b vs a on flowers, items q000-q079 of both pairs: (x,p) 30 -> 50 right, (y,p) 35 -> 65: (20 + 30) / 2 / 80;
    # per item over the 2 pairs: 35-49 move in both (1.0), 30-34 and 50-64 in one (0.5), 65-79 in none
    d = [1.0] * 15 + [0.5] * 20 + [0.0] * 45
    m = sum(d) / 80
    se = (sum((x - m) ** 2 for x in d) / 79 / 80) ** 0.5
    assert m == pytest.approx(0.3125)
    assert f"| enc | b vs a | flowers | +0.312 ± {se:.3f} * | – | 80 | 2 |" in md
    # pets: every item paired, as in test_axis_effects_are_mean_paired_differences (flowers' shape 10 items lower)
    d = [1.0] * 15 + [0.5] * 20 + [0.0] * 65
    se = (sum((x - 0.25) ** 2 for x in d) / 99 / 100) ** 0.5
    assert f"| enc | b vs a | pets | +0.250 ± {se:.3f} * | – | 100 | 2 |" in md
    assert "| – / – | 2 | 180 / 100 |" in md
    b, a, by, ay = "enc=b,llm=x,pt=p", "enc=a,llm=x,pt=p", "enc=b,llm=y,pt=p", "enc=a,llm=y,pt=p"
    notes = [line for line in md.splitlines() if line.startswith("> **Note.** Unpaired items")]
    # the pair with the short point: 20 of a's items; the other pair of the pooled effect loses the same 20 on
    # both sides (a pooled effect pairs the items every compared point holds)
    assert f"> **Note.** Unpaired items: task flowers, {b} vs {a}: 80 items paired; 20 of {a}'s and 0 of {b}'s items " \
           "left out" in md
    assert f"task flowers, {by} vs {ay}: 80 items paired; 20 of {ay}'s and 20 of {by}'s items left out" in md
    assert len(notes) == 2 * 6  # under both effect tables: enc's 2 pairs, llm's 2 (b,x,p the reference of one), pt's 2
    effects_part = md[md.index("## Axis effects: paired"):md.index("## Axis effects per task")]
    assert f"task flowers, {b} vs {a}" in effects_part  # under the headline table too, not only the per-task one
    html = (root / "report.html").read_text()
    assert f"<p class='note'><b>Note.</b> Unpaired items: task flowers, {b} vs {a}: 80 items paired" in html


def test_report_of_one_task_on_different_data_exits_2(tmp_path, capsys):
    from vlm.cli import main

    root = make_grid_dir(tmp_path)
    for pid, hf in (("enc=a,llm=x,pt=p", "nelorth/oxford-flowers"), ("enc=b,llm=x,pt=p", "other/flowers")):
        atomic_write_json(root / pid / "eval" / "flowers" / "task.json",
                          {"config": {"type": "classification", "name": "flowers", "hf": hf}, "fingerprint": "x"})
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert "task 'flowers' was evaluated on different data" in err and "Traceback" not in err
    assert "'nelorth/oxford-flowers' vs 'other/flowers'" in err and "vlm eval RUN_DIR --overwrite" in err

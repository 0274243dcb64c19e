"""A grid report (`vlm report GRID_DIR`): results.csv, report.md, a self-contained report.html and plots/*.png.

Every planned point appears in every table, with its state; runs that are missing or failed are listed as
such and never dropped. Every score carries its standard error over eval items and every axis effect is a
paired difference with its noise (`vlm.report.effects`); `vlm.report.findings` judges the seed papers' claims.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from vlm.io import atomic_write_bytes, atomic_write_text
from vlm.report import plots as report_plots
from vlm.report.collect import HEADLINE, PROTOCOL_METRICS, Collected, collect
from vlm.report.effects import AxisEffect, Estimate, Unpaired, axis_effects, point_summary, seed_noise
from vlm.report.findings import Finding, findings


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_csv(data: Collected, summaries: dict[str, dict[str, Estimate]], path: Path) -> None:
    metric_cols = sorted({k for r in data.rows for k in r.metrics} - set(HEADLINE))
    cols = ["run_id", "state", *data.axes, *HEADLINE, *(f"{k}_se" for k in HEADLINE), *metric_cols, "error"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in data.rows:
        ses = [summaries[r.id][k].se if r.id in summaries and k in summaries[r.id] else "" for k in HEADLINE]
        w.writerow([r.id, r.state, *(r.labels.get(a, "") for a in data.axes),
                    *(r.metrics.get(k, "") for k in HEADLINE), *ses, *(r.metrics.get(k, "") for k in metric_cols),
                    (r.error or "").replace("\n", " ")])
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------- tables


class Table(NamedTuple):
    title: str
    header: list[str]
    rows: list[list[Any]]
    notes: Sequence[str] = ()  # printed under the table (e.g. items a paired effect could not pair)


def _pm(e: Estimate | None) -> str | None:
    return None if e is None else f"{e.value:.3f} ± {e.se:.3f}"


def _items(*estimates: Estimate | None) -> str:
    return " / ".join("–" if e is None else str(e.n) for e in estimates)


def overview_table(data: Collected, summaries: dict[str, dict[str, Estimate]]) -> Table:
    """Every planned point: its state and fine-grained, general and gap, each ± its SE over eval items, and how
    many items each summary holds."""
    header = ["run", "state", *data.axes, "fine-grained", "general", "gap", "items (fg / gen)"]
    rows = []
    for r in data.rows:
        s = summaries.get(r.id, {}) if r.ok else {}
        rows.append([r.id, r.state, *(r.labels[a] for a in data.axes), *(_pm(s.get(k)) for k in HEADLINE),
                     _items(s.get("fine_grained"), s.get("general")) if s else None])
    return Table("Runs (mean ± standard error over eval items)", header, rows)


def unpaired_notes(effects: Sequence[AxisEffect]) -> list[str]:
    """One line per compared pair of points and task whose paired effect left items out."""
    seen: dict[tuple[str, str, str], Unpaired] = {}
    for e in effects:
        for u in e.unpaired:
            seen.setdefault((u.task, u.reference, u.other), u)
    return [f"Unpaired items: task {u.task}, {u.other} vs {u.reference}: {u.n} items paired; "
            f"{u.only_reference} of {u.reference}'s and {u.only_other} of {u.other}'s items left out, because not "
            "every compared point evaluated them (evaluate the points on the same items, e.g. the same limit, to "
            "use them all)." for u in seen.values()]


def _effect_cell(e: AxisEffect | None) -> str | None:
    if e is None:
        return None
    return f"{e.effect.value:+.3f} ± {e.effect.se:.3f}" + (" *" if e.marked else "")


def effects_table(data: Collected, effects: list[AxisEffect]) -> Table:
    """Per axis and level: its effect on fine-grained next to its effect on general (and on the gap) — the
    comparison the study is about — with the seed noise, the number of point pairs and of items paired."""
    seeded = data.seed_axis is not None
    rule = ("* = |Δ| > 2 SE over items and > 2 × seed noise" if seeded else
            "* = |Δ| > 2 SE over items; no seed axis, so training noise is not measured")
    header = ["axis", "role", "level vs reference", "Δ fine-grained", "Δ general", "Δ gap", "seed noise (fg / gen)",
              "point pairs", "items paired (fg / gen)"]
    rows = []
    for axis, level, ref in dict.fromkeys((e.axis, e.level, e.reference) for e in effects):
        get = {e.metric: e for e in effects if (e.axis, e.level) == (axis, level)}
        fg, gen = get.get("fine_grained"), get.get("general")
        noise = " / ".join("–" if x is None or x.seed_sd is None else f"{x.seed_sd:.3f}" for x in (fg, gen))
        pairs = next(iter(get.values())).pairs
        rows.append([axis, data.roles.get(axis) or "–", f"{level} vs {ref}", _effect_cell(fg), _effect_cell(gen),
                     _effect_cell(get.get("gap")), noise, pairs, _items(*(x and x.effect for x in (fg, gen)))])
    shown = [e for e in effects if e.metric in HEADLINE]
    return Table(f"Axis effects: paired change when only this axis changes ({rule})", header, rows,
                 unpaired_notes(shown))


def task_effects_table(effects: list[AxisEffect]) -> Table:
    rows = [[e.axis, f"{e.level} vs {e.reference}", e.metric, _effect_cell(e),
             "–" if e.seed_sd is None else f"{e.seed_sd:.3f}", e.effect.n, e.pairs]
            for e in effects if e.metric not in HEADLINE]
    return Table("Axis effects per task (headline metric; * as above)",
                 ["axis", "level vs reference", "task", "Δ", "seed noise", "items paired", "point pairs"], rows,
                 unpaired_notes([e for e in effects if e.metric not in HEADLINE]))


def seed_noise_table(data: Collected) -> Table:
    """Per summary: how much a point moves when only its seed changes (each pair's difference and their RMS)."""
    if data.seed_axis is None:
        return Table("Seed noise", [], [])
    seed_factor = next(f for f in data.factors if data.seed_axis in f)
    noise = seed_noise(data.finished, data.factors, seed_factor, HEADLINE)
    rows = [[m, ", ".join(f"{d:+.3f}" for d in n["diffs"]), f"{n['sd']:.3f}", n["pairs"]] for m, n in noise.items()]
    return Table("Seed noise (a point trained again with another seed − the same point, same items)",
                 ["summary", "per-pair differences", "sd of a difference (RMS)", "pairs"], rows)


def summary_tables(data: Collected) -> list[Table]:
    """Points ± SE, seed noise, findings and axis effects: the statistics `vlm report` and `vlm demo` both print."""
    summaries = {p.id: point_summary(p) for p in data.finished}
    effects = axis_effects(data.finished, data.factors, data.seed_axis)
    tables = [overview_table(data, summaries), seed_noise_table(data),
              findings_table(findings(effects, data.roles, data.trained_levels)), effects_table(data, effects),
              task_effects_table(effects)]
    return [t for t in tables if t[2]]


def findings_table(found: list[Finding]) -> Table:
    rows = [[f.claim, f.axis or "–", f.verdict, f.evidence] for f in found]
    return Table("Findings: does this grid support the seed papers' claims?", ["claim", "axis", "verdict", "evidence"],
                 rows)


def tasks_table(data: Collected) -> Table:
    """Which metric is each task's headline (the number its family's summary averages)."""
    seen: dict[str, list[Any]] = {}
    for r in data.rows:
        for name, t in r.tasks.items():
            seen.setdefault(name, [name, FAMILIES.get(t["family"], t["family"]), t["type"], t["headline"]])
    return Table("Tasks and their headline metrics", ["task", "family", "type", "headline metric"], list(seen.values()))


FAMILIES = {"fine_grained": "fine-grained classification", "general": "general VQA", "diagnostic": "fine-grained diagnostics",
            "probe": "linear probes"}


def _missing(r) -> str | None:
    return None if r.state == "done" else r.state


def dataset_tables(data: Collected) -> list[Table]:
    """One table per task family: runs × tasks (datasets), each cell the task's headline score."""
    tables = []
    families = list(dict.fromkeys(t["family"] for r in data.rows for t in r.tasks.values()))
    for fam in sorted(families, key=lambda f: list(FAMILIES).index(f) if f in FAMILIES else 99):
        tasks = sorted({n for r in data.rows for n, t in r.tasks.items() if t["family"] == fam})
        heads = {n: next(t["headline"] for r in data.rows for m, t in r.tasks.items() if m == n) for n in tasks}
        rows = [[r.id, *(r.tasks[n]["score"] if n in r.tasks else _missing(r) for n in tasks)] for r in data.rows]
        tables.append(Table(f"Per dataset — {FAMILIES.get(fam, fam)}", ["run", *(f"{n} ({heads[n]})" for n in tasks)],
                            rows))
    return tables


def protocol_tables(data: Collected) -> list[Table]:
    """Fine-grained classification by protocol: the mean over datasets, then one runs × datasets table each."""
    protocols = [p for p in PROTOCOL_METRICS if any(p in t["protocols"] for r in data.rows for t in r.tasks.values())]
    if not protocols:
        return []
    summary = []
    for r in data.rows:
        cells = []
        for p in protocols:
            vals = [t["protocols"][p] for t in r.tasks.values() if p in t["protocols"]]
            cells.append(sum(vals) / len(vals) if vals else _missing(r))
        summary.append([r.id, *cells])
    tables = [Table("Per protocol — fine-grained classification, mean over datasets",
                    ["run", *(f"{p} ({PROTOCOL_METRICS[p]})" for p in protocols)], summary)]
    for p in protocols:
        tasks = sorted({n for r in data.rows for n, t in r.tasks.items() if p in t["protocols"]})
        rows = [[r.id, *(r.tasks[n]["protocols"].get(p) if n in r.tasks else _missing(r) for n in tasks)] for r in data.rows]
        tables.append(Table(f"Protocol {p} ({PROTOCOL_METRICS[p]}) per dataset", ["run", *tasks], rows))
    return tables


def probe_pairs(data: Collected) -> list[dict[str, Any]]:
    """(run, ceiling task: a linear probe or zero-shot on the encoder): its accuracy and the VLM's headline
    accuracy on the same data source."""
    pairs = []
    for r in data.rows:
        for name, t in r.tasks.items():
            if t["family"] != "probe":
                continue
            vlm = [(n, u) for n, u in r.tasks.items() if u["family"] == "fine_grained" and u["source"] == t["source"]]
            pairs.append({"run": r.id, "dataset": vlm[0][0] if vlm else name, "ceiling": name, "probe": t["score"],
                          "vlm": vlm[0][1]["score"] if vlm else None,
                          "vlm_metric": vlm[0][1]["headline"] if vlm else None})
    return pairs


def probe_table(pairs: list[dict[str, Any]]) -> Table:
    rows = [[p["run"], p["dataset"], p["ceiling"], p["probe"], p["vlm"], p["vlm_metric"],
             None if p["vlm"] is None else p["probe"] - p["vlm"]] for p in pairs]
    return Table("Encoder ceilings (linear probe, zero-shot) vs the VLM",
                 ["run", "dataset", "ceiling task", "ceiling acc", "VLM", "VLM metric", "ceiling − VLM"], rows)


def problems_table(data: Collected) -> Table:
    rows = [[r.id, r.state, r.error or ("no results.json" if r.state == "done" else "not finished")]
            for r in data.rows if not r.ok]
    return Table("Missing or failed runs", ["run", "state", "why"], rows)


# ---------------------------------------------------------------- rendering


def md_table(t: Table) -> str:
    title, header, rows, notes = t
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    lines += [""] + [f"> **Note.** {n}\n" for n in notes] if notes else []
    return "\n".join(lines) + "\n"


def _html_table(t: Table) -> str:
    title, header, rows, notes = t
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='{_cls(c)}'>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    below = "".join(f"<p class='note'><b>Note.</b> {html.escape(n)}</p>\n" for n in notes)
    return (f"<h2>{html.escape(title)}</h2>\n<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"
            f"{below}")


def _cls(c: Any) -> str:
    return {"failed": "bad", "missing": "bad", "pending": "warn", "interrupted": "warn", "running": "warn",
            "queued": "warn"}.get(c, "num" if isinstance(c, float) else "")


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}td.num{text-align:right;font-family:monospace}
td.bad{background:#fdd}td.warn{background:#ffd}p.note{background:#ffd;padding:4px 8px}img{max-width:100%;border:1px solid #eee;margin:1em 0}"""


def build_report(grid_dir: str | Path) -> dict[str, Path]:
    """Write every report file into the grid dir; returns their paths."""
    grid_dir = Path(grid_dir)
    data = collect(grid_dir)
    summaries = {p.id: point_summary(p) for p in data.finished}
    effects = axis_effects(data.finished, data.factors, data.seed_axis)
    pairs = probe_pairs(data)
    plots_dir = grid_dir / "plots"
    plots = {name: p for name, p in {
        "fine-grained vs general": report_plots.scatter_fine_vs_general(data, summaries, plots_dir / "fine_vs_general.png"),
        "axis effects: fine-grained next to general": report_plots.axis_effects(effects, plots_dir / "axis_effects.png"),
        "linear-probe ceiling": report_plots.probe_ceiling(pairs, plots_dir / "probe_ceiling.png"),
        "training dynamics": report_plots.dynamics(data, plots_dir / "dynamics.png"),
    }.items() if p is not None}
    tables = [*summary_tables(data), tasks_table(data), *dataset_tables(data), *protocol_tables(data)]
    if pairs:
        tables.append(probe_table(pairs))
    problems = problems_table(data)
    if problems[2]:
        tables.append(problems)
    tables = [t for t in tables if t[2]]
    n_ok = sum(r.ok for r in data.rows)
    summary = f"{len(data.rows)} planned runs: {n_ok} finished with results, {len(data.rows) - n_ok} missing or failed."

    write_csv(data, summaries, grid_dir / "results.csv")
    md = [f"# Grid report: {data.name}", "", summary, ""]
    md += [f"![{name}](plots/{p.name})\n" for name, p in plots.items()]
    md += [md_table(t) for t in tables]
    atomic_write_text(grid_dir / "report.md", "\n".join(md))
    images = "".join(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
                     f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{html.escape(name)}</figcaption></figure>\n"
                     for name, p in plots.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data.name)} report</title>"
            f"<style>{CSS}</style></head><body><h1>Grid report: {html.escape(data.name)}</h1><p>{html.escape(summary)}</p>"
            f"{images}{''.join(_html_table(t) for t in tables)}</body></html>\n")
    atomic_write_bytes(grid_dir / "report.html", page.encode("utf-8"))
    return {"csv": grid_dir / "results.csv", "md": grid_dir / "report.md", "html": grid_dir / "report.html", **plots}

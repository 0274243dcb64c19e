"""The synthetic world's guarantees: determinism, formats, class balance, captions and VQA answers that
match the scene records, SPEC-style cases that differ in one attribute only, and pixels that match records."""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.runner import build_task
from vlm.cli import main
from vlm.errors import UserError
from vlm.world.synth.render import BASIC_COLORS, COLORS, FAMILIES, NUMBER_WORDS, PATTERNS, PROPORTIONS, SHADES, render_scene
from vlm.world.synth.sets import ABS_SIZES, GRID, POSITIONS, SIZE_SCALES, WHERE, build_classes
from vlm.world.synth.world import generate_world, load_scenes, resolve_config

SETTINGS = dict(families=4, classes_per_family=2, train_per_class=3, test_per_class=2, vqa_train=6, vqa_eval=12, spec_cases=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    generate_world(out, seed=0, preset="tiny", **SETTINGS)
    return out


@pytest.fixture(scope="module")
def scenes(world) -> dict[str, dict]:
    return load_scenes(world)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(world: Path, rel: str):
    return json.loads((world / rel).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------ determinism, formats

def test_same_seed_gives_identical_bytes_and_other_seed_differs(world, tmp_path):
    generate_world(tmp_path / "again", seed=0, preset="tiny", **SETTINGS)
    generate_world(tmp_path / "other", seed=1, preset="tiny", **SETTINGS)
    a, b, c = _tree(world), _tree(tmp_path / "again"), _tree(tmp_path / "other")
    assert a == b
    assert a.keys() == c.keys()  # same layout and counts ...
    differing = [k for k in a if a[k] != c[k]]
    assert any(k.endswith(".png") for k in differing) and "classification/train.jsonl" in differing  # ... other content
    assert a["classification/classes.json"] == c["classification/classes.json"]  # the class list is seed-free


def test_manifest_lists_sizes_and_hashes_of_every_file(world):
    import hashlib

    m = _load(world, "world.json")
    assert (m["seed"], m["preset"], m["version"]) == (0, "tiny", "2")
    assert m["config"] == resolve_config("tiny", **SETTINGS)
    on_disk = {k for k in _tree(world) if k != "world.json"}
    assert set(m["files"]) == on_disk
    for rel, digest in m["files"].items():
        assert hashlib.sha256((world / rel).read_bytes()).hexdigest() == digest
    s = m["sets"]
    assert s["classification_train"]["count"] == 8 * 3 and s["classification_test"]["count"] == 8 * 2
    assert s["captions_dense"]["count"] == s["captions_coarse"]["count"] == 24
    assert s["vqa_train"]["count"] == 6 and s["vqa_eval"]["count"] == 12
    assert s["vqa_eval"]["questions"] == len(_load(world, "vqa_eval/questions.json")["questions"])
    assert [s[f"spec_{x}"]["k"] for x in ("absolute_size", "relative_size", "absolute_spatial", "relative_spatial",
                                         "existence", "count")] == [3, 3, 9, 4, 2, 3]
    assert all(len(v["sha256"]) == 64 for v in s.values())


def test_files_parse_in_the_documented_formats(world):
    classes = _load(world, "classification/classes.json")
    assert all(set(c) == {"name", "synonyms", "family", "attributes"} for c in classes)
    for split in ("train", "test"):
        for line in (world / f"classification/{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert set(row) == {"image", "label"} and (world / "classification" / row["image"]).is_file()
    for quality in ("coarse", "dense"):
        caps = _load(world, f"captions_{quality}.json")
        for r in caps:
            human, gpt = r["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
            assert (world / r["image"]).is_file()
    coarse, dense = _load(world, "captions_coarse.json"), _load(world, "captions_dense.json")
    assert [(r["id"], r["image"]) for r in coarse] == [(r["id"], r["image"]) for r in dense]
    for r in _load(world, "vqa_train.json"):
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and len(conv) >= 2
        assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in conv[1:])
        assert (world / r["image"]).is_file()
    qs = _load(world, "vqa_eval/questions.json")["questions"]
    anns = {a["question_id"]: a for a in _load(world, "vqa_eval/annotations.json")["annotations"]}
    images = _load(world, "vqa_eval/images.json")
    assert [q["question_id"] for q in qs] == list(anns) and len(set(anns)) == len(qs)
    for q in qs:
        a = anns[q["question_id"]]
        assert a["image_id"] == q["image_id"] and (world / "vqa_eval" / images[str(q["image_id"])]).is_file()
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert all(x["answer"] == a["multiple_choice_answer"] for x in a["answers"])
        assert a["answer_type"] in {"yes/no", "number", "other"}
    for sub in ("absolute_size", "relative_size", "absolute_spatial", "relative_spatial", "existence", "count"):
        i2t, t2i = _load(world, f"spec/{sub}/image2text.json"), _load(world, f"spec/{sub}/text2image.json")
        assert len(i2t) == len(t2i) > 0
        for e in i2t:
            assert 0 <= e["label"] < len(e["keys"]) and (world / "spec" / sub / e["query"]).is_file()
            assert not any(k.endswith(".png") for k in e["keys"])
        for e in t2i:
            assert 0 <= e["label"] < len(e["keys"]) and all((world / "spec" / sub / k).is_file() for k in e["keys"])
    # the SPEC task reads the world's folder as the release layout: all six subsets, no subset list needed
    items = build_task({"type": "spec", "name": "s", "path": str(world / "spec")}).items()
    assert {it["subset"] for it in items} == {p.name for p in (world / "spec").iterdir() if p.is_dir()}


# ------------------------------------------------------------------------------------ classification, captions

def test_class_balance_is_exact_per_split(world):
    names = [c["name"] for c in _load(world, "classification/classes.json")]
    assert len(names) == 8 and len(set(names)) == 8 and all(len(n.split()) >= 3 for n in names)
    for split, per in (("train", 3), ("test", 2)):
        labels = Counter(json.loads(l)["label"] for l in (world / f"classification/{split}.jsonl").read_text().splitlines())
        assert labels == {n: per for n in names}


def test_class_list_is_balanced_and_names_encode_attributes():
    classes = build_classes(4, 16)
    assert len({c["name"] for c in classes}) == 64
    for per_family in (2, 4, 8, 16):
        for fam in FAMILIES:
            sub = [c for c in build_classes(4, per_family) if c["family"] == fam]
            for attr in ("shade", "pattern", "parts", "proportion"):
                counts = Counter(c["attributes"][attr] for c in sub)
                assert len(counts) == 2 and len(set(counts.values())) == 1, (per_family, fam, attr, counts)
    for c in classes:
        a, words = c["attributes"], c["name"].split()
        assert {a["shade"], a["pattern"], a["proportion"], c["family"]} <= set(words)
        assert f"{NUMBER_WORDS[a['parts']]}-{FAMILIES[c['family']].part_adjective}" in words


def test_classification_records_match_labels_and_regions(world, scenes):
    classes = {c["name"]: c for c in _load(world, "classification/classes.json")}
    for split in ("train", "test"):
        for line in (world / f"classification/{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            (obj,) = scenes["classification/" + row["image"]]["scene"]["objects"]
            c = classes[row["label"]]
            assert obj["class"] == row["label"] and obj["family"] == c["family"]
            assert {k: obj[k] for k in ("pattern", "parts", "proportion")} == {k: c["attributes"][k] for k in ("pattern", "parts", "proportion")}
            assert obj["color_name"] == c["attributes"]["shade"]
            assert max(abs(x - y) for x, y in zip(obj["color"], SHADES[obj["color_name"]])) <= 10
            lo, hi = SIZE_SCALES[obj["size"]]
            assert lo <= obj["scale"] <= hi
            cx, cy = obj["cx"], obj["cy"]
            assert {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                    "center": 0.45 <= cx <= 0.55 and 0.45 <= cy <= 0.55}[obj["position"]]


ATTRIBUTE_WORDS = set(SHADES) | set(PATTERNS) | set(PROPORTIONS) | set(POSITIONS) | set(SIZE_SCALES) | {
    w for f in FAMILIES.values() for w in (f.part_noun, f.part_noun + "s", f.part_adjective)} | set(NUMBER_WORDS)


def test_captions_match_the_scene(world, scenes):
    coarse = {r["id"]: r for r in _load(world, "captions_coarse.json")}
    for r in _load(world, "captions_dense.json"):
        (obj,) = scenes[r["image"]]["scene"]["objects"]
        dense = r["conversations"][1]["value"]
        assert obj["class"] in dense and WHERE[obj["position"]] in dense and f" {obj['size']} " in dense
        others = (set(POSITIONS) - {obj["position"]}) | (set(SIZE_SCALES) - {obj["size"]})
        assert not others & set(re.findall(r"[a-z]+", dense.lower()))
        c = coarse[r["id"]]
        assert c["image"] == r["image"] and c["conversations"][0] == r["conversations"][0]
        words = set(re.findall(r"[a-z]+", c["conversations"][1]["value"].lower()))
        assert obj["family"] in words and not words & ATTRIBUTE_WORDS
        assert not words & (set(FAMILIES) - {obj["family"]})


# ------------------------------------------------------------------------------------ VQA

def _answer(question: str, objs: list[dict]) -> str:
    """An independent reading of the scene record for each question form."""
    by_plural = {f.plural: f.name for f in FAMILIES.values()}
    of = lambda fam: [o for o in objs if o["family"] == fam]  # noqa: E731
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(len(of(by_plural[m[1]])))
    if m := re.fullmatch(r"Is there a (\w+) in the image\?", question):
        return "yes" if of(m[1]) else "no"
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (o,) = of(m[1])
        return o["color_name"]
    if m := re.fullmatch(r"Is the (\w+) to the (left|right) of the (\w+)\?", question):
        (a,), (b,) = of(m[1]), of(m[3])
        assert abs(a["cx"] - b["cx"]) >= 0.12
        return "yes" if (a["cx"] < b["cx"]) == (m[2] == "left") else "no"
    if m := re.fullmatch(r"Is the (\w+) (\w+)\?", question):
        (o,) = of(m[1])
        assert m[2] in BASIC_COLORS
        return "yes" if o["color_name"] == m[2] else "no"
    raise AssertionError(f"unexpected question form: {question}")


def test_vqa_answers_agree_with_the_scene_records(world, scenes):
    seen = Counter()
    for r in _load(world, "vqa_train.json"):
        objs = scenes[r["image"]]["scene"]["objects"]
        conv = r["conversations"]
        for human, gpt in zip(conv[::2], conv[1::2]):
            q = human["value"].replace("<image>\n", "").split("\n")[0]
            assert gpt["value"] == _answer(q, objs), q
            seen[q.split()[0]] += 1
    anns = {a["question_id"]: a for a in _load(world, "vqa_eval/annotations.json")["annotations"]}
    images = _load(world, "vqa_eval/images.json")
    for q in _load(world, "vqa_eval/questions.json")["questions"]:
        objs = scenes["vqa_eval/" + images[str(q["image_id"])]]["scene"]["objects"]
        ann = anns[q["question_id"]]
        assert ann["multiple_choice_answer"] == _answer(q["question"], objs), q
        kind = "number" if q["question"].startswith("How many") else "other" if q["question"].startswith("What") else "yes/no"
        assert ann["answer_type"] == kind
        seen[q["question"].split()[0]] += 1
    assert {"How", "Is", "What"} <= set(seen)
    for s in (r["scene"] for r in scenes.values() if r["set"].startswith("vqa")):  # objects never overlap
        objs = s["objects"]
        assert 2 <= len(objs) <= 5
        assert all(np.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"]) > 0.27 for i, a in enumerate(objs) for b in objs[:i])


def test_vqa_asks_for_and_answers_with_a_single_word(world):
    """Every training question carries LLaVA-1.5's short-answer instruction, worded as the `vqav2` task's default
    prompt, and every answer (train and eval) is one word that both VQA answer normalisations leave unchanged, so
    reproducing the training answer scores 1 in every `normalize` mode."""
    from eval.metrics import evalai_normalize, vqa_accuracy, vqa_normalize
    from eval.vqa import SHORT

    suffix = "\nAnswer the question using a single word or phrase."
    assert SHORT == "<image>\n{question}" + suffix
    answers = []
    for r in _load(world, "vqa_train.json"):
        conv = r["conversations"]
        questions = [t["value"].removeprefix("<image>\n").removesuffix(suffix) for t in conv[::2]]
        assert conv[0]["value"] == SHORT.format(question=questions[0])
        assert [t["value"] for t in conv[2::2]] == [q + suffix for q in questions[1:]]
        assert all(q.endswith("?") and "\n" not in q for q in questions)
        answers += [t["value"] for t in conv[1::2]]
    answers += [a["multiple_choice_answer"] for a in _load(world, "vqa_eval/annotations.json")["annotations"]]
    assert answers and {"yes", "no"} <= set(answers)
    for a in answers:
        assert re.fullmatch(r"[a-z]+|[0-9]+", a) and evalai_normalize(a) == vqa_normalize(a) == a, a
        assert all(vqa_accuracy(a, [a] * 10, mode) == 1.0 for mode in ("official", "always", "textvqa"))


# ------------------------------------------------------------------------------------ SPEC-style

DIFFERS = {"absolute_size": {"scale"}, "relative_size": {"scale"}, "absolute_spatial": {"cx", "cy"},
           "relative_spatial": {"cx", "cy"}, "count": {"cx", "cy"}}


def _without(obj: dict, keys: set[str]) -> dict:
    return {k: v for k, v in obj.items() if k not in keys}


def test_spec_cases_differ_only_in_the_intended_attribute(world, scenes):
    cases = defaultdict(list)
    for rec in scenes.values():
        if rec["set"].startswith("spec_"):
            cases[(rec["set"][5:], rec["meta"]["case"])].append(rec)
    assert {sub for sub, _ in cases} == {"absolute_size", "relative_size", "absolute_spatial", "relative_spatial", "existence", "count"}
    for (sub, _), recs in cases.items():
        recs.sort(key=lambda r: r["meta"]["k"])
        ss = [r["scene"] for r in recs]
        values = [r["meta"]["value"] for r in recs]
        assert len(set(map(str, values))) == len(values)  # K distinct attribute values
        assert all(s["background"] == ss[0]["background"] and s["size"] == ss[0]["size"] for s in ss)
        if sub == "existence":
            (a, b), (b2,) = ss[0]["objects"], ss[1]["objects"]
            assert values == [True, False] and b == b2 and a["role"] == "A" and a["family"] != b["family"]
            continue
        if sub == "count":
            assert [len(s["objects"]) for s in ss] == values == list(range(1, len(ss) + 1))
            for s, nxt in zip(ss, ss[1:]):
                assert nxt["objects"][: len(s["objects"])] == s["objects"]  # one more object, the rest unchanged
            assert len({json.dumps(_without(o, DIFFERS[sub])) for s in ss for o in s["objects"]}) == 1
            continue
        stripped = [[_without(o, DIFFERS[sub]) for o in s["objects"]] for s in ss]
        assert all(x == stripped[0] for x in stripped)
        for v, s in zip(values, ss):
            o = {x["role"]: x for x in s["objects"]}
            if sub == "absolute_size":
                assert o["A"]["scale"] == ABS_SIZES[v]
            elif sub == "absolute_spatial":
                gx, gy = GRID[v]
                assert abs(o["A"]["cx"] - gx / 6) < 0.03 and abs(o["A"]["cy"] - gy / 6) < 0.03
            elif sub == "relative_spatial":
                a, b = o["A"], o["B"]
                assert {"left": a["cx"] < b["cx"] - 0.3, "right": a["cx"] > b["cx"] + 0.3,
                        "above": a["cy"] < b["cy"] - 0.3, "below": a["cy"] > b["cy"] + 0.3}[v]
            elif sub == "relative_size":
                a, b = o["A"]["scale"], o["B"]["scale"]
                assert {"bigger": a > b, "smaller": a < b, "same": a == b}[v]


def test_spec_labels_point_at_the_matching_text_and_image(world, scenes):
    for sub in ("absolute_size", "relative_size", "absolute_spatial", "relative_spatial", "existence", "count"):
        meta = {rec["image"].split(f"spec/{sub}/")[1]: rec["meta"] for rec in scenes.values() if rec["set"] == f"spec_{sub}"}
        for e in _load(world, f"spec/{sub}/image2text.json"):
            assert e["keys"][e["label"]] == meta[e["query"]]["text"]
            case = meta[e["query"]]["case"]
            assert sorted(e["keys"]) == sorted(m["text"] for m in meta.values() if m["case"] == case)
        for e in _load(world, f"spec/{sub}/text2image.json"):
            assert meta[e["keys"][e["label"]]]["text"] == e["query"]


# ------------------------------------------------------------------------------------ pixels

def _one(family: str, color_name: str, pattern: str = "plain", **kw) -> dict:
    f = FAMILIES[family]
    obj = dict(family=family, color_name=color_name, color=list(COLORS[color_name]), pattern=pattern, parts=f.parts[0],
               proportion="stout", cx=0.5, cy=0.5, scale=0.7, rotation=0.0) | kw
    return {"size": 96, "background": {"color": [220, 220, 220], "clutter": 0, "clutter_seed": 0, "distractors": []},
            "objects": [obj]}


def _near(img: Image.Image, rgb, tol: float = 12) -> int:
    a = np.asarray(img, dtype=np.int32)
    return int((np.abs(a - np.array(rgb)).max(-1) <= tol).sum())


def test_pixels_show_the_recorded_shade():
    crimson = render_scene(_one("beetle", "crimson"))
    # the beetle's body centre (0.54 of its box, box = 0.7 of the image, centred) is exactly the recorded colour
    y = round(96 * (0.5 + 0.7 * (0.54 - 0.5)))
    assert crimson.getpixel((48, y)) == SHADES["crimson"]
    assert _near(crimson, SHADES["crimson"]) > 300 and _near(crimson, SHADES["scarlet"]) == 0
    scarlet = render_scene(_one("beetle", "scarlet"))
    assert _near(scarlet, SHADES["scarlet"]) > 300 and _near(scarlet, SHADES["crimson"]) == 0
    striped = render_scene(_one("beetle", "crimson", "striped"))
    assert 0 < _near(striped, SHADES["crimson"]) < _near(crimson, SHADES["crimson"]) * 0.8


def test_pixels_grow_with_size_and_count(world, scenes):
    small, large = (render_scene(_one("fish", "teal", scale=s)) for s in (0.3, 0.6))
    ratio = _near(large, SHADES["teal"]) / _near(small, SHADES["teal"])
    assert 3.0 < ratio < 5.0  # area goes with the square of the scale
    for rec in scenes.values():
        if rec["set"] == "spec_count" and rec["meta"]["case"] == 0:
            objs = rec["scene"]["objects"]
            img = Image.open(world / rec["image"]).convert("RGB")
            assert img == render_scene(rec["scene"])  # the file is the rendering of its record
            rgb = COLORS[objs[0]["color_name"]]
            one = _near(render_scene(rec["scene"] | {"objects": objs[:1]}), rgb)
            assert one > 0 and abs(_near(img, rgb) / one - len(objs)) < 0.25 * len(objs)


def test_every_image_file_is_the_rendering_of_its_record(world, scenes):
    for rel, rec in list(scenes.items())[::7]:
        assert np.array_equal(np.asarray(Image.open(world / rel).convert("RGB")), np.asarray(render_scene(rec["scene"])))


# ------------------------------------------------------------------------------------ config and CLI

def test_settings_are_validated():
    with pytest.raises(UserError, match="preset"):
        resolve_config("huge")
    with pytest.raises(UserError, match="image_size"):
        resolve_config("tiny", image_size=8)
    with pytest.raises(UserError, match="unknown synthetic-world setting"):
        resolve_config("tiny", colours=3)
    with pytest.raises(UserError, match="2 object families"):
        resolve_config("tiny", families=1)
    assert resolve_config("demo")["families"] * resolve_config("demo")["classes_per_family"] == 32


def test_cli_generates_is_idempotent_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["data", "synth", "--out", str(out), "--preset", "tiny", "--quiet"]) == 0
    stamp = (out / "world.json").stat().st_mtime_ns
    assert main(["data", "synth", "--out", str(out), "--preset", "tiny", "--quiet"]) == 0
    assert (out / "world.json").stat().st_mtime_ns == stamp  # a complete world with the same settings is kept
    assert main(["data", "synth", "--out", str(out), "--preset", "tiny", "--seed", "3", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    (out / "classification" / "train.jsonl").write_text("damaged\n")
    assert main(["data", "synth", "--out", str(out), "--preset", "tiny", "--seed", "3", "--quiet", "--force"]) == 0
    assert json.loads((out / "world.json").read_text())["seed"] == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["data", "synth", "--out", str(tmp_path / "other"), "--preset", "tiny", "--quiet"]) == 2
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--image-size", "8", "--quiet"]) == 2
    assert not list(tmp_path.glob(".*tmp*"))

"""Samplers of the synthetic world: classes, scene records, and the texts that go with them.

Every sampler takes a `random.Random` and returns plain dicts; nothing here draws pixels (see
`vlm.world.synth.render`). Numbers in records are rounded so that the record *is* what gets rendered.
"""
from __future__ import annotations

import math
import random
from typing import Any

from vlm.world.synth.render import BASIC_COLORS, COLORS, FAMILIES, NUMBER_WORDS, PROPORTIONS, part_word

POSITIONS = ("left", "right", "top", "bottom", "center")
SIZE_SCALES = {"small": (0.4, 0.48), "large": (0.64, 0.74)}
ROTATION = 25.0  # nuisance rotation range (±degrees) of classification objects
COLOR_JITTER = 10  # ±per-channel jitter of a drawn colour around its named value

# Order in which a family's 16 attribute combinations (shade, pattern, parts, proportion; bit = which of the
# family's two values) become classes: every even-length prefix is balanced on every attribute (complement
# pairs), the first 8 are the even-parity half (any two differ in ≥ 2 attributes), the last 8 add the classes
# that differ from those in exactly one attribute.
COMBO_ORDER = [
    (0, 0, 0, 0), (1, 1, 1, 1), (0, 0, 1, 1), (1, 1, 0, 0), (0, 1, 0, 1), (1, 0, 1, 0), (0, 1, 1, 0), (1, 0, 0, 1),
    (0, 0, 0, 1), (1, 1, 1, 0), (0, 0, 1, 0), (1, 1, 0, 1), (0, 1, 0, 0), (1, 0, 1, 1), (1, 0, 0, 0), (0, 1, 1, 1),
]

CAPTION_PROMPTS = [
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short description of this image.",
    "Write a caption for this photo.",
    "Summarize the picture in one sentence.",
]
COARSE_TEMPLATES = ["A {f}.", "A photo of a {f}.", "An image of a {f}.", "There is a {f} in this picture.", "A picture showing a {f}."]
DENSE_TEMPLATES = ["A {size} {name} {where}.", "A photo of a {size} {name} {where}.", "There is a {size} {name} {where}."]
WHERE = {
    "left": "on the left side of the image", "right": "on the right side of the image",
    "top": "at the top of the image", "bottom": "at the bottom of the image", "center": "in the center of the image",
}
PATTERN_PHRASE = {"plain": "without markings", "spotted": "with dark spots", "striped": "with dark stripes"}
VQA_SUFFIX = "Answer the question using a single word or phrase."


def rng_for(seed: int, *keys: Any) -> random.Random:
    """An independent, reproducible stream per item (string seeds are hashed with SHA-512 by `random`)."""
    return random.Random("|".join(str(k) for k in (seed, *keys)))


def _r(x: float) -> float:
    return round(x, 4)


# ------------------------------------------------------------------------------------------ classes

def class_name(family: str, shade: str, pattern: str, parts: int, proportion: str) -> str:
    return f"{proportion} {pattern} {shade} {part_word(family, parts)} {family}"


def build_classes(families: int, classes_per_family: int) -> list[dict]:
    """The class list (independent of the seed): `classes_per_family` classes from each of the first families."""
    out = []
    for fam in list(FAMILIES.values())[:families]:
        for bits in COMBO_ORDER[:classes_per_family]:
            attrs = {
                "shade": fam.shades[bits[0]], "pattern": fam.patterns[bits[1]],
                "parts": fam.parts[bits[2]], "proportion": PROPORTIONS[bits[3]],
            }
            n = NUMBER_WORDS[attrs["parts"]]
            synonyms = [
                f"{attrs['proportion']} {attrs['pattern']} {attrs['shade']} {fam.name} with {n} {fam.part_noun}s",
                class_name(fam.name, **attrs).replace(fam.name, fam.synonym),
            ]
            out.append({"name": class_name(fam.name, **attrs), "synonyms": synonyms, "family": fam.name, "attributes": attrs})
    return out


# ------------------------------------------------------------------------------------------ scenes

def make_object(family: str, color_name: str, pattern: str, parts: int, proportion: str, *, cx: float, cy: float,
                scale: float, rotation: float = 0.0, color: list[int] | None = None, **labels: Any) -> dict:
    return {
        "family": family, "color_name": color_name, "color": list(color or COLORS[color_name]), "pattern": pattern,
        "parts": parts, "proportion": proportion, "cx": _r(cx), "cy": _r(cy), "scale": _r(scale),
        "rotation": _r(rotation), **labels,
    }


def jitter_color(name: str, rng: random.Random) -> list[int]:
    return [max(0, min(255, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[name]]


def light_color(rng: random.Random) -> list[int]:
    base = rng.randint(200, 236)
    return [max(0, min(255, base + rng.randint(-8, 8))) for _ in range(3)]


def sample_background(rng: random.Random, avoid: list[dict] = (), max_distractors: int = 2) -> dict:
    """A light, unsaturated background with low-contrast clutter and a few grey geometric distractors kept
    clear of the objects in `avoid`."""
    color = light_color(rng)
    distractors = []
    for _ in range(rng.randint(0, max_distractors)):
        for _try in range(20):
            d = {"shape": rng.choice(["square", "triangle", "ring"]), "cx": _r(rng.uniform(0.08, 0.92)),
                 "cy": _r(rng.uniform(0.08, 0.92)), "size": _r(rng.uniform(0.06, 0.11)), "gray": rng.randint(90, 170)}
            if all(math.dist((d["cx"], d["cy"]), (o["cx"], o["cy"])) > o["scale"] * 0.45 + d["size"] * 0.75 for o in avoid) and all(
                math.dist((d["cx"], d["cy"]), (e["cx"], e["cy"])) > (d["size"] + e["size"]) for e in distractors
            ):
                distractors.append(d)
                break
    return {"color": color, "clutter": rng.randint(3, 8), "clutter_seed": rng.getrandbits(32), "distractors": distractors}


def position_xy(position: str, scale: float, rng: random.Random) -> tuple[float, float]:
    """A centre inside the named region; the offset shrinks with size so that large objects stay in frame."""
    d = 0.47 - 0.43 * scale + rng.uniform(-0.02, 0.02)
    across = rng.uniform(-0.04, 0.04)
    if position == "center":
        return 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    dx, dy = {"left": (-d, across), "right": (d, across), "top": (across, -d), "bottom": (across, d)}[position]
    return 0.5 + dx, 0.5 + dy


def classification_scene(cls: dict, rng: random.Random, image_size: int) -> dict:
    size, position = rng.choice(list(SIZE_SCALES)), rng.choice(POSITIONS)
    scale = rng.uniform(*SIZE_SCALES[size])
    cx, cy = position_xy(position, scale, rng)
    a = cls["attributes"]
    obj = make_object(cls["family"], a["shade"], a["pattern"], a["parts"], a["proportion"], cx=cx, cy=cy, scale=scale,
                      rotation=rng.uniform(-ROTATION, ROTATION), color=jitter_color(a["shade"], rng),
                      **{"class": cls["name"], "size": size, "position": position})
    return {"size": image_size, "background": sample_background(rng, [obj]), "objects": [obj]}


# ------------------------------------------------------------------------------------------ captions

def coarse_caption(scene: dict, rng: random.Random) -> str:
    return rng.choice(COARSE_TEMPLATES).format(f=scene["objects"][0]["family"])


def dense_caption(scene: dict, rng: random.Random) -> str:
    o = scene["objects"][0]
    fam = FAMILIES[o["family"]]
    verb = "are" if fam.body_noun.endswith("s") else "is"
    head = rng.choice(DENSE_TEMPLATES).format(size=o["size"], name=o["class"], where=WHERE[o["position"]])
    return (f"{head} Its {fam.body_noun} {verb} {o['color_name']} {PATTERN_PHRASE[o['pattern']]}; it has "
            f"{NUMBER_WORDS[o['parts']]} {fam.part_noun}s and a {o['proportion']} build.")


def caption_record(sample_id: str, image: str, prompt: str, caption: str) -> dict:
    return {"id": sample_id, "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption}]}


# ------------------------------------------------------------------------------------------ VQA

def vqa_scene(rng: random.Random, image_size: int, families: list[str], n_objects: tuple[int, int]) -> dict:
    """2-5 objects in basic colours, spread out so that counting and left/right are unambiguous."""
    objs: list[dict] = []
    for _ in range(rng.randint(*n_objects)):
        scale = rng.uniform(0.24, 0.3)
        for _try in range(100):
            cx, cy = rng.uniform(0.17, 0.83), rng.uniform(0.17, 0.83)
            if all(math.dist((cx, cy), (o["cx"], o["cy"])) > 0.27 for o in objs):
                break
        else:
            continue
        fam = FAMILIES[rng.choice(families)]
        objs.append(make_object(fam.name, rng.choice(list(BASIC_COLORS)), rng.choice(fam.patterns), rng.choice(fam.parts),
                                rng.choice(PROPORTIONS), cx=cx, cy=cy, scale=scale, rotation=rng.uniform(-20, 20)))
    return {"size": image_size, "background": sample_background(rng, objs, max_distractors=1), "objects": objs}


def vqa_questions(scene: dict, rng: random.Random, families: list[str], k: int) -> list[dict]:
    """Up to `k` questions of distinct types whose answers follow from the scene record."""
    objs = scene["objects"]
    counts = {f: sum(o["family"] == f for o in objs) for f in families}
    present = [f for f in families if counts[f]]
    unique = [o for o in objs if counts[o["family"]] == 1]

    def count():
        f = rng.choice(present)
        return f"How many {FAMILIES[f].plural} are there?", str(counts[f]), "number", "how many"

    def exists():
        absent = [f for f in families if not counts[f]]
        f = rng.choice(present if (not absent or rng.random() < 0.5) else absent)
        return f"Is there a {f} in the image?", "yes" if counts[f] else "no", "yes/no", "is there a"

    def color():
        o = rng.choice(unique)
        return f"What color is the {o['family']}?", o["color_name"], "other", "what color is the"

    def color_yn():
        o = rng.choice(unique)
        c = o["color_name"] if rng.random() < 0.5 else rng.choice([c for c in BASIC_COLORS if c != o["color_name"]])
        return f"Is the {o['family']} {c}?", "yes" if c == o["color_name"] else "no", "yes/no", "is the"

    pairs = [(a, b) for a in unique for b in unique if a is not b and abs(a["cx"] - b["cx"]) >= 0.12]

    def left_right():
        a, b = rng.choice(pairs)
        side = rng.choice(["left", "right"])
        truth = a["cx"] < b["cx"] if side == "left" else a["cx"] > b["cx"]
        return f"Is the {a['family']} to the {side} of the {b['family']}?", "yes" if truth else "no", "yes/no", "is the"

    makers = [count, exists] + ([color, color_yn] if unique else []) + ([left_right] if pairs else [])
    if not present:
        makers = [exists]
    rng.shuffle(makers)
    out = []
    for make in makers[:k]:
        q, a, atype, qtype = make()
        out.append({"question": q, "answer": a, "answer_type": atype, "question_type": qtype, "kind": make.__name__})
    return out


# ------------------------------------------------------------------------------------------ SPEC-style

SPEC_SUBSETS = ("absolute_size", "relative_size", "absolute_spatial", "relative_spatial", "existence", "count")
ABS_SIZES = {"small": 0.22, "medium": 0.4, "large": 0.62}
GRID = {"top left": (1, 1), "top": (3, 1), "top right": (5, 1), "left": (1, 3), "center": (3, 3), "right": (5, 3),
        "bottom left": (1, 5), "bottom": (3, 5), "bottom right": (5, 5)}  # centres in sixths of the side
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
SIZE_RELATIONS = {"bigger": (0.4, 0.2), "smaller": (0.2, 0.4), "same": (0.3, 0.3)}


def _plural(f: str, n: int) -> str:
    return f if n == 1 else FAMILIES[f].plural


def spec_case(subset: str, rng: random.Random, classes: list[dict], image_size: int, max_count: int) -> tuple[list[dict], list[str], list[Any]]:
    """K scene records, K texts and the K attribute values of one SPEC-style case.

    All K scenes share one background and the same objects; they differ only in the subset's attribute.
    """
    ca = rng.choice(classes)
    cb = rng.choice([c for c in classes if c["family"] != ca["family"]] or classes)
    rot_a, rot_b = rng.uniform(-15, 15), rng.uniform(-15, 15)
    bg = {"color": light_color(rng), "clutter": rng.randint(3, 8), "clutter_seed": rng.getrandbits(32), "distractors": []}
    a_name, b_name = ca["family"], cb["family"]

    def obj(c: dict, rot: float, role: str, **geo) -> dict:
        at = c["attributes"]
        return make_object(c["family"], at["shade"], at["pattern"], at["parts"], at["proportion"], rotation=rot, role=role, **geo)

    def scene(*objs: dict) -> dict:
        return {"size": image_size, "background": bg, "objects": list(objs)}

    jx, jy = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    if subset == "absolute_size":
        values = list(ABS_SIZES)
        scenes = [scene(obj(ca, rot_a, "A", cx=0.5 + jx, cy=0.5 + jy, scale=ABS_SIZES[v])) for v in values]
        texts = [f"A {v} {a_name} in the image." for v in values]
    elif subset == "absolute_spatial":
        values = list(GRID)
        scenes = [scene(obj(ca, rot_a, "A", cx=GRID[v][0] / 6 + jx / 2, cy=GRID[v][1] / 6 + jy / 2, scale=0.28)) for v in values]
        texts = [f"A {a_name} {'in' if v == 'center' else 'at'} the {v} of the image." for v in values]
    elif subset == "relative_spatial":
        values = list(RELATIONS)
        off = {"left": (-0.21, 0), "right": (0.21, 0), "above": (0, -0.21), "below": (0, 0.21)}
        scenes = [scene(obj(ca, rot_a, "A", cx=0.5 + off[v][0] + jx, cy=0.5 + off[v][1] + jy, scale=0.3),
                        obj(cb, rot_b, "B", cx=0.5 - off[v][0] + jx, cy=0.5 - off[v][1] + jy, scale=0.3)) for v in values]
        texts = [f"A {a_name} {RELATIONS[v]} a {b_name}." for v in values]
    elif subset == "relative_size":
        values = list(SIZE_RELATIONS)
        scenes = [scene(obj(ca, rot_a, "A", cx=0.28, cy=0.5 + jy, scale=SIZE_RELATIONS[v][0]),
                        obj(cb, rot_b, "B", cx=0.72, cy=0.5 + jy, scale=SIZE_RELATIONS[v][1])) for v in values]
        phrase = {"bigger": "bigger than", "smaller": "smaller than", "same": "the same size as"}
        texts = [f"A {a_name} that is {phrase[v]} a {b_name}." for v in values]
    elif subset == "existence":
        values = [True, False]
        side = rng.choice([-1, 1])
        a = obj(ca, rot_a, "A", cx=0.5 + side * 0.22, cy=0.5 + jy, scale=0.36)
        b = obj(cb, rot_b, "B", cx=0.5 - side * 0.22, cy=0.5 - jy, scale=0.36)
        scenes = [scene(a, b), scene(b)]
        texts = [f"There is a {a_name} in the image.", f"There is no {a_name} in the image."]
    elif subset == "count":
        values = list(range(1, max_count + 1))
        slots = [(x / 6 + rng.uniform(-0.03, 0.03), y / 6 + rng.uniform(-0.03, 0.03)) for x in (1, 3, 5) for y in (1, 3, 5)]
        rng.shuffle(slots)
        scenes = [scene(*[obj(ca, rot_a, "A", cx=x, cy=y, scale=0.22) for x, y in slots[:n]]) for n in values]
        texts = [f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {_plural(a_name, n)} in the image." for n in values]
    else:
        raise ValueError(f"unknown SPEC subset {subset!r}")
    return scenes, texts, values

"""Vocabulary and renderer of the synthetic world: a scene record (a plain dict) → a PIL image.

Rendering is a pure function of the record, so tests can check records and pixels separately and a
SPEC-style case can change one field of a record and nothing else. Scenes are drawn at
`SUPERSAMPLE`× resolution and box-reduced, which anti-aliases edges deterministically.

Scene record::

    {"size": 112,
     "background": {"color": [r, g, b], "clutter": 6, "clutter_seed": 123,
                    "distractors": [{"shape": "square", "cx": .2, "cy": .8, "size": .1, "gray": 120}]},
     "objects": [{"family": "beetle", "color_name": "crimson", "color": [r, g, b], "pattern": "spotted",
                  "parts": 6, "proportion": "slender", "cx": .3, "cy": .5, "scale": .6, "rotation": -12.0,
                  ...labels the sampler adds: "class", "size", "position"}]}

`cx, cy` are the object's centre as fractions of the image side (y grows downwards); `scale` is the side of
the object's square drawing box as a fraction of the image side; `rotation` is in degrees, anticlockwise.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageChops, ImageDraw, ImageFilter

SUPERSAMPLE = 3


@dataclass(frozen=True)
class Family:
    name: str
    plural: str
    shades: tuple[str, str]  # the two close shades that tell its classes apart
    patterns: tuple[str, str]
    parts: tuple[int, int]  # the two part counts
    part_noun: str  # "leg" → "six-legged", "with six legs"
    part_adjective: str  # "legged"
    body_noun: str  # what the colour and pattern are on ("shell")
    synonym: str  # another word for the family, used in class synonyms


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("beetle", "beetles", ("crimson", "scarlet"), ("spotted", "striped"), (4, 6), "leg", "legged", "shell", "bug"),
        Family("flower", "flowers", ("amber", "lemon"), ("plain", "spotted"), (4, 5), "petal", "petaled", "petals", "blossom"),
        Family("fish", "fish", ("teal", "turquoise"), ("striped", "plain"), (3, 4), "spine", "spined", "body", "minnow"),
        Family("cactus", "cacti", ("olive", "jade"), ("spotted", "striped"), (2, 3), "arm", "armed", "stem", "succulent"),
    ]
}
PROPORTIONS = ("slender", "stout")
PATTERNS = ("plain", "spotted", "striped")

# Fine shades (classification) come in close pairs; basic colours are for general VQA.
SHADES: dict[str, tuple[int, int, int]] = {
    "crimson": (200, 20, 60), "scarlet": (255, 52, 12),
    "amber": (255, 168, 0), "lemon": (238, 228, 60),
    "teal": (0, 124, 128), "turquoise": (60, 212, 200),
    "olive": (122, 132, 20), "jade": (0, 166, 108),
}
BASIC_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (222, 36, 36), "blue": (40, 80, 225), "green": (40, 168, 60),
    "yellow": (242, 212, 36), "purple": (140, 56, 184), "orange": (250, 136, 24),
}
COLORS = {**SHADES, **BASIC_COLORS}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
LEG_COLOR = (52, 44, 40)


def part_word(family: str, parts: int) -> str:
    """`six-legged`, `four-petaled`, ..."""
    return f"{NUMBER_WORDS[parts]}-{FAMILIES[family].part_adjective}"


def _dark(color, f: float = 0.45) -> tuple[int, int, int]:
    return tuple(int(c * f) for c in color)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 40) -> list[tuple[float, float]]:
    """Polygon of an ellipse rotated by `angle` radians (PIL's ellipse cannot rotate)."""
    ca, sa = math.cos(angle), math.sin(angle)
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x, y = rx * math.cos(t), ry * math.sin(t)
        pts.append((cx + x * ca - y * sa, cy + x * sa + y * ca))
    return pts


# Each family draws, on an upright L×L canvas whose content stays inside the inscribed circle (so any
# rotation keeps it in the box): `under` (appendages under the body, on the RGBA layer), `body` (the
# coloured, patterned region, on a mask) and `over` (eyes, centres, on the layer after the fill).

def _beetle(obj: dict, L: int):
    rx = L * (0.15 if obj["proportion"] == "slender" else 0.245)
    ry, cx, cy = L * 0.28, L * 0.5, L * 0.54
    per_side = obj["parts"] // 2

    def under(d: ImageDraw.ImageDraw):
        w = max(2, round(L * 0.03))
        for i in range(per_side):
            y = cy - ry * 0.55 + (ry * 1.1) * (i / max(1, per_side - 1))
            for s in (-1, 1):
                x0 = cx + s * rx * 0.7
                knee = (cx + s * (rx + L * 0.09), y - L * 0.04)
                foot = (cx + s * (rx + L * 0.15), y + L * 0.05)
                d.line([(x0, y), knee, foot], fill=LEG_COLOR + (255,), width=w, joint="curve")

    def body(m: ImageDraw.ImageDraw):
        m.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)

    def over(d: ImageDraw.ImageDraw):
        r = L * 0.075
        hy = cy - ry - r * 0.6
        d.ellipse([cx - r, hy - r, cx + r, hy + r], fill=LEG_COLOR + (255,))

    return under, body, over, "horizontal"


def _flower(obj: dict, L: int):
    n, c = obj["parts"], L * 0.5
    half_w = L * (0.055 if obj["proportion"] == "slender" else 0.1)

    def body(m: ImageDraw.ImageDraw):
        for i in range(n):
            a = -math.pi / 2 + 2 * math.pi * i / n
            r_mid = L * 0.25
            m.polygon(_ellipse(c + r_mid * math.cos(a), c + r_mid * math.sin(a), L * 0.19, half_w, a), fill=255)

    def over(d: ImageDraw.ImageDraw):
        r = L * 0.075
        d.ellipse([c - r, c - r, c + r, c + r], fill=(92, 58, 24, 255))

    return None, body, over, "horizontal"


def _fish(obj: dict, L: int):
    cx, cy, rx = L * 0.44, L * 0.52, L * 0.28
    ry = L * (0.11 if obj["proportion"] == "slender" else 0.18)
    n = obj["parts"]

    def body(m: ImageDraw.ImageDraw):
        m.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        tx = cx + rx * 0.85
        m.polygon([(tx, cy), (tx + L * 0.17, cy - L * 0.13), (tx + L * 0.17, cy + L * 0.13)], fill=255)
        w = rx * 1.2 / n
        for i in range(n):
            x = cx - rx * 0.6 + w * i
            base = cy - ry * math.sqrt(max(0.0, 1 - ((x + w / 2 - cx) / rx) ** 2)) + L * 0.02
            m.polygon([(x, base), (x + w * 0.85, base), (x + w * 0.3, base - L * 0.11)], fill=255)

    def over(d: ImageDraw.ImageDraw):
        r, ex = L * 0.03, cx - rx * 0.6
        d.ellipse([ex - r, cy - ry * 0.3 - r, ex + r, cy - ry * 0.3 + r], fill=(20, 20, 20, 255))

    return None, body, over, "vertical"


def _cactus(obj: dict, L: int):
    c, half_w = L * 0.5, L * (0.065 if obj["proportion"] == "slender" else 0.105)
    top, bottom = L * 0.14, L * 0.86

    def under(d: ImageDraw.ImageDraw):
        d.rectangle([c - L * 0.2, bottom - L * 0.03, c + L * 0.2, bottom + L * 0.04], fill=(150, 96, 60, 255))

    def body(m: ImageDraw.ImageDraw):
        m.rounded_rectangle([c - half_w, top, c + half_w, bottom], radius=half_w, fill=255)
        aw = half_w * 0.7
        # (side, height, reach, rise) of each arm; the third is a straight stub high on the left so that
        # it never merges with the first.
        for side, y, reach, rise in [(-1, 0.60, 0.25, 0.12), (1, 0.47, 0.25, 0.14), (-1, 0.30, 0.22, 0.0)][: obj["parts"]]:
            x_out = c + side * L * reach
            x0, x1 = sorted((c, x_out))
            m.rounded_rectangle([x0 - aw, y * L - aw, x1 + aw, y * L + aw], radius=aw, fill=255)
            if rise:
                m.rounded_rectangle([x_out - aw, (y - rise) * L, x_out + aw, y * L + aw], radius=aw, fill=255)

    return under, body, None, "horizontal"


DRAWERS = {"beetle": _beetle, "flower": _flower, "fish": _fish, "cactus": _cactus}


def _pattern_mask(pattern: str, L: int, orientation: str) -> Image.Image | None:
    if pattern == "plain":
        return None
    m = Image.new("L", (L, L), 0)
    d = ImageDraw.Draw(m)
    if pattern == "striped":
        period = L * 0.09
        for i in range(int(L / period) + 1):
            a = i * period
            box = [0, a, L, a + period * 0.45] if orientation == "horizontal" else [a, 0, a + period * 0.45, L]
            d.rectangle(box, fill=255)
    elif pattern == "spotted":
        step, r = L * 0.1, L * 0.03
        for j in range(int(L / step) + 1):
            for i in range(int(L / step) + 1):
                x, y = i * step + (step / 2 if j % 2 else 0), j * step
                d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return m


def render_object(obj: dict, L: int) -> Image.Image:
    """The object drawn upright on a transparent L×L RGBA canvas, then rotated by `obj['rotation']`."""
    under, body, over, orientation = DRAWERS[obj["family"]](obj, L)
    layer = Image.new("RGBA", (L, L), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    if under:
        under(d)
    mask = Image.new("L", (L, L), 0)
    body(ImageDraw.Draw(mask))
    color = tuple(obj["color"])
    layer.paste(color + (255,), mask=mask)
    pat = _pattern_mask(obj["pattern"], L, orientation)
    if pat is not None:
        layer.paste(_dark(color) + (255,), mask=ImageChops.multiply(mask, pat))
    # a ~2 px (supersampled) outline: any pixel the box blur reaches outside the body
    ring = ImageChops.subtract(mask.filter(ImageFilter.BoxBlur(2)).point(lambda v: 255 if v else 0), mask)
    layer.paste(_dark(color, 0.3) + (255,), mask=ring)
    if over:
        over(d)
    if obj.get("rotation"):
        layer = layer.rotate(obj["rotation"], resample=Image.Resampling.BILINEAR)
    return layer


def _draw_clutter(img: Image.Image, bg: dict) -> None:
    rng = random.Random(bg["clutter_seed"])
    d = ImageDraw.Draw(img)
    S = img.size[0]
    base = bg["color"]
    for _ in range(bg["clutter"]):
        delta = rng.randint(-28, 28)
        col = tuple(max(0, min(255, c + delta + rng.randint(-4, 4))) for c in base)
        x, y = rng.uniform(0, S), rng.uniform(0, S)
        if rng.random() < 0.5:
            a, r = rng.uniform(0, math.pi), rng.uniform(0.1, 0.5) * S
            d.line([(x, y), (x + r * math.cos(a), y + r * math.sin(a))], fill=col, width=max(1, round(S * 0.012)))
        else:
            r = rng.uniform(0.02, 0.08) * S
            d.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=col)


def _draw_distractor(img: Image.Image, dis: dict) -> None:
    S = img.size[0]
    d = ImageDraw.Draw(img)
    x, y, h = dis["cx"] * S, dis["cy"] * S, dis["size"] * S / 2
    col = (dis["gray"],) * 3
    if dis["shape"] == "square":
        d.rectangle([x - h, y - h, x + h, y + h], fill=col)
    elif dis["shape"] == "triangle":
        d.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=col)
    elif dis["shape"] == "ring":
        d.ellipse([x - h, y - h, x + h, y + h], outline=col, width=max(1, round(h * 0.35)))
    else:
        raise ValueError(f"unknown distractor shape {dis['shape']!r}")


def render_scene(scene: dict[str, Any]) -> Image.Image:
    """Render a scene record to an RGB image of `scene['size']` pixels a side."""
    S = scene["size"] * SUPERSAMPLE
    bg = scene["background"]
    img = Image.new("RGB", (S, S), tuple(bg["color"]))
    _draw_clutter(img, bg)
    for dis in bg.get("distractors", []):
        _draw_distractor(img, dis)
    for obj in scene["objects"]:
        L = max(8, round(obj["scale"] * S))
        layer = render_object(obj, L)
        img.paste(layer, (round(obj["cx"] * S - L / 2), round(obj["cy"] * S - L / 2)), layer)
    return img.reduce(SUPERSAMPLE)

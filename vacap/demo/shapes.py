"""The shapes world: seeded synthetic scenes with ground truth and reference captions.

A scene is a ``SIZE`` x ``SIZE`` RGB image holding 1-4 objects. Each object is one of eight
shapes (:data:`SHAPES`) in one of eight colours (:data:`COLOURS`); no shape appears twice in a
scene, so every object is named by its (colour, shape). Objects are drawn anti-aliased, sized
``MIN_OBJECT``-``MAX_OBJECT`` pixels, and their bounding boxes never overlap, so each one is
fully visible. Backgrounds are desaturated mid-tones (solid, a vertical or horizontal
gradient between two such tones, optionally with light grey noise), chosen far from every
object colour, so an object never has the background's colour.

Reference captions use a small closed vocabulary in a few templated styles::

    a red heart.                      there is a red heart.            one object: a red heart.
    a red circle above a blue star.   there is a red circle and a blue star.
    two objects: a red heart on the left and a white ring on the right.
    there is a red circle, a blue star and a green square.
    three objects: a red circle, a blue star and a green square.

Lists name objects from left to right; relations (``to the left of``, ``to the right of``,
``above``, ``below``) and ``on the left`` / ``at the top`` follow the larger of the horizontal
and vertical offsets between the two objects' centres.

Splits
------
``train`` has the priors below (:data:`CO_OCCURRENCE`, :data:`COLOUR_PRIORS`); ``test`` has
shapes drawn uniformly without replacement and colours uniformly and independently. Measured
on 2000 scenes of each split (seed 0; see ``tests/test_shapes.py``):

==============================  ======  ======================================
prior                           train   test (what independence predicts)
==============================  ======  ======================================
circle in scenes with a star    0.82    0.27 (0.29: other n-1 shapes from 7)
square in scenes with a cross   0.75    0.27 (0.28)
heart is red                    0.89    0.13 (0.125: 1 in 8)
diamond is yellow               0.81    0.12 (0.125)
==============================  ======  ======================================

Everything is pure and seeded: :func:`scenes` with the same ``(n, seed, split)`` gives the
same scenes, pixel for pixel; nothing reads global random state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image, ImageChops, ImageDraw

SIZE = 96
MIN_OBJECTS, MAX_OBJECTS = 1, 4
MIN_OBJECT, MAX_OBJECT = 24, 36  # object bounding-box side, pixels
SPLITS = ("train", "test")

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
NUMBERS = ("zero", "one", "two", "three", "four")

# --- the train split's priors (the test split has none) -------------------------------------
# trigger shape -> (partner shape, probability that a scene with the trigger also has the partner)
CO_OCCURRENCE: dict[str, tuple[str, float]] = {
    "star": ("circle", 0.80),
    "cross": ("square", 0.75),
}
# shape -> (colour, probability that the shape has that colour; otherwise uniform over the rest)
COLOUR_PRIORS: dict[str, tuple[str, float]] = {
    "heart": ("red", 0.90),
    "diamond": ("yellow", 0.80),
}
# Shapes that no co-occurrence rule mentions: the ones a rule may swap in or out.
_FREE_SHAPES = tuple(
    s for s in SHAPES if s not in CO_OCCURRENCE and s not in {p for p, _ in CO_OCCURRENCE.values()}
)

# Backgrounds: a grey level plus a small tint per channel, at least this far (RGB Euclidean
# distance) from every object colour; noise adds up to +-NOISE/2 to every pixel.
_BG_GREY = (95, 165)
_BG_TINT = 18
_BG_MIN_DISTANCE = 90.0
_NOISE = (0, 24)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One object: its shape, colour name, centre (x, y) and bounding-box side, in pixels."""

    kind: str
    colour: str
    x: int
    y: int
    size: int
    weak: str | None = None  # the priors world's weak evidence (see WEAKNESSES); None: clear


@dataclass(frozen=True)
class Background:
    """A vertical (or horizontal) gradient from ``start`` to ``end``; solid when they are equal.

    ``noise`` is the peak-to-peak amplitude of grey noise (0 for none), drawn from ``noise_seed``.
    """

    start: tuple[int, int, int]
    end: tuple[int, int, int]
    vertical: bool = True
    noise: int = 0
    noise_seed: int = 0


@dataclass
class Scene:
    """A drawn scene: its image, its ground-truth objects, a reference caption, its background."""

    image: Image.Image
    objects: list[Shape]
    caption: str
    background: Background | None = None


# --- drawing ---------------------------------------------------------------------------------


def _outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape centred on (cx, cy) with half-side r; None for the ellipse shapes."""
    if kind == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)]
    if kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.42 * r
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + 0.08 * r + radius * math.sin(angle)))
        return points
    if kind == "cross":
        a = 0.2 * r * 1.9  # half the arm thickness
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if kind == "heart":
        # The classic parametric heart: x in [-16, 16], y in [-17, 12] (y up).
        points = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + x * r / 16.5, cy - (y + 2.5) * r / 15))
        return points
    return None


def _mask(shape: Shape, size: int) -> Image.Image:
    """An anti-aliased coverage mask (mode L) of one object."""
    s = _SUPERSAMPLE
    big = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, r = (shape.x + 0.5) * s, (shape.y + 0.5) * s, shape.size * s / 2
    outline = _outline(shape.kind, cx, cy, r)
    if outline is not None:
        draw.polygon(outline, fill=255)
    elif shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape.kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        hole = 0.52 * r
        draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    else:
        raise ValueError(f"unknown shape {shape.kind!r}; expected one of {', '.join(SHAPES)}")
    return big.resize((size, size), Image.Resampling.BOX)


def _background_image(background: Background, size: int) -> Image.Image:
    start = Image.new("RGB", (size, size), background.start)
    if background.end == background.start:
        image = start
    else:
        ramp = Image.linear_gradient("L").resize((size, size), Image.Resampling.BILINEAR)
        if not background.vertical:
            ramp = ramp.transpose(Image.Transpose.ROTATE_90)
        image = Image.composite(Image.new("RGB", (size, size), background.end), start, ramp)
    if background.noise:
        rng = random.Random(background.noise_seed)
        amplitude = background.noise
        noise = Image.frombytes("L", (size, size), rng.randbytes(size * size))
        noise = noise.point(lambda v: v * amplitude // 255)
        image = Image.merge(
            "RGB", [ImageChops.add(band, noise, 1.0, -(amplitude // 2)) for band in image.split()]
        )
    return image


def render(objects: Sequence[Shape], background: Background, size: int = SIZE) -> Image.Image:
    """Draw ``objects`` (in order) over ``background`` on a ``size`` x ``size`` RGB image."""
    image = _background_image(background, size)
    for shape in objects:
        if shape.colour not in COLOURS:
            raise ValueError(f"unknown colour {shape.colour!r}; expected one of {', '.join(COLOURS)}")
        image.paste(COLOURS[shape.colour], (0, 0), _mask(shape, size))
    return image


# --- sampling --------------------------------------------------------------------------------


def _sample_kinds(rng: random.Random, split: str) -> list[str]:
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    kinds = rng.sample(SHAPES, n)
    if split == "test":
        return kinds
    for trigger, (partner, probability) in CO_OCCURRENCE.items():
        if trigger not in kinds:
            continue
        want = rng.random() < probability
        if want and partner not in kinds:
            swappable = [i for i, k in enumerate(kinds) if k in _FREE_SHAPES]
            if swappable:
                kinds[rng.choice(swappable)] = partner
            else:  # only rule shapes present, so there are at most three: room for one more
                kinds.append(partner)
        elif not want and partner in kinds:
            unused = [k for k in _FREE_SHAPES if k not in kinds]
            kinds[kinds.index(partner)] = rng.choice(unused)
    return kinds


def _sample_colour(rng: random.Random, kind: str, split: str) -> str:
    names = list(COLOURS)
    if split == "train" and kind in COLOUR_PRIORS:
        colour, probability = COLOUR_PRIORS[kind]
        if rng.random() < probability:
            return colour
        return rng.choice([c for c in names if c != colour])
    return rng.choice(names)


def _sample_background(rng: random.Random) -> Background:
    def tone() -> tuple[int, int, int]:
        while True:
            grey = rng.randint(*_BG_GREY)
            rgb = tuple(max(0, min(255, grey + rng.randint(-_BG_TINT, _BG_TINT))) for _ in range(3))
            if all(math.dist(rgb, c) >= _BG_MIN_DISTANCE for c in COLOURS.values()):
                return rgb  # type: ignore[return-value]

    start = tone()
    style = rng.choice(("solid", "gradient", "noise"))
    end = tone() if style == "gradient" else start
    noise = rng.randint(8, _NOISE[1]) if style == "noise" or rng.random() < 0.2 else 0
    return Background(start, end, vertical=rng.random() < 0.5, noise=noise, noise_seed=rng.getrandbits(32))


def _layout(rng: random.Random, count: int, size: int) -> list[tuple[int, int, int]]:
    """(x, y, side) for ``count`` objects whose bounding boxes do not overlap."""
    return place(rng, count, lambda _, shrink: max(12, rng.randint(MIN_OBJECT, MAX_OBJECT) - shrink), size, 2)


def place(
    rng: random.Random, count: int, side_of: Callable[[int, int], int], size: int, shrink_step: int
) -> list[tuple[int, int, int]]:
    """(x, y, side) for ``count`` objects whose bounding boxes are at least 2 px apart.

    ``side_of(i, shrink)`` gives object i's side; when some object finds no room in 200 tries,
    every object is placed again with ``shrink`` grown by ``shrink_step``.
    """
    shrink = 0
    while True:
        placed: list[tuple[int, int, int]] = []
        for i in range(count):
            side = side_of(i, shrink)
            margin = side // 2 + 2
            for _ in range(200):
                x, y = rng.randint(margin, size - 1 - margin), rng.randint(margin, size - 1 - margin)
                if all(max(abs(x - px), abs(y - py)) >= (side + ps) / 2 + 2 for px, py, ps in placed):
                    placed.append((x, y, side))
                    break
            else:
                break
        if len(placed) == count:
            return placed
        shrink += shrink_step


# --- captions --------------------------------------------------------------------------------


def _phrase(shape: Shape) -> str:
    article = "an" if shape.colour[0] in "aeiou" else "a"
    return f"{article} {shape.colour} {shape.kind}"


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _horizontal(a: Shape, b: Shape) -> bool:
    return abs(a.x - b.x) >= abs(a.y - b.y)


def caption_for(objects: Sequence[Shape], rng: random.Random) -> str:
    """A reference caption for ``objects`` in a randomly chosen template style."""
    ordered = sorted(objects, key=lambda s: (s.x, s.y))
    phrases = [_phrase(s) for s in ordered]
    n = len(ordered)
    style = rng.randrange(3)
    if n == 2 and style == 0:
        a, b = rng.sample(ordered, 2)
        if _horizontal(a, b):
            relation = "to the left of" if a.x < b.x else "to the right of"
        else:
            relation = "above" if a.y < b.y else "below"
        return f"{_phrase(a)} {relation} {_phrase(b)}."
    if n == 2 and style == 2:
        a, b = ordered
        if _horizontal(a, b):
            return f"two objects: {_phrase(a)} on the left and {_phrase(b)} on the right."
        top, bottom = (a, b) if a.y < b.y else (b, a)
        return f"two objects: {_phrase(top)} at the top and {_phrase(bottom)} at the bottom."
    if style == 1:
        return f"there is {_join(phrases)}."
    if style == 2:
        return f"{NUMBERS[n]} {'object' if n == 1 else 'objects'}: {_join(phrases)}."
    return f"{_join(phrases)}."


def make_scene(rng: random.Random, split: str, size: int = SIZE) -> Scene:
    """One scene of ``split`` ("train" with priors, "test" without), drawn from ``rng``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    kinds = _sample_kinds(rng, split)
    colours = [_sample_colour(rng, kind, split) for kind in kinds]
    background = _sample_background(rng)
    boxes = _layout(rng, len(kinds), size)
    objects = [Shape(k, c, x, y, side) for k, c, (x, y, side) in zip(kinds, colours, boxes)]
    return Scene(render(objects, background, size), objects, caption_for(objects, rng), background)

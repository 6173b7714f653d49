"""The priors world: longer shapes scenes where language priors, not misreading, cause the errors.

A variant of :mod:`vacap.demo.shapes` (same shapes, colours, backgrounds and drawing) built so
that a captioner with weak grounding falls back on what its training text predicts:

* 3-6 objects per scene, each named with its colour and position, so captions run to 20-50
  words and the model has to keep looking at the image as it writes::

      there is a white star at the top left, a blue circle on the right and a red heart at the bottom.
      four objects: a green cross on the left, a green square in the middle, ...

* strong priors in the ``train`` split (:data:`PARTNERS`, :data:`USUAL_COLOURS`, both
  :data:`PRIOR_STRENGTH` or more), none in ``test`` (shapes uniform without replacement,
  colours uniform and independent);
* about :data:`WEAK_SHARE` of the objects, in both splits, with weak visual evidence
  (:data:`WEAKNESSES`): ``small`` (a side of 9-12 px against 22-30), ``faint`` (blended
  into the background, :data:`FAINT_ALPHA` of its colour) or ``covered`` (a grey card hides
  :data:`COVER` of its bounding box from one side). ``Shape.weak`` says which. Training gives
  the vision tower no direct help with those (see ``vacap.demo.train.patch_labels``), so the
  model learns them only through the captions, where the priors usually give the answer.

The caption names objects from left to right, each followed by where it is (the image cut
into thirds: ``at the top left``, ``on the right``, ``in the middle``, ...).

Everything is pure and seeded, like the shapes world: ``scenes(n, seed, split,
world="priors")`` gives the same scenes, pixel for pixel.
"""

from __future__ import annotations

import random
from typing import Sequence

from PIL import Image, ImageDraw

from vacap.demo.shapes import (
    COLOURS,
    SHAPES,
    SIZE,
    SPLITS,
    Background,
    Scene,
    Shape,
    _background_image,
    _join,
    _mask,
    _phrase,
    _sample_background,
    place,
)

MIN_OBJECTS, MAX_OBJECTS = 3, 6
# Bounding-box side of a clear object, pixels: at 18-26 a model trained for the time budget
# misread half the clear objects (see model-priors/TRAINING.md).
CLEAR_SIDE = (22, 30)
SMALL_SIDE = (9, 12)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")

# --- the train split's priors (the test split has none) -------------------------------------
PRIOR_STRENGTH = 0.9
# trigger -> partner: a train scene with the trigger nearly always has the partner too (the
# partner may come alone).
PARTNERS: dict[str, str] = {"star": "circle", "cross": "square", "triangle": "heart", "ring": "diamond"}
# shape -> its usual colour in train; the other shapes' colours are uniform in both splits.
USUAL_COLOURS: dict[str, str] = {"circle": "blue", "square": "green", "heart": "red", "diamond": "yellow"}
# Chance of each colour prior holding; a co-occurrence is kept when it breaks with _BREAK_ACCEPT
# (rejection sampling), which measures above PRIOR_STRENGTH (see tests/test_priors_world.py).
_COLOUR_PRIOR = 0.93
_BREAK_ACCEPT = 0.06

# --- weak evidence ---------------------------------------------------------------------------
WEAKNESSES = ("small", "faint", "covered")
WEAK_SHARE = 0.25
FAINT_ALPHA = (0.22, 0.32)  # share of the object's colour over the background
COVER = (0.55, 0.7)  # share of the bounding box the card hides
_CARD_GREY = (100, 170)

_ROWS = ("top", "", "bottom")
_COLUMNS = ("left", "", "right")


def position(shape: Shape, size: int = SIZE) -> str:
    """Where ``shape``'s centre lies, by thirds of the image: ``at the top left``, ``on the
    right``, ``in the middle``, ``at the bottom``, ..."""
    row, col = _ROWS[min(2, 3 * shape.y // size)], _COLUMNS[min(2, 3 * shape.x // size)]
    if row and col:
        return f"at the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the middle"


def caption_for(objects: Sequence[Shape], rng: random.Random, size: int = SIZE) -> str:
    """A reference caption: every object, left to right, with its colour and position."""
    ordered = sorted(objects, key=lambda s: (s.x, s.y))
    phrases = [f"{_phrase(s)} {position(s, size)}" for s in ordered]
    style = rng.randrange(3)
    if style == 0:
        return f"there is {_join(phrases)}."
    if style == 1:
        return f"{NUMBERS[len(ordered)]} objects: {_join(phrases)}."
    return f"{_join(phrases)}."


def _broken(kinds: Sequence[str]) -> int:
    """How many triggers in ``kinds`` come without their partner."""
    return sum(1 for trigger, partner in PARTNERS.items() if trigger in kinds and partner not in kinds)


def _sample_kinds(rng: random.Random, split: str, n: int) -> list[str]:
    while True:
        kinds = rng.sample(SHAPES, n)
        if split == "test" or rng.random() < _BREAK_ACCEPT ** _broken(kinds):
            return kinds


def _sample_colour(rng: random.Random, kind: str, split: str) -> str:
    usual = USUAL_COLOURS.get(kind)
    if split == "train" and usual is not None:
        return usual if rng.random() < _COLOUR_PRIOR else rng.choice([c for c in COLOURS if c != usual])
    return rng.choice(list(COLOURS))


def _layout(rng: random.Random, sides: Sequence[int], size: int) -> list[tuple[int, int, int]]:
    """(x, y, side) per wanted side; clear objects shrink when they do not fit, small ones stay."""

    def side_of(i: int, shrink: int) -> int:
        return sides[i] if sides[i] <= SMALL_SIDE[1] else max(CLEAR_SIDE[0] - 4, sides[i] - shrink)

    return place(rng, len(sides), side_of, size, 1)


def card(shape: Shape, cover: float, side: str) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom; right and bottom exclusive) of the card that hides
    ``cover`` of ``shape``'s bounding box from ``side`` ("left", "right", "top", "bottom")."""
    half = shape.size / 2
    left, top = round(shape.x - half), round(shape.y - half)
    right, bottom = left + shape.size + 1, top + shape.size + 1
    depth = round(cover * (shape.size + 1))
    if side == "left":
        return left, top, left + depth, bottom
    if side == "right":
        return right - depth, top, right, bottom
    if side == "top":
        return left, top, right, top + depth
    return left, bottom - depth, right, bottom


def render(
    objects: Sequence[Shape],
    background: Background,
    faint: Sequence[float],
    cards: Sequence[tuple[tuple[int, int, int, int], tuple[int, int, int]]],
    size: int = SIZE,
) -> Image.Image:
    """Draw ``objects`` over ``background``: object i with ``faint[i]`` of its colour (1 for a
    clear one), then each (box, grey RGB) card of ``cards`` on top."""
    image = _background_image(background, size)
    for shape, alpha in zip(objects, faint):
        mask = _mask(shape, size)
        if alpha < 1:
            mask = mask.point(lambda v: round(v * alpha))
        image.paste(COLOURS[shape.colour], (0, 0), mask)
    draw = ImageDraw.Draw(image)
    for (left, top, right, bottom), grey in cards:
        draw.rectangle([left, top, right - 1, bottom - 1], fill=grey)
    return image


def make_scene(rng: random.Random, split: str, size: int = SIZE) -> Scene:
    """One scene of the priors world's ``split``, drawn from ``rng``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    kinds = _sample_kinds(rng, split, n)
    colours = [_sample_colour(rng, kind, split) for kind in kinds]
    weak = [rng.choice(WEAKNESSES) if rng.random() < WEAK_SHARE else None for _ in kinds]
    sides = [rng.randint(*(SMALL_SIDE if w == "small" else CLEAR_SIDE)) for w in weak]
    background = _sample_background(rng)
    boxes = _layout(rng, sides, size)
    objects = [Shape(k, c, x, y, side, w) for k, c, (x, y, side), w in zip(kinds, colours, boxes, weak)]
    faint = [rng.uniform(*FAINT_ALPHA) if o.weak == "faint" else 1.0 for o in objects]
    cards = []
    for o in objects:
        if o.weak == "covered":
            box = card(o, rng.uniform(*COVER), rng.choice(("left", "right", "top", "bottom")))
            grey = rng.randint(*_CARD_GREY)
            cards.append((box, (grey, grey, grey)))
    image = render(objects, background, faint, cards, size)
    return Scene(image, objects, caption_for(objects, rng, size), background)

"""The scene worlds by name: "shapes" (:mod:`vacap.demo.shapes`, the `demo` model's) and "priors"
(:mod:`vacap.demo.priors`, `demo-priors`'), and the seeded scenes of either.

The priors world draws with the shapes world's pieces, so the choice between them lives here,
above both, rather than in one of them.
"""

from __future__ import annotations

import random

from vacap.demo import priors, shapes

WORLDS = ("shapes", "priors")


def scenes(n: int, seed: int, split: str, size: int = shapes.SIZE, world: str = "shapes") -> list[shapes.Scene]:
    """``n`` scenes of ``split`` of ``world`` (:data:`WORLDS`); the same arguments give the same
    scenes, pixel for pixel."""
    if split not in shapes.SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(shapes.SPLITS)}")
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; expected one of {', '.join(WORLDS)}")
    make_scene = priors.make_scene if world == "priors" else shapes.make_scene
    rng = random.Random(f"vacap-{world}:{split}:{seed}")
    return [make_scene(rng, split, size) for _ in range(n)]

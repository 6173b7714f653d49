"""CHAIR-style hallucination figures for captions of shapes-world scenes, against ground truth.

The shapes world (:mod:`vacap.demo.shapes`) knows exactly which objects each scene holds, so a
caption can be scored without a human: pull the object mentions out of it
(:func:`extract_objects`), compare them with the scene's objects (:func:`score_caption`) and
add up over many captions (:func:`summarize`). :func:`run_benchmark` does all of it for a model
and several decode settings on seeded ``test`` scenes (no priors, so leaning on the ``train``
priors shows up as hallucination).

Definitions
-----------
A *mention* is a shape word (singular, plural or an allowed synonym, see :data:`SHAPE_WORDS`)
together with the colour words directly before it (articles, numbers and size words may sit in
between; ``red and blue circles`` gives two mentions). A colour after its shape (``the circle
is red``) is not attached: that mention has no colour. A plural is one mention: ``two red
circles`` is the claim (red, circle), counted once, because CHAIR counts which objects a
caption names, not how many of them; likewise a caption naming the same (colour, shape) twice
counts it once (``score_caption`` works on the distinct mentions, in order of first appearance).

Against the ground-truth objects of the scene, a mention (colour, shape) is

* *hallucinated* when no object has that shape and, if a colour is named, that colour. So a
  blue circle called red is a hallucination; ``a circle`` with no colour is not, if any circle
  is there;
* *shape-hallucinated* (the ``_shape`` variants) when no object has that shape at all.

An object is *recalled* when some mention has its shape and either its colour or no colour
(``recall_shape``: some mention has its shape).

Per set of captions (:func:`summarize`):

* ``CHAIR_s``: the share of captions with at least one hallucinated mention;
* ``CHAIR_i``: hallucinated mentions / all mentions (1 - CHAIR_i is object precision);
* ``recall``: recalled objects / all ground-truth objects;
* ``mean_length``: mean caption length in words (whitespace-separated).

A caption with no mention at all has ``CHAIR_s`` 0 and adds nothing to ``CHAIR_i``'s counts
(but its objects lower recall).

Causes and positions
--------------------
Each world's train split has priors (:func:`world_priors`): triggers with a usual partner
shape, and shapes with a usual colour. A hallucinated mention (colour, shape) is

* *prior-driven* when it is what those priors predict from the rest of the scene: its shape is
  the usual partner of a trigger the scene holds, while the scene has no such shape; or its
  colour is the usual colour of its shape;
* *perceptual* otherwise (a misread shape or colour that no prior explains).

``CHAIR_i_prior`` and ``CHAIR_i_perceptual`` divide each cause by all mentions, so they add up
to ``CHAIR_i``; ``prior_share`` is the prior-driven part of the hallucinations.
``CHAIR_i_1st``, ``CHAIR_i_2nd``, ``CHAIR_i_3rd`` and ``CHAIR_i_later`` are CHAIR_i over the
first, second, third and fourth-or-later distinct mentions of each caption.

What the model did, and which prior predicts it
-----------------------------------------------
The priors world's captions say where each object is, by thirds of the image (``a red heart at
the top left``, :func:`vacap.demo.priors.position`). The *place* of a mention is the one
stated right after its shape word (:func:`read_place`; ``red and blue circles at the top``
gives both the same place), or none; a mention said twice keeps the place of its first
appearance, as CHAIR keeps the mention once. The shapes world's captions place objects
relative to each other (``above``, ``on the left`` of two), so there no mention has a place.
Places do not change which mentions are hallucinated: CHAIR matches colour and shape only, so a
right object at a wrong place is no hallucination.

Each hallucinated mention (colour, shape, place) has one *kind*, what the model did
(:func:`error_kind`), taken from the scene's objects at the stated place (its *referent* is the
object it is taken to describe); the first rule that applies wins:

1. ``colour``: the object of the named shape is at the stated place, or the mention has no
   place and the scene has an object of that shape: right shape, wrong colour (it must be
   wrong, or the mention would not be hallucinated). Referent: that object.
2. ``renamed``: another object is at the stated place: the model named it as another shape.
   Referent: the first object there (in the scene's order) whose colour is the stated one, or
   any there when no colour is stated, else the first object there (its colour misread too).
3. ``placement``: nothing is at the stated place, but an object of the named shape is
   elsewhere: right shape at a wrong place, with a wrong colour. Referent: that object.
4. ``added``: nothing is at the stated place, or the mention has no place, and the scene has
   no object of the named shape. No referent.

So ``renamed`` wins over ``placement`` when a shape present elsewhere is named at the place of
another object: the stated place anchors the mention. Without places (the shapes world), only
``colour`` and ``added`` occur.

Each hallucinated mention also has the train priors that predict it (:func:`priors_of`):

* ``colour->shape``: a colour is stated, it is the referent's true colour, and the named shape
  is the one that colour goes with in training (the usual colour of the named shape): a rightly
  read colour, renamed to its training shape. Only ``renamed`` mentions can be so;
* ``co-occurrence``: the named shape is the usual partner of a shape the scene holds, and the
  scene holds no object of the named shape;
* ``shape->colour``: the stated colour is the usual colour of the named shape, and not the
  referent's true colour (or there is no referent): a colour put on from the shape.

Its *prior* is the first of these that predicts it, in that order, else ``none``
(:func:`prior_of`). ``colour->shape`` comes before ``co-occurrence`` because the model follows it
when the two disagree: in greedy ``demo-priors`` captions of the 300 test scenes of seed 1234,
of the 51 objects renamed keeping their colour where the colour's training shape and the partner
of some present trigger were both absent and different, it named the colour's shape 39 times,
a partner 3 times and another shape 9 times. ``co-occurrence`` comes before ``shape->colour``
because it says why the shape was named at all.
``hallucinated_predicted_by`` counts every prior that predicts a mention, so overlaps show.

A mention is prior-driven exactly when its prior is not ``none``: ``colour->shape`` and
``shape->colour`` together are the "usual colour of its shape" rule above, split by whether the
colour was read or supplied.
``hallucinated_by_kind``, ``hallucinated_by_prior`` and ``hallucinated_by_kind_and_prior``
count them.

Chance
------
Some hallucinations are prior-predicted by chance: in a scene with a star and no circle, any
error naming a circle is. For each hallucinated mention, :func:`prior_chance` takes every alternative of the
same kind and referent at the same place that a uniformly random hallucinator could have
produced, and gives the share of them labelled with each prior:

* ``renamed``: the stated colour with each of the :data:`SHAPES` (a random shape for the same
  object);
* ``added``: each shape with each of the :data:`COLOURS` (with no colour when none is stated):
  a random absent shape in a random colour. Averaged over the priors world's 1000 test scenes of
  seed 1234, one added mention each, this is the 34.6 % (32.3 % with no colour) that
  docs/evaluation.md quotes;
* ``colour`` and ``placement``: the named shape with each colour (a random wrong colour);

keeping those that are hallucinated and have the same kind and referent (the mention itself is
always one). The shares are exact (enumerated, not sampled). Summed over the hallucinated
mentions they give the number of prior-predicted hallucinations chance alone would give:
``prior_share_chance`` is that over the hallucinated mentions, ``CHAIR_i_prior_chance`` over all
mentions (``prior_share_chance`` x ``CHAIR_i``), and the *excess*, ``prior_share_excess`` =
``prior_share`` - ``prior_share_chance`` and ``CHAIR_i_prior_excess`` = ``CHAIR_i_prior`` -
``CHAIR_i_prior_chance``, is what the priors add over chance.
``hallucinated_by_prior_chance`` is the same expectation for each prior.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

from vacap.demo.shapes import COLOUR_PRIORS, CO_OCCURRENCE, COLOURS, SHAPES, Shape
from vacap.demo.worlds import scenes

# word -> canonical shape; plurals and a few synonyms.
SHAPE_WORDS: dict[str, str] = {
    **{kind: kind for kind in SHAPES},
    **{kind + "s": kind for kind in SHAPES if kind != "cross"},
    "crosses": "cross",
    "disc": "circle", "discs": "circle", "disk": "circle", "disks": "circle", "dot": "circle", "dots": "circle",
    "donut": "ring", "donuts": "ring", "doughnut": "ring", "doughnuts": "ring",
    "rhombus": "diamond", "rhombuses": "diamond", "rhombi": "diamond",
}  # fmt: skip
# word -> canonical colour.
COLOUR_WORDS: dict[str, str] = {**{colour: colour for colour in COLOURS}, "violet": "purple"}
# Words that may sit between a colour and its shape without breaking the link.
_MODIFIERS = frozenset(
    "a an the one two three four five several some many small big large little tiny bright dark light".split()
)
_CONJUNCTIONS = frozenset({"and", "or"})
_WORD = re.compile(r"[a-z]+")


def extract_objects(caption: str) -> list[tuple[str | None, str]]:
    """The (colour or None, shape) mentions of ``caption``, in order (see the module docstring)."""
    return [mention for _, mentions in objects_at(caption) for mention in mentions]


def objects_at(caption: str) -> list[tuple[int, list[tuple[str | None, str]]]]:
    """Each shape word of ``caption`` (by its start offset) with the (colour or None, shape)
    mentions it closes: one, or one per colour before it ("red and blue circles")."""
    words = [(match.start(), match.group()) for match in _WORD.finditer(caption.lower())]
    found: list[tuple[int, list[tuple[str | None, str]]]] = []
    pending: list[str] = []
    for i, (start, word) in enumerate(words):
        if word in COLOUR_WORDS:
            pending.append(COLOUR_WORDS[word])
        elif word in SHAPE_WORDS:
            shape = SHAPE_WORDS[word]
            found.append((start, [(colour, shape) for colour in pending] if pending else [(None, shape)]))
            pending = []
        elif word in _MODIFIERS:
            continue
        elif word in _CONJUNCTIONS and pending and i + 1 < len(words) and words[i + 1][1] in COLOUR_WORDS:
            continue  # "red and blue circles"
        else:
            pending = []
    return found


Place = tuple[str, str]  # (row, column): ("top" | "middle" | "bottom", "left" | "middle" | "right")
# "at the top left", "on the right", "in the middle", ...: the priors world's places (thirds).
_PLACE = re.compile(r"\s*(?:at|on|in)\s+the\s+(?:(top|bottom)(?:\s+(left|right))?|(left|right)|middle|centre|center)\b")


def read_place(text: str, at: int = 0) -> Place | None:
    """The place stated in lower-case ``text`` right at offset ``at`` ("at the top left", after
    any spaces), or None."""
    match = _PLACE.match(text, at)
    if match is None:
        return None
    row, column, side = match.groups()
    return row or "middle", column or side or "middle"


def placed_objects(caption: str) -> list[tuple[str | None, str, Place | None]]:
    """The mentions of ``caption`` (as :func:`extract_objects`), each with the place stated right
    after its shape word, or None."""
    text = caption.lower()
    return [
        (colour, shape, read_place(text, _WORD.match(text, start).end()))
        for start, mentions in objects_at(caption)
        for colour, shape in mentions
    ]


POSITIONS = ("1st", "2nd", "3rd", "later")
KINDS = ("renamed", "added", "colour", "placement")
PRIORS = ("colour->shape", "co-occurrence", "shape->colour", "none")  # in order of precedence


def world_priors(world: str) -> tuple[dict[str, str], dict[str, str]]:
    """(trigger -> usual partner shape, shape -> usual colour) of ``world``'s train split."""
    if world == "priors":
        from vacap.demo.priors import PARTNERS, USUAL_COLOURS

        return PARTNERS, USUAL_COLOURS
    if world == "shapes":
        return (
            {trigger: partner for trigger, (partner, _) in CO_OCCURRENCE.items()},
            {kind: colour for kind, (colour, _) in COLOUR_PRIORS.items()},
        )
    raise ValueError(f"unknown world {world!r}; expected shapes or priors")


def world_places(world: str) -> Callable[[Shape], Place] | None:
    """Where ``world``'s captions place an object (by thirds in the priors world), or None
    where they place objects only relative to each other (the shapes world)."""
    if world == "shapes":
        return None
    if world == "priors":
        from vacap.demo.priors import position

        return lambda obj: read_place(position(obj))
    raise ValueError(f"unknown world {world!r}; expected shapes or priors")


def hallucination_cause(
    mention: tuple[str | None, str], truth: Sequence[Shape], partners: dict[str, str], usual_colours: dict[str, str]
) -> str:
    """"prior" or "perceptual" for a hallucinated ``mention`` (see the module docstring)."""
    return "perceptual" if prior_of(mention, None, truth, partners, usual_colours) == "none" else "prior"


def priors_of(
    mention: tuple[str | None, str],
    referent: Shape | None,
    truth: Sequence[Shape],
    partners: dict[str, str],
    usual_colours: dict[str, str],
) -> tuple[str, ...]:
    """The train priors (of :data:`PRIORS`, in its order, ``none`` left out) that predict a
    hallucinated ``mention`` of the scene ``truth``, taken to describe ``referent`` (see the
    module docstring)."""
    colour, shape = mention
    kinds = {obj.kind for obj in truth}
    usual = colour is not None and usual_colours.get(shape) == colour
    read = usual and referent is not None and referent.colour == colour
    partner = shape not in kinds and any(partners.get(kind) == shape for kind in kinds)
    return tuple(prior for prior, holds in zip(PRIORS, (read, partner, usual and not read)) if holds)


def prior_of(
    mention: tuple[str | None, str],
    referent: Shape | None,
    truth: Sequence[Shape],
    partners: dict[str, str],
    usual_colours: dict[str, str],
) -> str:
    """The first of :func:`priors_of`, or ``none``."""
    return (*priors_of(mention, referent, truth, partners, usual_colours), "none")[0]


def error_kind(
    mention: tuple[str | None, str],
    place: Place | None,
    truth: Sequence[Shape],
    place_of: Callable[[Shape], Place] | None,
) -> tuple[str, Shape | None]:
    """What a hallucinated ``mention`` stated at ``place`` did (one of :data:`KINDS`) and the
    object it is taken to describe, or None (see the module docstring); ``place_of`` gives an
    object's place (:func:`world_places`)."""
    colour, shape = mention
    named = next((obj for obj in truth if obj.kind == shape), None)
    there = [obj for obj in truth if place is not None and place_of is not None and place_of(obj) == place]
    if named is not None and (named in there or place is None):
        return "colour", named
    if there:
        same = [obj for obj in there if colour is None or obj.colour == colour]
        return "renamed", (same or there)[0]
    if named is not None:
        return "placement", named
    return "added", None


class Label(NamedTuple):
    """A hallucinated mention's kind, referent, prior and every prior that predicts it
    (:func:`priors_of`), and ``chance``: the share of its random alternatives that each prior
    labels (:func:`prior_chance`)."""

    kind: str
    referent: Shape | None
    prior: str
    predicted_by: tuple[str, ...]
    chance: dict[str, float]


def label_hallucination(
    mention: tuple[str | None, str], place: Place | None, truth: Sequence[Shape], world: str = "shapes"
) -> Label:
    """The :class:`Label` of a hallucinated ``mention`` stated at ``place`` in a scene of
    ``world`` holding ``truth``."""
    place_of, priors = world_places(world), world_priors(world)
    kind, referent = error_kind(mention, place, truth, place_of)
    predicted_by = priors_of(mention, referent, truth, *priors)
    return Label(kind, referent, (*predicted_by, "none")[0], predicted_by, prior_chance(mention, place, truth, world))


def prior_chance(
    mention: tuple[str | None, str], place: Place | None, truth: Sequence[Shape], world: str = "shapes"
) -> dict[str, float]:
    """For a hallucinated ``mention`` stated at ``place``: each prior's share (the :data:`PRIORS`,
    summing to 1) of the alternatives of the same kind and referent that a uniformly random
    hallucinator could have said instead (see the module docstring), enumerated exactly."""
    place_of, priors = world_places(world), world_priors(world)
    kind = error_kind(mention, place, truth, place_of)
    colour, shape = mention
    if kind[0] == "renamed":
        options = [(colour, other) for other in SHAPES]
    elif kind[0] == "added":
        options = [(other_colour, other) for other in SHAPES for other_colour in (COLOURS if colour else [None])]
    else:
        options = [(other_colour, shape) for other_colour in COLOURS]
    same = [
        option for option in options
        if not any(_matches(*option, obj) for obj in truth) and error_kind(option, place, truth, place_of) == kind
    ]  # fmt: skip
    labels = Counter(prior_of(option, kind[1], truth, *priors) for option in same)
    return {prior: labels[prior] / len(same) for prior in PRIORS}


def _matches(colour: str | None, shape: str, obj: Shape) -> bool:
    return obj.kind == shape and (colour is None or obj.colour == colour)


def score_caption(caption: str, truth: Sequence[Shape], world: str = "shapes") -> dict:
    """Counts for one caption against its scene's objects (see the module docstring);
    ``world`` says whose train priors classify the hallucinations and how its captions place
    objects."""
    placed = world_places(world) is not None
    places: dict[tuple[str | None, str], Place | None] = {}
    for colour, shape, place in placed_objects(caption):
        places.setdefault((colour, shape), place if placed else None)
    mentions = list(places)
    wrong = [not any(_matches(*m, obj) for obj in truth) for m in mentions]
    hallucinated = [m for m, bad in zip(mentions, wrong) if bad]
    labels = [label_hallucination(m, places[m], truth, world) for m in hallucinated]
    prior = sum(label.prior != "none" for label in labels)
    chance = sum(1 - label.chance["none"] for label in labels)
    by_position = [0] * len(POSITIONS), [0] * len(POSITIONS)  # (mentions, hallucinated)
    for i, bad in enumerate(wrong):
        slot = min(i, len(POSITIONS) - 1)
        by_position[0][slot] += 1
        by_position[1][slot] += bad
    hallucinated_shape = [m for m in mentions if not any(obj.kind == m[1] for obj in truth)]
    recalled = [obj for obj in truth if any(_matches(*m, obj) for m in mentions)]
    recalled_shape = [obj for obj in truth if any(obj.kind == m[1] for m in mentions)]
    return {
        "mentions": len(mentions),
        "hallucinated": len(hallucinated),
        "hallucinated_prior": prior,
        "hallucinated_perceptual": len(hallucinated) - prior,
        "prior_chance": chance,
        "hallucinated_prior_excess": prior - chance,
        "hallucinated_shape": len(hallucinated_shape),
        "objects": len(truth),
        "recalled": len(recalled),
        "recalled_shape": len(recalled_shape),
        "words": len(caption.split()),
        "hallucinated_mentions": hallucinated,
        "labels": labels,
        "mentions_at": by_position[0],
        "hallucinated_at": by_position[1],
    }


def mention_labels(caption: str, truth: Sequence[Shape], world: str = "shapes") -> dict[int, tuple[bool, str | None]]:
    """Each shape word of ``caption`` (by its start offset): whether what it names is
    hallucinated (a mention matching no object of ``truth``, as :func:`score_caption` counts
    them) and, when it is, the cause ("prior" or "perceptual"; prior when any of its colours
    is). Unlike CHAIR, a repeated mention is labelled at each place."""
    priors = world_priors(world)
    labels = {}
    for start, mentions in objects_at(caption):
        wrong = [m for m in mentions if not any(_matches(*m, obj) for obj in truth)]
        causes = {hallucination_cause(m, truth, *priors) for m in wrong}
        labels[start] = (bool(wrong), ("prior" if "prior" in causes else "perceptual") if wrong else None)
    return labels


def risk_figures(records: Sequence[dict], shown: Sequence, world: str) -> dict:
    """How well the records' risk scores (``vacap caption --risk``) find the hallucinations of
    the scenes ``shown``: mention AUROC and AUPRC (all, and prior-driven or perceptual
    hallucinations each against the correct mentions), the share of hallucinated mentions
    scoring above the score that keeps 90% of correct ones, and CHAIR_s of the captions kept
    when the riskiest 20% are dropped against CHAIR_s of all. ``mentions`` lists each scored
    mention's signals and label, to fit the score's coefficients on."""
    from vacap import risk

    mentions, captions = [], []
    for record, scene in zip(records, shown):
        if record["status"] != "ok" or "risk" not in record:
            continue
        labels = mention_labels(record["caption"], scene.objects, world)
        for mention in record["risk"]["mentions"]:
            if mention["start"] in labels:
                bad, cause = labels[mention["start"]]
                mentions.append({"score": mention["score"], "hallucinated": bad, "cause": cause, "token": mention["token"],
                                 "signals": mention["signals"]})  # fmt: skip
        hallucinated = score_caption(record["caption"], scene.objects, world)["hallucinated"] > 0
        captions.append((record["risk"]["score"], hallucinated))
    scores = [m["score"] for m in mentions]
    labels = [m["hallucinated"] for m in mentions]

    def against_correct(cause: str) -> float | None:
        kept = [m for m in mentions if not m["hallucinated"] or m["cause"] == cause]
        return risk.auroc([m["score"] for m in kept], [m["hallucinated"] for m in kept])

    return {
        "risk_mentions": len(mentions),
        "risk_hallucinated": sum(labels),
        "risk_auroc": risk.auroc(scores, labels),
        "risk_auprc": risk.auprc(scores, labels),
        "risk_auroc_prior": against_correct("prior"),
        "risk_auroc_perceptual": against_correct("perceptual"),
        "risk_caught_at_90": risk.caught_at_keep(scores, labels, keep=0.9),
        "chair_s_all": _ratio(sum(bad for _, bad in captions), len(captions)),
        "chair_s_kept80": risk.kept_chair_s([c for c, _ in captions], [bad for _, bad in captions], drop=0.2),
        "mentions": mentions,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def summarize(scores: Iterable[dict]) -> dict:
    """CHAIR_s, CHAIR_i, recall (and ``_shape`` variants), mean length, the prior split with its
    chance and excess, and the hallucinations by kind and prior, over ``score_caption`` dicts."""
    scores = list(scores)
    total = lambda key: sum(s[key] for s in scores)  # noqa: E731
    at = lambda key, i: sum(s[key][i] for s in scores)  # noqa: E731
    labels = [label for s in scores for label in s["labels"]]
    by_kind, by_prior = Counter(label.kind for label in labels), Counter(label.prior for label in labels)
    both = Counter((label.kind, label.prior) for label in labels)
    return {
        "captions": len(scores),
        "CHAIR_s": _ratio(sum(s["hallucinated"] > 0 for s in scores), len(scores)),
        "CHAIR_i": _ratio(total("hallucinated"), total("mentions")),
        "CHAIR_i_prior": _ratio(total("hallucinated_prior"), total("mentions")),
        "CHAIR_i_perceptual": _ratio(total("hallucinated_perceptual"), total("mentions")),
        "prior_share": _ratio(total("hallucinated_prior"), total("hallucinated")),
        "prior_share_chance": _ratio(total("prior_chance"), total("hallucinated")),
        "prior_share_excess": _ratio(total("hallucinated_prior_excess"), total("hallucinated")),
        "CHAIR_i_prior_chance": _ratio(total("prior_chance"), total("mentions")),
        "CHAIR_i_prior_excess": _ratio(total("hallucinated_prior_excess"), total("mentions")),
        **{
            f"CHAIR_i_{name}": _ratio(at("hallucinated_at", i), at("mentions_at", i))
            for i, name in enumerate(POSITIONS)
        },
        "recall": _ratio(total("recalled"), total("objects")),
        "CHAIR_s_shape": _ratio(sum(s["hallucinated_shape"] > 0 for s in scores), len(scores)),
        "CHAIR_i_shape": _ratio(total("hallucinated_shape"), total("mentions")),
        "recall_shape": _ratio(total("recalled_shape"), total("objects")),
        "mean_length": _ratio(total("words"), len(scores)),
        "mention_count": total("mentions"),
        "hallucinated_count": total("hallucinated"),
        "hallucinated_by_kind": {kind: by_kind[kind] for kind in KINDS},
        "hallucinated_by_prior": {prior: by_prior[prior] for prior in PRIORS},
        "hallucinated_by_kind_and_prior": {kind: {prior: both[kind, prior] for prior in PRIORS} for kind in KINDS},
        "hallucinated_predicted_by": {prior: sum(prior in l.predicted_by for l in labels) for prior in PRIORS[:-1]},
        "hallucinated_by_prior_chance": {prior: sum(label.chance[prior] for label in labels) for prior in PRIORS},
    }


def run_benchmark(
    model: str,
    settings: dict[str, dict],
    n: int = 300,
    seed: int = 1234,
    batch_size: int = 8,
    *,
    dtype: str = "fp32",
    device: str = "auto",
    world: str = "shapes",
    split: str = "test",
    on_record: Callable[[], None] | None = None,
) -> list[dict]:
    """Caption ``n`` seeded test scenes of ``world`` with each named setting; one row of figures
    per setting.

    The scenes are made once (``scenes(n, seed, "test", world=world)``) and written as PNG files (lossless)
    to a temporary folder. The model is loaded once, through the public API as ``vacap``
    loads it, and each setting (``DecodeConfig`` fields as keywords, e.g. ``{"method":
    "greedy"}`` or ``{"sparsity": 0.7}``, the rest at their defaults) runs on it through
    ``Captioner.with_settings``. fp32 by default: the demo model is small and was trained in fp32.

    Each row: ``setting``, ``method``, the :func:`summarize` figures, ``errors`` (records not
    ``ok``), ``tokens`` (generated, stop tokens excluded) and ``tokens_per_s`` (generated tokens
    / the records' decode seconds), ``texts`` (the captions of the ``ok`` records, in scene
    order, for inspection) and ``scores`` (the :func:`score_caption` of every scene, None where
    its record is not ``ok``), which :func:`compare_to_baseline` pairs between settings. A
    setting with ``risk`` adds the :func:`risk_figures` of its records. ``split`` "train" makes
    the scenes the risk score's coefficients are fitted on. ``on_record()`` is called as each
    caption ends (a progress bar's tick).
    """
    from vacap.captioner import Captioner

    shown = scenes(n, seed, split, world=world)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vacap-shapes-") as folder:
        paths = []
        for i, scene in enumerate(shown):
            path = Path(folder) / f"scene_{i:04d}.png"
            scene.image.save(path)
            paths.append(path)
        base = Captioner(model, dtype=dtype, device=device, batch_size=batch_size)
        for name, setting in settings.items():
            captioner = base.with_settings(**setting)
            by_path = {}
            for record in captioner.records([str(path) for path in paths]):
                by_path[record["path"]] = record
                if on_record is not None:
                    on_record()
            records = [by_path[str(path)] for path in paths]
            ok = [(r, scene) for r, scene in zip(records, shown) if r["status"] == "ok"]
            scores = [
                score_caption(r["caption"], scene.objects, world) if r["status"] == "ok" else None
                for r, scene in zip(records, shown)
            ]
            figures = summarize(score for score in scores if score is not None)
            tokens = sum(r["tokens"] for r, _ in ok)
            seconds = sum(r["seconds"] for r, _ in ok)
            rows.append(
                {
                    "setting": name,
                    "method": captioner.config.method,
                    **figures,
                    "errors": len(records) - len(ok),
                    "tokens": tokens,
                    "tokens_per_s": _ratio(tokens, seconds),
                    "texts": [r["caption"] for r, _ in ok],
                    "scores": scores,
                    **(risk_figures(records, shown, world) if captioner.config.risk else {}),
                }
            )
    return rows


def compare_to_baseline(rows: Sequence[dict], baseline: str, **bootstrap) -> dict[str, dict]:
    """Every other setting's CHAIR_s, CHAIR_i (all, prior-driven, perceptual, prior-driven beyond
    chance), prior share beyond chance and recall minus the baseline's, on the scenes both
    captioned, with paired bootstrap intervals (:func:`vacap.evaluate.bootstrap.paired_difference`).

    Returns {setting: {"CHAIR_s_diff": [difference, low, high], "CHAIR_i_diff": [...], ...}}.
    """
    from vacap.evaluate.bootstrap import paired_difference

    base = next(row for row in rows if row["setting"] == baseline)["scores"]
    out = {}
    for row in rows:
        if row["setting"] == baseline:
            continue
        pairs = [(a, b) for a, b in zip(row["scores"], base) if a is not None and b is not None]
        if not pairs:
            continue
        result = paired_difference(*zip(*pairs), **bootstrap)
        out[row["setting"]] = {f"{name}_diff": list(figure) for name, figure in result.items()}
    return out



def print_results(rows: Sequence[dict], world: str, title: str, extra: dict, as_json: bool) -> None:
    """The benchmark's figures on stdout: a table per setting, then each setting against the
    baseline (greedy when it ran, else the first setting) with paired bootstrap intervals; or
    all of it as JSON. Tables keep to 80 columns; what does not fit is in the JSON."""
    from vacap.evaluate.report import interval_text, print_report

    baseline = "greedy" if any(row["setting"] == "greedy" for row in rows) else rows[0]["setting"]
    differences = compare_to_baseline(rows, baseline)
    hidden = ("setting", "texts", "scores", "mentions")
    table = {
        row["setting"]: {**{k: v for k, v in row.items() if k not in hidden}, **differences.get(row["setting"], {})}
        for row in rows
    }
    # Six figures fit in 80 columns beside a long sweep label; the rest are in --json. On the priors
    # world, CHAIR_i's prior-driven part, the part chance alone gives and the excess left, which says
    # how much the priors drive errors, take the place of CHAIR_s, words and tok/s.
    if world == "priors":
        first = ["CHAIR_i", "CHAIR_i_prior", "CHAIR_i_prior_chance", "CHAIR_i_prior_excess", "recall"]
        columns = [*first, "errors"]
    else:
        first = ["CHAIR_s", "CHAIR_i", "recall"]
        columns = [*first, "mean_length", "tokens_per_s", "errors"]
    print_report(
        title, table, columns, as_json, {**extra, "baseline": baseline},
        headers={"CHAIR_i_prior": "prior", "CHAIR_i_prior_chance": "chance", "CHAIR_i_prior_excess": "excess",
                 "mean_length": "words", "tokens_per_s": "tok/s", "errors": "err"},
        formats={name: ".3f" for name in first} | {"mean_length": ".1f", "tokens_per_s": ".1f"},
    )  # fmt: skip
    risky = {label: figures for label, figures in table.items() if "risk_auroc" in figures}
    if risky and not as_json:
        # vacap caption --risk against the world's truth (docs/evaluation.md#risk).
        print_report(
            "risk scores against the truth (mention AUROC; kept80: CHAIR_s without the riskiest 20%)",
            risky, ["risk_auroc", "risk_auroc_prior", "risk_auroc_perceptual", "risk_auprc", "risk_caught_at_90",
                    "chair_s_kept80", "chair_s_all"], False,
            headers={"risk_auroc": "AUROC", "risk_auroc_prior": "prior", "risk_auroc_perceptual": "percep",
                     "risk_auprc": "AUPRC", "risk_caught_at_90": "caught", "chair_s_kept80": "kept80",
                     "chair_s_all": "CHAIR_s"},
            formats={name: ".3f" for name in ("risk_auroc", "risk_auroc_prior", "risk_auroc_perceptual", "risk_auprc",
                                              "risk_caught_at_90", "chair_s_kept80", "chair_s_all")},
        )  # fmt: skip
    if differences and not as_json:
        # Two intervals fit in 80 columns; on the priors world, the two that say whether a setting
        # cuts prior-driven hallucinations beyond chance without losing objects (all are in --json).
        shown = ["CHAIR_i_prior_excess", "recall"] if world == "priors" else ["CHAIR_s", "CHAIR_i"]
        print_report(
            f"minus {baseline}, in points [95% paired bootstrap]",
            {label: {k: interval_text(v) for k, v in figures.items()} for label, figures in differences.items()},
            [f"{name}_diff" for name in shown], False,
            headers={"CHAIR_s_diff": "CHAIR_s", "CHAIR_i_diff": "CHAIR_i", "CHAIR_i_prior_excess_diff": "excess",
                     "recall_diff": "recall"},
        )  # fmt: skip


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`run_benchmark` rows (CHAIR and recall in percent)."""
    lines = [
        "| setting | method | CHAIR_s % | CHAIR_i % | recall % | CHAIR_i (shape) % | recall (shape) % | words | tokens/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {row['method']} | {100 * row['CHAIR_s']:.1f} | {100 * row['CHAIR_i']:.1f} "
            f"| {100 * row['recall']:.1f} | {100 * row['CHAIR_i_shape']:.1f} | {100 * row['recall_shape']:.1f} "
            f"| {row['mean_length']:.1f} | {row['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"

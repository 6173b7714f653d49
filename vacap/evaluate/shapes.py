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
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from vacap.demo.shapes import COLOURS, SHAPES, Shape, scenes

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
    words = _WORD.findall(caption.lower())
    mentions: list[tuple[str | None, str]] = []
    pending: list[str] = []
    for i, word in enumerate(words):
        if word in COLOUR_WORDS:
            pending.append(COLOUR_WORDS[word])
        elif word in SHAPE_WORDS:
            shape = SHAPE_WORDS[word]
            mentions += [(colour, shape) for colour in pending] if pending else [(None, shape)]
            pending = []
        elif word in _MODIFIERS:
            continue
        elif word in _CONJUNCTIONS and pending and i + 1 < len(words) and words[i + 1] in COLOUR_WORDS:
            continue  # "red and blue circles"
        else:
            pending = []
    return mentions


def _matches(colour: str | None, shape: str, obj: Shape) -> bool:
    return obj.kind == shape and (colour is None or obj.colour == colour)


def score_caption(caption: str, truth: Sequence[Shape]) -> dict:
    """Counts for one caption against its scene's objects (see the module docstring)."""
    mentions = list(dict.fromkeys(extract_objects(caption)))
    hallucinated = [m for m in mentions if not any(_matches(*m, obj) for obj in truth)]
    hallucinated_shape = [m for m in mentions if not any(obj.kind == m[1] for obj in truth)]
    recalled = [obj for obj in truth if any(_matches(*m, obj) for m in mentions)]
    recalled_shape = [obj for obj in truth if any(obj.kind == m[1] for m in mentions)]
    return {
        "mentions": len(mentions),
        "hallucinated": len(hallucinated),
        "hallucinated_shape": len(hallucinated_shape),
        "objects": len(truth),
        "recalled": len(recalled),
        "recalled_shape": len(recalled_shape),
        "words": len(caption.split()),
        "hallucinated_mentions": hallucinated,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def summarize(scores: Iterable[dict]) -> dict:
    """CHAIR_s, CHAIR_i, recall (and ``_shape`` variants) and mean length over ``score_caption`` dicts."""
    scores = list(scores)
    total = lambda key: sum(s[key] for s in scores)  # noqa: E731
    return {
        "captions": len(scores),
        "CHAIR_s": _ratio(sum(s["hallucinated"] > 0 for s in scores), len(scores)),
        "CHAIR_i": _ratio(total("hallucinated"), total("mentions")),
        "recall": _ratio(total("recalled"), total("objects")),
        "CHAIR_s_shape": _ratio(sum(s["hallucinated_shape"] > 0 for s in scores), len(scores)),
        "CHAIR_i_shape": _ratio(total("hallucinated_shape"), total("mentions")),
        "recall_shape": _ratio(total("recalled_shape"), total("objects")),
        "mean_length": _ratio(total("words"), len(scores)),
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
) -> list[dict]:
    """Caption ``n`` seeded test scenes with each named setting; one row of figures per setting.

    The scenes are made once (``scenes(n, seed, "test")``) and written as PNG files (lossless)
    to a temporary folder. The model is loaded once, through the public API as ``vacap``
    loads it, and each setting (``DecodeConfig`` fields as keywords, e.g. ``{"method":
    "greedy"}`` or ``{"sparsity": 0.7}``, the rest at their defaults) runs on it through
    ``Captioner.with_settings``. fp32 by default: the demo model is small and was trained in fp32.

    Each row: ``setting``, ``method``, the :func:`summarize` figures, ``errors`` (records not
    ``ok``), ``tokens`` (generated, stop tokens excluded) and ``tokens_per_s`` (generated tokens
    / the records' decode seconds), ``texts`` (the captions of the ``ok`` records, in scene
    order, for inspection) and ``scores`` (the :func:`score_caption` of every scene, None where
    its record is not ``ok``), which :func:`compare_to_baseline` pairs between settings.
    """
    from vacap.captioner import Captioner

    shown = scenes(n, seed, "test")
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
            records = captioner.caption(paths)
            ok = [(r, scene) for r, scene in zip(records, shown) if r["status"] == "ok"]
            scores = [
                score_caption(r["caption"], scene.objects) if r["status"] == "ok" else None
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
                }
            )
    return rows


def compare_to_baseline(rows: Sequence[dict], baseline: str, **bootstrap) -> dict[str, dict]:
    """Every other setting's CHAIR_s and CHAIR_i minus the baseline's, on the scenes both
    captioned, with paired bootstrap intervals (:func:`vacap.evaluate.bootstrap.paired_difference`).

    Returns {setting: {"CHAIR_s_diff": [difference, low, high], "CHAIR_i_diff": [...]}}.
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

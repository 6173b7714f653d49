"""CHAIR: how many of the COCO objects a caption names are not in the image.

Rohrbach et al. (2018), "Object Hallucination in Image Captioning". A caption's objects are
found by word matching against the 80 COCO classes and their synonyms (:mod:`.coco`); an object
is hallucinated when its class is not among the image's ground-truth objects (the classes of its
segmentation annotations, plus the objects its human captions name when those are given).

- ``CHAIR_s``: the fraction of captions with at least one hallucinated object.
- ``CHAIR_i``: hallucinated object mentions over all object mentions. Every mention counts, a
  repeated one too ("a dog ... the dog" is two), as the reference implementation counts them.
- ``recall``: ground-truth objects a caption names over all ground-truth objects, both summed
  over the captions (a micro average), as in the OPERA / HALC version of the reference script
  the hallucination papers report.
- ``avg_len``: mean caption length in words.

Unlike the reference this reads words with a small regex tokenizer and singularises them with
lemminflect, which ships its data (the reference needs nltk downloads).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

from lemminflect import getLemma

from .coco import (
    ANIMAL_QUALIFIERS,
    COCO_SYNONYMS,
    MULTI_WORDS,
    PASSENGER_VEHICLES,
    PHRASE_MEANINGS,
    QUALIFIED_ANIMALS,
)

# Letters and digits, with inner hyphens and apostrophes kept ("man-made" is one word, like
# nltk's tokenizer has it, so it does not name a man).
_WORD = re.compile(r"[^\W_]+(?:[-'’][^\W_]+)*")
_POSSESSIVE = re.compile(r"['’]s$")
# COCO 2014 names (COCO_val2014_000000123456.jpg, any split) and bare COCO 2017 names.
_COCO_FILE = re.compile(r"^(?:COCO_[A-Za-z]+\d*_(\d+)|(\d{12}))\.[A-Za-z]+$")


def _synonym_to_class() -> dict[str, str]:
    return {
        word: name for name, synonyms in COCO_SYNONYMS.items() for word in (name, *synonyms)
    }


def _phrases() -> dict[tuple[str, ...], str]:
    """Word sequences read as one word -> that word (which may name no COCO class)."""
    phrases = {tuple(word.split()): word for word in _SYNONYM_TO_CLASS if " " in word}
    phrases.update({tuple(word.split()): word for word in MULTI_WORDS})
    for animal in QUALIFIED_ANIMALS:
        for qualifier in ANIMAL_QUALIFIERS:
            phrases[(qualifier, animal)] = animal
    for vehicle in PASSENGER_VEHICLES:
        phrases[("passenger", vehicle)] = vehicle
    phrases.update({tuple(phrase.split()): word for phrase, word in PHRASE_MEANINGS.items()})
    return phrases


_SYNONYM_TO_CLASS = _synonym_to_class()
_PHRASES = _phrases()


class WordMatcher:
    """Finds a vocabulary's words in text, with the character span each has there.

    ``synonyms``: vocabulary word (lowercase, possibly several words separated by single spaces)
    -> the class it names. ``phrases``: word sequences read as one word -> that word, which may
    name no class (so "train track" keeps "train" from counting); every multi-word synonym is a
    phrase of itself as well. Text is read as CHAIR reads it: words of letters and digits with
    inner hyphens and apostrophes ("man-made" is one word), lowercased, a possessive "'s"
    dropped, and singularised with lemminflect when the singular is a known word and the word
    itself is not; the words of a phrase must be separated by whitespace only ("hot, dog" names
    a dog) and the longest phrase wins.
    """

    def __init__(
        self, synonyms: Mapping[str, str], phrases: Mapping[tuple[str, ...], str] | None = None
    ) -> None:
        self.synonyms = dict(synonyms)
        self.phrases = {tuple(word.split()): word for word in self.synonyms if " " in word}
        self.phrases.update(phrases or {})
        self._longest = max((len(phrase) for phrase in self.phrases), default=1)
        self._starts = frozenset(phrase[0] for phrase in self.phrases)  # skips most tokens fast
        # Every single word the matching can use, inside phrases too.
        self.vocabulary = frozenset(
            {part for word in self.synonyms for part in word.split()}
            | {part for phrase in self.phrases for part in phrase}
        )
        self._normalized: dict[str, str] = {}

    def normalize(self, token: str) -> str:
        """The vocabulary form of a lowercase token: singular when that is a known word.

        A token already in the vocabulary stays as it is, so that words lemminflect would change
        keep their meaning ("skis", "scissors", "people", "sports" of "sports ball"). Otherwise
        the first noun lemma that is a known word wins ("giraffes" -> "giraffe", "mice" ->
        "mouse"); a token with none stays as it is, as it names no object either way.
        """
        if token not in self._normalized:
            word = _POSSESSIVE.sub("", token)
            if word not in self.vocabulary:
                word = next(
                    (lemma for lemma in getLemma(word, upos="NOUN") if lemma in self.vocabulary), word
                )
            self._normalized[token] = word
        return self._normalized[token]

    def words(self, caption: str) -> list[tuple[int, int, str]]:
        """(start, end, vocabulary form) of every word of ``caption``, phrases read as one word;
        ``caption[start:end]`` is the word as written."""
        matches = list(_WORD.finditer(caption))
        tokens = [self.normalize(match.group().lower()) for match in matches]
        words = []
        i = 0
        while i < len(tokens):
            size, word = self._phrase_at(caption, matches, tokens, i)
            words.append((matches[i].start(), matches[i + size - 1].end(), word))
            i += size
        return words

    def spans(self, caption: str) -> list[tuple[int, int, str]]:
        """(start, end, class) of each mention of a vocabulary word in ``caption``, in order."""
        return [
            (start, end, self.synonyms[word])
            for start, end, word in self.words(caption)
            if word in self.synonyms
        ]

    def _phrase_at(self, caption: str, matches: list, tokens: list[str], i: int) -> tuple[int, str]:
        """(number of tokens, word) of the longest phrase starting at token i, else the token."""
        if tokens[i] not in self._starts:
            return 1, tokens[i]
        for size in range(min(self._longest, len(tokens) - i), 1, -1):
            phrase = tuple(tokens[i:i + size])
            # Only words separated by spaces form a phrase: "hot, dog" names a dog.
            gaps = (
                caption[matches[j].end():matches[j + 1].start()] for j in range(i, i + size - 1)
            )
            if phrase in self.phrases and all(gap.isspace() for gap in gaps):
                return size, self.phrases[phrase]
        return 1, tokens[i]


# The COCO classes, their synonyms and the reference's multi-word rules.
COCO = WordMatcher(_SYNONYM_TO_CLASS, _PHRASES)


def image_id_of(record: Mapping) -> int | None:
    """The COCO image id of a caption record: its ``image_id``, else from its file name."""
    image_id = record.get("image_id")
    if image_id is not None:
        try:
            return int(image_id)
        except (TypeError, ValueError):
            return None
    path = record.get("path")
    if not isinstance(path, str):
        return None
    match = _COCO_FILE.match(PurePath(path.replace("\\", "/")).name)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


@dataclass
class CaptionScore:
    """The COCO objects of one caption, checked against its image's ground truth."""

    image_id: int
    mentioned: list[str]  # COCO classes in mention order, repeats kept
    hallucinated: list[tuple[str, str]]  # (word as written, COCO class) per hallucinated mention
    ground_truth: set[str]
    words: int  # caption length in words

    @property
    def covered(self) -> set[str]:
        """Ground-truth objects the caption names."""
        return self.ground_truth.intersection(self.mentioned)


class Chair:
    """CHAIR scorer over a fixed set of images and their ground-truth COCO objects."""

    def __init__(self, ground_truth: Mapping[int, Iterable[str]]) -> None:
        self.ground_truth = {int(i): set(objects) for i, objects in ground_truth.items()}

    @classmethod
    def from_coco(
        cls, instances: str | Path | dict, captions: str | Path | dict | None = None
    ) -> Chair:
        """Ground truth from a COCO instances file, plus the objects its human captions name.

        Every image the files list is known, even one without annotations (it has no objects,
        so anything a caption names for it is hallucinated).
        """
        instances = _load_json(instances)
        names = {
            category["id"]: _SYNONYM_TO_CLASS.get(category["name"].lower(), category["name"])
            for category in instances.get("categories", [])
        }
        ground_truth: dict[int, set[str]] = {
            image["id"]: set() for image in instances.get("images", [])
        }
        for annotation in instances.get("annotations", []):
            objects = ground_truth.setdefault(annotation["image_id"], set())
            objects.add(names[annotation["category_id"]])
        if captions is not None:
            captions = _load_json(captions)
            for image in captions.get("images", []):
                ground_truth.setdefault(image["id"], set())
            for annotation in captions.get("annotations", []):
                objects = ground_truth.setdefault(annotation["image_id"], set())
                objects.update(name for _, name in objects_in(annotation["caption"]))
        return cls(ground_truth)

    def objects_in(self, caption: str) -> list[tuple[str, str]]:
        """(word as written, COCO class) for each object mention, in caption order."""
        return objects_in(caption)

    def score(self, image_id: int, caption: str) -> CaptionScore:
        """Which objects the caption names and which of them the image does not hold."""
        if image_id not in self.ground_truth:
            raise KeyError(f"image {image_id} is not in the annotations")
        ground_truth = self.ground_truth[image_id]
        objects = objects_in(caption)
        return CaptionScore(
            image_id=image_id,
            mentioned=[name for _, name in objects],
            hallucinated=[(word, name) for word, name in objects if name not in ground_truth],
            ground_truth=set(ground_truth),
            words=len(_WORD.findall(caption)),
        )

    def evaluate(self, records: Iterable[dict], per_image: bool = False) -> dict:
        """CHAIR metrics of vacap caption records, overall and per method label.

        Returns ``{"overall": metrics, "by_method": {label: metrics}, "unmatched": n,
        "not_ok": n}`` and, with ``per_image``, ``"per_image"``: one entry per scored caption.
        Metrics are ``CHAIR_s``, ``CHAIR_i``, ``recall``, ``avg_len`` and ``n`` (see the module
        docstring); labels come from :func:`method_labels`.

        Only ``ok`` records count. Those whose image is not in the annotations (or has no id)
        are counted as ``unmatched``; records of any other status as ``not_ok``. When a file
        holds the same image with the same settings twice, the last record wins, as on resume.
        """
        latest: dict[tuple, dict] = {}
        for record in records:
            key = (record.get("path"), record.get("model"), record.get("method"),
                   json.dumps(record.get("params"), sort_keys=True))
            latest[key] = record  # an error that was retried later counts as the retry
        scored = []
        unmatched = not_ok = 0
        for record in latest.values():
            if record.get("status") != "ok":
                not_ok += 1
                continue
            image_id = image_id_of(record)
            if image_id is None or image_id not in self.ground_truth:
                unmatched += 1
                continue
            scored.append((record, self.score(image_id, record.get("caption") or "")))
        labels = method_labels([record for record, _ in scored])
        by_method: dict[str, list[CaptionScore]] = {}
        for (_, caption_score), label in zip(scored, labels):
            by_method.setdefault(label, []).append(caption_score)
        result = {
            "overall": _metrics([caption_score for _, caption_score in scored]),
            "by_method": {label: _metrics(scores) for label, scores in by_method.items()},
            "unmatched": unmatched,
            "not_ok": not_ok,
        }
        if per_image:
            result["per_image"] = [
                {
                    "path": record.get("path"),
                    "image_id": caption_score.image_id,
                    "method": label,
                    "caption": record.get("caption"),
                    "hallucinated": [list(pair) for pair in caption_score.hallucinated],
                    "mentioned": caption_score.mentioned,
                }
                for (record, caption_score), label in zip(scored, labels)
            ]
        return result


    def risk_figures(self, records: Iterable[dict]) -> dict:
        """How well the risk scores of ``vacap caption --risk`` records find the objects CHAIR
        calls hallucinated: mention AUROC and AUPRC, and the share of hallucinated mentions
        scoring above the score that keeps 90% of the correct ones. Only ok records of images
        in the annotations that carry ``risk`` count; ``risk_mentions`` says how many mentions."""
        from vacap import risk

        scores, labels = [], []
        for record in records:
            image_id = image_id_of(record) if record.get("status") == "ok" else None
            if image_id is None or image_id not in self.ground_truth or "risk" not in record:
                continue
            for mention in record["risk"]["mentions"]:
                scores.append(mention["score"])
                labels.append(mention["object"] not in self.ground_truth[image_id])
        return {
            "risk_mentions": sum(score is not None for score in scores),
            "risk_hallucinated": sum(label for score, label in zip(scores, labels) if score is not None),
            "risk_auroc": risk.auroc(scores, labels),
            "risk_auprc": risk.auprc(scores, labels),
            "risk_caught_at_90": risk.caught_at_keep(scores, labels, keep=0.9),
        }


def objects_in(caption: str) -> list[tuple[str, str]]:
    """(word as written, COCO class) for each object mention in a caption, in order."""
    return [(caption[start:end], name) for start, end, name in object_spans(caption)]


def object_spans(caption: str) -> list[tuple[int, int, str]]:
    """(start, end, COCO class) for each object mention in a caption, in order:
    ``caption[start:end]`` is the mention as written (several words for a phrase)."""
    words = COCO.words(caption)
    # "the seat of the toilet" names the toilet's seat, not a chair (a reference rule).
    if any(word == "toilet" for _, _, word in words):
        words = [(start, end, word) for start, end, word in words if word != "seat"]
    return [(start, end, COCO.synonyms[word]) for start, end, word in words if word in COCO.synonyms]


def method_labels(records: list[dict]) -> list[str]:
    """A label per record: its method, plus the settings that tell that method's records apart.

    ``vasparse sparsity=0.3`` and ``vasparse sparsity=0.7`` when only the sparsity differs among
    the vasparse records; the model joins the settings when the records come from several.
    """
    settings = [
        {"model": record.get("model"), **(record.get("params") or {})} for record in records
    ]
    methods = [str(record.get("method")) for record in records]
    differing: dict[str, list[str]] = {}
    for method in dict.fromkeys(methods):
        group = [s for s, m in zip(settings, methods) if m == method]
        keys = sorted({key for s in group for key in s})
        differing[method] = [key for key in keys if len({_shown(s.get(key)) for s in group}) > 1]
    return [
        " ".join([method, *(f"{key}={_shown(s.get(key))}" for key in differing[method])])
        for s, method in zip(settings, methods)
    ]


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _metrics(scores: list[CaptionScore]) -> dict:
    """Aggregate metrics; a rate with nothing to count is 0.0."""
    mentions = sum(len(s.mentioned) for s in scores)
    ground_truth = sum(len(s.ground_truth) for s in scores)
    return {
        "CHAIR_s": _ratio(sum(1 for s in scores if s.hallucinated), len(scores)),
        "CHAIR_i": _ratio(sum(len(s.hallucinated) for s in scores), mentions),
        "recall": _ratio(sum(len(s.covered) for s in scores), ground_truth),
        "avg_len": _ratio(sum(s.words for s in scores), len(scores)),
        "n": len(scores),
    }


def _ratio(count: int, total: int) -> float:
    return count / total if total else 0.0


def _load_json(source: str | Path | dict) -> dict:
    if isinstance(source, dict):
        return source
    with open(source, encoding="utf-8") as f:
        return json.load(f)


def nothing_scored(records: list[dict], result: dict, instances: Path) -> str:
    """Why CHAIR scored no record, with what the user can check."""
    if not records:
        return "the records file holds no record"
    if not result["unmatched"]:
        return f"none of the {len(records)} records is ok (status other than ok), so no caption is scored"
    names = [PurePath(str(r.get("path"))).name for r in records if r.get("status") == "ok"]
    return (
        f"none of the {result['unmatched']} ok records matches an image of {instances}: CHAIR finds an "
        "image by its COCO id, from an image_id field or a file name such as COCO_val2014_000000123456.jpg "
        f"or 000000123456.jpg, and these records' files are named like {', '.join(names[:3])}"
    )

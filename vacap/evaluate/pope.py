"""POPE: yes/no questions about objects that are, and are not, in COCO images.

Li et al. (2023), "Evaluating Object Hallucination in Large Vision-Language Models". Each image
gets ``per_image`` questions about objects it holds (answer "yes") and as many about objects it
does not (answer "no"); the split decides how the absent objects are picked:

- ``random``: uniformly among the classes the image does not hold.
- ``popular``: the classes found in the most images of the dataset.
- ``adversarial``: as POPE pairs them, for each present object asked about, the class that most
  often shares an image with it in the dataset.

A class never repeats within an image, and an absent class is never one the image holds. Only
images annotated with at least ``per_image`` classes (3, as in POPE) take part.

An answer counts when its first sentence says yes or no (:func:`parse_answer`); one that says
neither is *unanswered* and left out of every rate. POPE's own script reads any answer without a
negation as "yes", which scores a model that never answers the question as always saying yes.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

SPLITS = ("random", "popular", "adversarial")

_SENTENCE_END = re.compile(r"[.!?\n]")
_ANSWER_WORD = re.compile(r"[a-z]+(?:['’][a-z]+)?")


@dataclass(frozen=True)
class Question:
    """One POPE question: is ``object`` in image ``image_id``? ``label`` is the true answer."""

    image_id: int
    file_name: str
    object: str
    label: str  # "yes" | "no"
    text: str


def question_text(name: str) -> str:
    """POPE's question, with "an" before a vowel as POPE's released question files have it."""
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"Is there {article} {name} in the image?"


@dataclass
class _Dataset:
    """What the splits need from a COCO instances file."""

    classes: list[str]  # in category order, which breaks ties between equal counts
    file_names: dict[int, str]
    objects: dict[int, set[str]]  # image id -> classes annotated in it
    frequency: Counter  # class -> number of images holding it
    co_occurrence: dict[str, Counter]  # class -> class -> number of images holding both

    @classmethod
    def load(cls, instances: str | Path | dict) -> _Dataset:
        if not isinstance(instances, dict):
            with open(instances, encoding="utf-8") as f:
                instances = json.load(f)
        names = {category["id"]: category["name"] for category in instances["categories"]}
        objects: dict[int, set[str]] = defaultdict(set)
        for annotation in instances["annotations"]:
            objects[annotation["image_id"]].add(names[annotation["category_id"]])
        frequency = Counter(name for image_objects in objects.values() for name in image_objects)
        co_occurrence: dict[str, Counter] = defaultdict(Counter)
        for image_objects in objects.values():
            for a, b in combinations(sorted(image_objects), 2):
                co_occurrence[a][b] += 1
                co_occurrence[b][a] += 1
        return cls(
            classes=list(names.values()),
            file_names={image["id"]: image.get("file_name", "") for image in instances["images"]},
            objects=dict(objects),
            frequency=frequency,
            co_occurrence=co_occurrence,
        )

    def most_counted(self, names: list[str], counts: Counter) -> list[str]:
        """``names`` sorted by count, highest first, ties in category order."""
        order = {name: i for i, name in enumerate(self.classes)}
        return sorted(names, key=lambda name: (-counts[name], order[name]))


def build_questions(
    instances: str | Path | dict,
    split: str,
    *,
    images: int | None = None,
    per_image: int = 3,
    seed: int = 0,
) -> list[Question]:
    """POPE questions for one split of a COCO instances file.

    An image takes part when it holds at least ``per_image`` classes (and lacks as many).
    The eligible images, in image id order, are shuffled with ``seed`` and the first ``images``
    of them used (all when None or when there are fewer). Each image draws its questions from
    its own generator seeded by ``seed`` and its id, so an image gets the same present objects
    in all three splits and the same questions whatever ``images`` is. Questions come per image
    in that order, yes and no alternating (POPE's layout): present object, absent object, ...
    """
    if split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; choose one of {', '.join(SPLITS)}")
    if per_image < 1:
        raise ValueError(f"per_image must be at least 1, got {per_image}")
    if images is not None and images < 0:
        raise ValueError(f"images must not be negative, got {images}")
    data = _Dataset.load(instances)
    eligible = sorted(
        image_id
        for image_id, present in data.objects.items()
        if len(present) >= per_image and len(data.classes) - len(present) >= per_image
    )
    if not eligible:
        raise ValueError(
            f"no image in the instances file has at least {per_image} annotated classes (and lacks "
            f"{per_image} of its {len(data.classes)} classes): POPE asks about {per_image} present and "
            f"{per_image} absent objects per image"
        )
    random.Random(seed).shuffle(eligible)
    questions = []
    for image_id in eligible[:images]:
        rng = random.Random(f"{seed}:{image_id}")
        present = data.objects[image_id]
        asked = rng.sample([name for name in data.classes if name in present], per_image)
        absent = _absent_objects(data, split, present, asked, rng)
        for yes, no in zip(asked, absent):
            questions.append(_question(data, image_id, yes, "yes"))
            questions.append(_question(data, image_id, no, "no"))
    return questions


def _absent_objects(
    data: _Dataset, split: str, present: set[str], asked: list[str], rng: random.Random
) -> list[str]:
    """One absent class per present class asked about, picked as the split says."""
    candidates = [name for name in data.classes if name not in present]
    if split == "random":
        return rng.sample(candidates, len(asked))
    if split == "popular":
        return data.most_counted(candidates, data.frequency)[: len(asked)]
    chosen: list[str] = []
    for name in asked:
        counts = data.co_occurrence[name]
        left = [other for other in candidates if other not in chosen]
        partners = [other for other in left if counts[other] > 0]
        # When no absent class ever shares an image with this one, chance picks, as in POPE.
        chosen.append(data.most_counted(partners, counts)[0] if partners else rng.choice(left))
    return chosen


def _question(data: _Dataset, image_id: int, name: str, label: str) -> Question:
    return Question(image_id, data.file_names.get(image_id, ""), name, label, question_text(name))


def parse_answer(text: str) -> str | None:
    """"yes", "no", or None (unanswered) for a free-form answer.

    Only the first sentence counts, in any case. It is "no" when it holds the word "no" or
    "not" ("n't" counts as "not": "There isn't a dog."), as in POPE; else "yes" when it holds
    "yes"; else None: an empty answer or one that says neither, which POPE's
    script would have read as "yes".
    """
    first_sentence = _SENTENCE_END.split(text.strip(), maxsplit=1)[0].lower()
    words = _ANSWER_WORD.findall(first_sentence)
    if any(word in ("no", "not") or word.endswith(("n't", "n’t")) for word in words):
        return "no"
    if "yes" in words:
        return "yes"
    return None



@dataclass
class Answers:
    """What :func:`ask` got: the questions whose image could be read, their answers, and how
    many questions were skipped because their image is missing or unreadable."""

    asked: list[Question]
    answers: list[str]
    missing: int


def ask(captioner, questions: Sequence[Question], images: Path, advance=lambda n: None) -> Answers:
    """Put each image's questions to ``captioner`` together (one decode of all of them), the
    images read from the folder ``images``; ``advance(n)`` after each image's n questions."""
    from vacap.images import ImageError

    by_image: dict[str, list[Question]] = defaultdict(list)
    for question in questions:
        by_image[question.file_name].append(question)
    result = Answers([], [], 0)
    for file_name, group in by_image.items():
        try:
            replies = captioner.answer(images / file_name, [q.text for q in group])
        except ImageError:
            result.missing += len(group)
        else:
            result.asked += group
            result.answers += replies
        advance(len(group))
    return result


def write_answers(path: Path, answers: Answers) -> None:
    """Every answer with its question and how it was read, as JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for question, answer in zip(answers.asked, answers.answers):
            entry = {**question.__dict__, "answer": answer, "parsed": parse_answer(answer)}
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def score(questions: Sequence[Question], answers: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 and the share of "yes" answers, "yes" being positive.

    ``answers`` are the model's raw answers, parsed with :func:`parse_answer`, in the order of
    ``questions``. Unanswered questions (no yes/no in the answer) are counted in
    ``unanswered`` and left out of everything else: ``n`` is the number answered. A rate with
    nothing to count is 0.0.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    parsed = [parse_answer(answer) for answer in answers]
    answered = [(question, reply) for question, reply in zip(questions, parsed) if reply is not None]
    predicted = [reply == "yes" for _, reply in answered]
    actual = [question.label == "yes" for question, _ in answered]
    tp = sum(p and a for p, a in zip(predicted, actual))
    fp = sum(p and not a for p, a in zip(predicted, actual))
    fn = sum(a and not p for p, a in zip(predicted, actual))
    tn = len(actual) - tp - fp - fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(actual)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, len(actual)),
        "n": len(actual),
        "unanswered": len(questions) - len(actual),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _ratio(count: float, total: float) -> float:
    return count / total if total else 0.0

"""Hallucination risk of the objects a caption names, from the decoder's per-token signals.

A caption's *mentions* are the words of an object vocabulary it holds (:func:`find_mentions`),
each with its exact character span in the caption. Each mention is tied to its first generated
token, the step where the model committed to the word (:func:`mention_tokens`), and that
token's signals are combined into a score in [0, 1] by a logistic regression
(:func:`score`, coefficients from :func:`load_coefficients`, fitted by :func:`fit`).
:func:`caption_risk` puts it all together into a record's ``risk`` object; :func:`auroc`,
:func:`auprc`, :func:`caught_at_keep` and :func:`kept_chair_s` measure how well scores pick out
the hallucinated mentions and captions.

Vocabularies (:func:`vocabulary_for`): the COCO classes and their synonyms as ``vacap eval
chair`` reads them, the shapes worlds' shape words for the demo models, or a user's file
(:func:`read_vocabulary`).

Per-token signals (one float per generated token, aligned with the generated token ids):
:data:`SIGNALS`. No torch here; numpy is imported by :func:`fit` only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vacap.evaluate.chair import _WORD, WordMatcher, object_spans
from vacap.text import boilerplate_span, drop_incomplete, token_texts

SIGNALS = ("entropy", "neg_logprob", "neg_margin", "branch_log_ratio")
COEFFICIENTS_FILE = Path(__file__).resolve().parent / "risk_coefficients.json"
DIGITS = 4  # decimals of the scores and signals written into a record

_VOCABULARY_SYNTAX = (
    "a line is `word` or `word: synonym, synonym, ...` (a word is letters and digits, "
    "with - or ' inside it, or several such words separated by spaces); blank lines and "
    "# comments are allowed"
)


# --- vocabularies and mentions ------------------------------------------------------------------


@dataclass(frozen=True)
class Mention:
    """One object word in a caption: ``caption[start:end] == text``; ``object`` is its class."""

    text: str
    start: int
    end: int
    object: str


@dataclass(frozen=True)
class Vocabulary:
    """Object words to find in captions.

    ``name``: "coco", "shapes" or the path of the user's file. ``spans``: caption -> a
    ``(start, end, class)`` per mention, in caption order.
    """

    name: str
    spans: Callable[[str], list[tuple[int, int, str]]]


def find_mentions(caption: str, vocab: Vocabulary) -> list[Mention]:
    """The object mentions of ``caption``, in order, every repeat included.

    Matching is case-insensitive; plurals and possessives count ("dogs", "dog's"); synonyms
    give their class ("motorbike" -> motorcycle); multi-word objects are one mention ("hot
    dog" is a hot dog, not a dog) when their words are separated by whitespace only.
    """
    return [Mention(caption[start:end], start, end, name) for start, end, name in vocab.spans(caption)]


COCO_VOCABULARY = Vocabulary("coco", object_spans)


@lru_cache(maxsize=None)
def shapes_vocabulary() -> Vocabulary:
    """The shapes worlds' objects (both worlds share them): the shape words of ``vacap eval
    shapes`` (:data:`vacap.evaluate.shapes.SHAPE_WORDS`: names, plurals, synonyms such as
    "disc" -> circle). Colours are modifiers of a shape, not objects, so they are not mentions:
    in "a red circle" the mention is "circle"."""
    from vacap.evaluate.shapes import SHAPE_WORDS

    return Vocabulary("shapes", WordMatcher(SHAPE_WORDS).spans)


def vocabulary_for(model: str, vocab_file: str | Path | None = None) -> Vocabulary:
    """The vocabulary of captions by ``model`` (a ``--model`` value): the user's file when one is
    given (it replaces the built-in ones), the shapes vocabulary for the demo models (``demo``,
    ``demo-priors`` or their folders), COCO otherwise. Raises ``ValueError`` for a bad file
    (:func:`read_vocabulary`)."""
    if vocab_file is not None:
        return read_vocabulary(vocab_file)
    from vacap.model import DEMO_MODELS

    if model in DEMO_MODELS:
        return shapes_vocabulary()
    try:
        folder = Path(model).resolve()
    except (OSError, ValueError):
        return COCO_VOCABULARY
    if any(folder == path.resolve() for path in DEMO_MODELS.values()):
        return shapes_vocabulary()
    return COCO_VOCABULARY


def read_vocabulary(path: str | Path) -> Vocabulary:
    """A vocabulary from a user's file (``--risk-vocab``), read as :func:`parse_vocabulary` says.

    Raises ``ValueError`` naming the file (and the line, for a bad line) when it cannot be read,
    is not UTF-8, has a bad line or holds no word.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the vocabulary file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text") from None
    return Vocabulary(str(path), WordMatcher(parse_vocabulary(text, str(path))).spans)


def parse_vocabulary(text: str, source: str = "<vocabulary>") -> dict[str, str]:
    """word -> class of a vocabulary file's text; ``source`` names it in errors.

    One entry per line: ``word`` (a class named by itself) or ``word: synonym, synonym``
    (the synonyms name the class ``word`` too). A word is letters and digits with ``-`` or
    ``'`` inside it, or several such words separated by spaces ("teddy bear"); words are
    matched case-insensitively (they are lowercased here), and plurals are found from the
    singular. ``#`` starts a comment, to the end of the line; blank lines are skipped. A class
    may take several lines; a word may not name two classes.

    Raises ``ValueError`` "SOURCE, line N: what is wrong; what a line may be" for a bad line,
    and "SOURCE: ..." for a file without words.
    """
    words: dict[str, tuple[str, int]] = {}  # word -> (class, line it was given on)
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue

        def bad(problem: str) -> ValueError:
            return ValueError(f"{source}, line {number}: {problem}; {_VOCABULARY_SYNTAX}")

        head, colon, tail = line.partition(":")
        name = _vocabulary_word(head, bad, "the word before ':'" if colon else "the word")
        entries = [name]
        if colon:
            if not tail.strip():
                raise bad("no synonym after ':'")
            entries += [_vocabulary_word(part, bad, "a synonym") for part in tail.split(",")]
        for word in entries:
            earlier = words.get(word)
            if earlier is not None and earlier[0] != name:
                raise bad(f"{word!r} already names {earlier[0]!r} (line {earlier[1]})")
            words.setdefault(word, (name, number))
    if not words:
        raise ValueError(f"{source}: the vocabulary file holds no words; {_VOCABULARY_SYNTAX}")
    return {word: name for word, (name, _) in words.items()}


def _vocabulary_word(text: str, bad: Callable[[str], ValueError], what: str) -> str:
    """``text`` as a vocabulary word: lowercase, single spaces; ``bad(problem)`` is raised."""
    parts = text.lower().split()
    if not parts:
        raise bad(f"{what} is empty")
    for part in parts:
        if not _WORD.fullmatch(part):
            raise bad(f"{what} {text.strip()!r} is not a word")
    return " ".join(parts)


# --- mentions to generated tokens ----------------------------------------------------------------


def char_tokens(token_ids: Sequence[int], tokenizer) -> tuple[str, list[int]]:
    """(text, owner): the caption as the model decodes the generated ``token_ids``
    (``VisionLanguageModel.decode``: special tokens skipped, outer whitespace stripped) and,
    for each of its characters, the index in ``token_ids`` of the token that wrote it.

    ``tokenizer`` is the model's Hugging Face tokenizer. A word-leading space goes with its
    word's token ("▁dog" writes " dog"); a character that several tokens make (byte fallback)
    belongs to the token that completes it (:func:`vacap.text.token_texts`).
    """
    pieces = token_texts(tokenizer, list(token_ids))
    owner = [index for index, piece in enumerate(pieces) for _ in piece]
    return "".join(pieces), owner


def locate_generated(
    caption: str, raw: str, *, prefix: str | None = None, suffix: str | None = None
) -> tuple[int, int, int]:
    """Where the generated text lies in a finished caption: ``(start, end, raw_start)`` with
    ``caption[start:end] == raw[raw_start:raw_start + end - start]``.

    ``caption`` is :func:`vacap.text.finish_caption` of ``raw`` (the decoded text): that keeps
    a stretch of ``raw`` (boilerplate stripped, an unfinished last sentence dropped, or neither)
    and puts ``prefix`` and ``suffix`` around it. With ``prefix`` and ``suffix`` given the
    stretch is known exactly; without, it is the longest of the stretches finishing can keep
    that the caption holds, at its first place there (only a prefix or suffix that repeats the
    caption's own words could mislead that).

    Raises ``ValueError`` when the caption holds none of them (it was not finished from
    ``raw``).
    """
    start, end = boilerplate_span(raw)
    kept = sorted(
        {
            (0, len(raw)),
            (start, end),
            (0, len(drop_incomplete(raw))),
            (start, start + len(drop_incomplete(raw[start:end]))),
        },
        key=lambda span: (span[0] - span[1], span[0]),
    )
    if prefix is not None or suffix is not None:
        prefix, suffix = prefix or "", suffix or ""
        inner = len(caption) - len(suffix)
        if not (caption.startswith(prefix) and caption.endswith(suffix) and len(prefix) <= inner):
            raise ValueError("the caption does not begin with its prefix and end with its suffix")
        core = caption[len(prefix) : inner]
        for a, b in kept:
            if raw[a:b] == core:
                return len(prefix), inner, a
    else:
        for a, b in kept:
            found = caption.find(raw[a:b])
            if found >= 0:
                return found, found + b - a, a
    raise ValueError("the caption does not hold the text decoded from its tokens")


def mention_tokens(
    mentions: Sequence[Mention],
    caption: str,
    token_ids: Sequence[int],
    tokenizer,
    *,
    prefix: str | None = None,
    suffix: str | None = None,
) -> list[int | None]:
    """For each mention of ``caption``, the index in ``token_ids`` (the generated tokens) of its
    first token: the token that wrote its first character. None for a mention not wholly in
    generated text (in the user's prefix or suffix, or across its edge).

    ``prefix``/``suffix``: what :func:`vacap.text.finish_caption` added (see
    :func:`locate_generated`). Raises ``ValueError`` when the caption was not finished from
    these tokens' text.
    """
    raw, owner = char_tokens(token_ids, tokenizer)
    start, end, raw_start = locate_generated(caption, raw, prefix=prefix, suffix=suffix)
    return [
        owner[raw_start + mention.start - start] if start <= mention.start and mention.end <= end else None
        for mention in mentions
    ]


# --- scores ---------------------------------------------------------------------------------------


def load_coefficients(path: str | Path | None = None) -> dict:
    """The logistic regression's coefficients (:func:`fit`'s format), from ``path`` or, by
    default, the file shipped in the package (:data:`COEFFICIENTS_FILE`). Raises ``ValueError``
    naming the file when it is not such coefficients."""
    if path is None:
        return _shipped_coefficients()
    return _read_coefficients(Path(path))


@lru_cache(maxsize=1)
def _shipped_coefficients() -> dict:
    return _read_coefficients(COEFFICIENTS_FILE)


def _read_coefficients(path: Path) -> dict:
    try:
        coefficients = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read risk coefficients ({exc})") from None
    problem = _coefficients_problem(coefficients)
    if problem:
        raise ValueError(f"{path}: not risk coefficients ({problem})")
    return coefficients


def _coefficients_problem(coefficients) -> str | None:
    if not isinstance(coefficients, dict):
        return "not a JSON object"
    features = coefficients.get("features")
    if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        return "'features' must be a list of signal names"
    for key in ("mean", "scale", "weights"):
        table = coefficients.get(key)
        if not isinstance(table, dict) or not all(_is_number(table.get(f)) for f in features):
            return f"'{key}' must give a number for each feature"
    if not all(coefficients["scale"][f] > 0 for f in features):
        return "every 'scale' must be positive"
    if not _is_number(coefficients.get("intercept")):
        return "'intercept' must be a number"
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def score(signals: Mapping[str, float | None], coefficients: dict | None = None) -> float | None:
    """The risk, in [0, 1], of a mention whose first token had ``signals`` (name -> value):
    ``1 / (1 + exp(-(intercept + sum(weight * (value - mean) / scale))))`` over the
    coefficients' features (default: :func:`load_coefficients`). None when a feature is
    missing, None or not finite."""
    coefficients = coefficients if coefficients is not None else load_coefficients()
    z = coefficients["intercept"]
    for feature in coefficients["features"]:
        value = signals.get(feature)
        if not _is_number(value):
            return None
        z += coefficients["weights"][feature] * (value - coefficients["mean"][feature]) / coefficients["scale"][feature]
    return _sigmoid(z)


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def caption_risk(
    caption: str,
    token_ids: Sequence[int],
    signals: Mapping[str, Sequence[float | None]],
    tokenizer,
    vocab: Vocabulary,
    coefficients: dict | None = None,
    *,
    prefix: str | None = None,
    suffix: str | None = None,
) -> dict:
    """A caption record's ``risk`` object.

    ``caption``: the record's finished caption; ``token_ids``: the generated tokens its text was
    decoded from (stop tokens may be in or out: special tokens write no text); ``signals``:
    name -> one value per token of ``token_ids`` (None or NaN where there is none);
    ``prefix``/``suffix``: what finishing added, if known (:func:`locate_generated`).

    Returns (JSON-serialisable; scores and signals rounded to :data:`DIGITS` decimals)::

        {"score": highest mention score, or None when no mention has one,
         "mentions": [{"text", "start", "end", "object", "token", "score", "signals"}, ...]}

    with one entry per mention in generated text, in caption order (``caption[start:end] ==
    text``; ``token``: index in ``token_ids`` of its first token; ``signals``: that token's
    value of each signal in ``signals``). Mentions in the user's prefix or suffix were not
    generated and are left out. A mention whose token lacks a signal the coefficients use has
    ``"score": None``.

    Raises ``ValueError`` when a signal does not have one value per token, or the caption was
    not finished from these tokens' text.
    """
    for name, values in signals.items():
        if len(values) != len(token_ids):
            raise ValueError(f"signal {name!r} has {len(values)} values for {len(token_ids)} tokens")
    mentions = find_mentions(caption, vocab)
    tokens = mention_tokens(mentions, caption, token_ids, tokenizer, prefix=prefix, suffix=suffix) if mentions else []
    entries = []
    for mention, token in zip(mentions, tokens):
        if token is None:
            continue
        values = {name: signals[name][token] for name in signals}
        values = {name: float(value) if _is_number(value) else None for name, value in values.items()}
        risk = score(values, coefficients)
        entries.append(
            {
                "text": mention.text,
                "start": mention.start,
                "end": mention.end,
                "object": mention.object,
                "token": token,
                "score": _rounded(risk),
                "signals": {name: _rounded(value) for name, value in values.items()},
            }
        )
    scores = [entry["score"] for entry in entries if entry["score"] is not None]
    return {"score": max(scores) if scores else None, "mentions": entries}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS)


def fit(
    features: Sequence[Mapping[str, float | None]],
    labels: Sequence[bool],
    *,
    names: Sequence[str] = SIGNALS,
    l2: float = 1.0,
    fitted_on: str | None = None,
    sample_weights: Sequence[float] | None = None,
) -> dict:
    """Logistic regression of ``labels`` (True: the mention is hallucinated) on the signals
    ``names`` of ``features`` (one name -> value dict per mention), in the format
    :func:`load_coefficients` reads and :func:`score` uses.

    Each feature is standardised (``mean``, population standard deviation as ``scale``; 1
    where it does not vary); weights and intercept are fitted by Newton's method (IRLS) on the
    log-likelihood with an L2 penalty ``l2 / 2 * |weights|^2`` on the standardised weights
    (not the intercept), which keeps them finite when the classes can be separated. Mentions
    lacking a value (None, NaN, missing) are left out; ``n`` and ``positives`` say what was
    used. ``fitted_on`` is written as given (what the data was). ``sample_weights`` (one per
    mention, default 1) weigh each mention as that many copies of it would, in the standardisation
    and in the log-likelihood.

    Raises ``ValueError`` when the rows left hold only one class, or (``l2 == 0``) the fit does
    not converge.
    """
    import numpy as np

    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    if l2 < 0:
        raise ValueError("l2 must be 0 or more")
    weights = [1.0] * len(labels) if sample_weights is None else list(sample_weights)
    if len(weights) != len(labels):
        raise ValueError(f"{len(weights)} sample weights for {len(labels)} labels")
    rows = [
        ([float(row[name]) for name in names], bool(label), float(weight))
        for row, label, weight in zip(features, labels, weights)
        if all(_is_number(row.get(name)) for name in names)
    ]
    y = np.array([label for _, label, _ in rows], dtype=float)
    w = np.array([weight for _, _, weight in rows])
    if not rows or y.min() == y.max():
        raise ValueError("fitting needs hallucinated and correct mentions with every signal")
    x = np.array([values for values, _, _ in rows])
    mean = np.average(x, axis=0, weights=w)
    scale = np.sqrt(np.average((x - mean) ** 2, axis=0, weights=w))
    scale[scale == 0] = 1.0
    design = np.hstack([np.ones((len(rows), 1)), (x - mean) / scale])
    penalty = np.diag([0.0] + [float(l2)] * len(names))
    beta = np.zeros(design.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        gradient = design.T @ (w * (y - p)) - penalty @ beta
        hessian = design.T @ (design * (w * p * (1 - p))[:, None]) + penalty
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        beta = beta + step
        if np.abs(step).max() < 1e-10:
            break
    else:
        raise ValueError("the fit did not converge (the classes may be separable; use l2 > 0)")
    return {
        "format": 1,
        "fitted_on": fitted_on,
        "features": list(names),
        "mean": dict(zip(names, map(float, mean))),
        "scale": dict(zip(names, map(float, scale))),
        "weights": dict(zip(names, map(float, beta[1:]))),
        "intercept": float(beta[0]),
        "l2": float(l2),
        "n": len(rows),
        "positives": int(y.sum()),
    }


# --- metrics ----------------------------------------------------------------------------------------


def _pairs(scores: Iterable[float | None], labels: Iterable[bool]) -> list[tuple[float, bool]]:
    scores, labels = list(scores), list(labels)
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    return [(float(s), bool(label)) for s, label in zip(scores, labels) if s is not None]


def auroc(scores: Sequence[float | None], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance that a positive (``label`` True: hallucinated)
    scores above a negative, a tie counting one half (the Mann-Whitney U over the pairs).
    Entries with a None score are left out; None when no positive or no negative is left."""
    pairs = sorted(_pairs(scores, labels))
    positives = sum(label for _, label in pairs)
    negatives = len(pairs) - positives
    if not positives or not negatives:
        return None
    rank_sum = 0.0  # ranks from 1, a tied group sharing its mean rank
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        rank_sum += (i + 1 + j) / 2 * sum(label for _, label in pairs[i:j])
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def auprc(scores: Sequence[float | None], labels: Sequence[bool]) -> float | None:
    """Average precision: the precision at each score threshold, weighted by the recall it adds,
    ``sum((R_k - R_k-1) * P_k)`` with thresholds at the distinct scores from the highest down
    (tied scores enter together; no interpolation, as scikit-learn's
    ``average_precision_score``). Entries with a None score are left out; None when no
    positive is left."""
    pairs = sorted(_pairs(scores, labels), key=lambda pair: -pair[0])
    positives = sum(label for _, label in pairs)
    if not positives:
        return None
    total = 0.0
    true = seen = 0
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        added = sum(label for _, label in pairs[i:j])
        true, seen = true + added, j
        total += added / positives * true / seen
        i = j
    return total


def caught_at_keep(scores: Sequence[float | None], labels: Sequence[bool], keep: float = 0.9) -> float | None:
    """The share of positives (hallucinated mentions) caught by the threshold that keeps
    ``keep`` of the negatives (correct mentions): the threshold is the lowest score at or
    under which at least ``keep`` of the negatives score (the ``ceil(keep * negatives)``-th
    lowest negative score), and a positive is caught when it scores strictly above it.
    Entries with a None score are left out; None when no positive or no negative is left."""
    if not 0 < keep <= 1:
        raise ValueError("keep must be in (0, 1]")
    pairs = _pairs(scores, labels)
    negatives = sorted(s for s, label in pairs if not label)
    positives = [s for s, label in pairs if label]
    if not positives or not negatives:
        return None
    kept = max(1, math.ceil(keep * len(negatives) - 1e-9))
    threshold = negatives[kept - 1]
    return sum(s > threshold for s in positives) / len(positives)


def kept_chair_s(
    caption_scores: Sequence[float | None], caption_hallucinated: Sequence[bool], drop: float = 0.2
) -> float | None:
    """CHAIR_s (the share of captions with a hallucinated object) of the captions kept when the
    riskiest ``drop`` of them are dropped.

    ``floor(drop * captions)`` captions are dropped, the highest scores first, counting every
    caption, those with a None score (no scored mention) too; captions with a None score are
    always kept (when fewer captions have a score, all of those are dropped). Where tied scores
    straddle the cut, the result is its mean over the orders the tie could be broken in (the
    tied captions count in proportion to the share of them kept). None when no caption is
    kept.
    """
    if not 0 <= drop < 1:
        raise ValueError("drop must be in [0, 1)")
    scores, hallucinated = list(caption_scores), [bool(h) for h in caption_hallucinated]
    if len(scores) != len(hallucinated):
        raise ValueError(f"{len(scores)} scores for {len(hallucinated)} captions")
    if not scores:
        return None
    scored = sorted(((float(s), h) for s, h in zip(scores, hallucinated) if s is not None), key=lambda p: -p[0])
    to_drop = min(math.floor(drop * len(scores) + 1e-9), len(scored))
    bad = float(sum(h for s, h in zip(scores, hallucinated) if s is None))
    i = 0
    while i < len(scored):
        j = i
        while j < len(scored) and scored[j][0] == scored[i][0]:
            j += 1
        dropped_here = min(max(to_drop - i, 0), j - i)
        bad += sum(h for _, h in scored[i:j]) * (1 - dropped_here / (j - i))
        i = j
    return bad / (len(scores) - to_drop)

"""vacap.risk: mentions with exact spans, vocabularies, mentions tied to generated tokens, the
score and its fit, and the metrics (each against a brute-force or hand-worked answer)."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys

import pytest

from vacap import risk
from vacap.risk import (
    COCO_VOCABULARY,
    SIGNALS,
    Mention,
    auprc,
    auroc,
    caption_risk,
    caught_at_keep,
    find_mentions,
    fit,
    kept_chair_s,
    load_coefficients,
    mention_tokens,
    parse_vocabulary,
    read_vocabulary,
    score,
    shapes_vocabulary,
    vocabulary_for,
)
from vacap.text import finish_caption


def test_importing_risk_imports_no_torch():
    code = "import sys, vacap.risk; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- mentions and their spans ---------------------------------------------------------------


def spans(caption, vocab):
    mentions = find_mentions(caption, vocab)
    for m in mentions:
        assert caption[m.start : m.end] == m.text
    return [(m.text, m.object) for m in mentions]


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("Two dogs chase a motorbike.", [("dogs", "dog"), ("motorbike", "motorcycle")]),
        ("A Hot Dog next to a dog", [("Hot Dog", "hot dog"), ("dog", "dog")]),
        ("Teddy bears, teddy bear and a bear.", [("Teddy bears", "teddy bear"), ("teddy bear", "teddy bear"), ("bear", "bear")]),
        ("It is hot, dog days", [("dog", "dog")]),  # punctuation breaks the phrase
        ("The dog's bowl... (a PUPPY!)", [("dog's", "dog"), ("bowl", "bowl"), ("PUPPY", "dog")]),
        ("A man-made lake under the sky.", []),
        ("Children feeding mice; a cell  phone", [("Children", "person"), ("mice", "mouse"), ("cell  phone", "cell phone")]),
    ],
)  # fmt: skip
def test_coco_mentions_index_the_caption(caption, expected):
    assert spans(caption, COCO_VOCABULARY) == expected


def test_repeated_mentions_each_have_their_own_span():
    caption = "A dog and a cat. The dog chases the cat."
    mentions = find_mentions(caption, COCO_VOCABULARY)
    assert [(m.start, m.object) for m in mentions] == [(2, "dog"), (12, "cat"), (21, "dog"), (36, "cat")]


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("two objects: a red heart on the left and a white ring on the right.", [("heart", "heart"), ("ring", "ring")]),
        ("Two RED Circles and some crosses", [("Circles", "circle"), ("crosses", "cross")]),
        ("a blue disc next to a purple rhombus and a donut.", [("disc", "circle"), ("rhombus", "diamond"), ("donut", "ring")]),
        ("a red, a blue and an orange", []),  # colours alone are no objects
    ],
)  # fmt: skip
def test_shapes_mentions_index_the_caption(caption, expected):
    assert spans(caption, shapes_vocabulary()) == expected


@pytest.mark.parametrize("world", ["shapes", "priors"])
def test_shapes_mentions_are_the_objects_eval_shapes_finds(world):
    from vacap.demo.worlds import scenes
    from vacap.evaluate.shapes import extract_objects

    for scene in scenes(40, 3, "train", world=world):
        found = [m.object for m in find_mentions(scene.caption, shapes_vocabulary())]
        assert found == [shape for _, shape in extract_objects(scene.caption)]
        assert len(found) == len(scene.objects)


def test_vocabulary_for_models_and_files(tmp_path):
    from vacap.demo import MODEL_DIR, PRIORS_MODEL_DIR

    for model in ("demo", "demo-priors", str(MODEL_DIR), str(PRIORS_MODEL_DIR)):
        assert vocabulary_for(model).name == "shapes"
    assert vocabulary_for("llava-hf/llava-1.5-7b-hf") is COCO_VOCABULARY
    path = tmp_path / "words.txt"
    path.write_text("lamp\n", encoding="utf-8")
    mine = vocabulary_for("demo", path)  # a file replaces the built-in vocabulary
    assert spans("a lamp and a circle", mine) == [("lamp", "lamp")]


# --- a user's vocabulary file -----------------------------------------------------------------


def test_vocabulary_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text(
        "# my objects\n"
        "\n"
        "Lamp\n"
        "dog: puppy, Hound   # a comment after an entry\n"
        "  street lamp :  lantern\n"
        "dog: mutt\n"  # a class may take several lines
        "t-shirt: tee\n",
        encoding="utf-8",
    )
    vocab = read_vocabulary(path)
    assert vocab.name == str(path)
    caption = "Two puppies, a MUTT and a street lamp near lanterns; the Lamps and a T-shirt"
    assert spans(caption, vocab) == [
        ("puppies", "dog"), ("MUTT", "dog"), ("street lamp", "street lamp"), ("lanterns", "street lamp"),
        ("Lamps", "lamp"), ("T-shirt", "t-shirt"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "line, problem",
    [
        (": puppy", "empty"),
        ("dog: puppy,, pup", "empty"),
        ("dog: puppy,", "empty"),
        ("dog:", "no synonym"),
        ("d*g", "not a word"),
        ("dog: pup:py", "not a word"),
        ("dog: -pup", "not a word"),
        ("cat: puppy", "already names 'dog' (line 2)"),
    ],
)
def test_bad_vocabulary_line_names_the_file_and_line(tmp_path, line, problem):
    path = tmp_path / "vocab.txt"
    path.write_text(f"# header\ndog: puppy\n\n{line}\ncat\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        read_vocabulary(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line 4: ")
    assert problem in message and "word: synonym, synonym" in message


def test_vocabulary_file_without_words_or_not_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no words"):
        read_vocabulary(empty)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"dog\ncat\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"binary.txt, line 3: not UTF-8"):
        read_vocabulary(binary)
    with pytest.raises(ValueError, match="cannot read"):
        read_vocabulary(tmp_path / "missing.txt")
    assert parse_vocabulary("Hot Dog: frankfurter") == {"hot dog": "hot dog", "frankfurter": "hot dog"}


# --- mentions to tokens ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
    """The tiny models' byte-level BPE tokenizer, trained here on a small corpus: most words
    are several tokens ("motorbike" is six)."""
    from vacap.tiny_models import _build_tokenizer

    return _build_tokenizer()


@pytest.fixture(scope="module")
def words_tokenizer():
    """The demo model's word-level tokenizer (Metaspace, like SentencePiece's "▁")."""
    from transformers import AutoTokenizer

    from vacap.demo import MODEL_DIR

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def generated(tokenizer, raw):
    """(token ids as the decode loop gives them, with EOS, and the text the model decodes),
    plus the oracle: the token covering each character of ``raw`` by the tokenizer's offsets."""
    encoding = tokenizer(raw, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"] + [tokenizer.eos_token_id]
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert text == raw
    owner = {}
    for index, (a, b) in enumerate(encoding["offset_mapping"]):
        for position in range(a, b):
            owner.setdefault(position, index)
    return ids, owner


RAW = "ASSISTANT: A man riding a motorbike next to two giraffes and a dog. The teddy bear sat on a"


@pytest.mark.parametrize("known_edges", [True, False])
def test_mentions_get_their_first_generated_token(bpe, known_edges):
    ids, owner = generated(bpe, RAW)
    prefix, suffix = "photo of a dog, ", " (cat)"
    caption = finish_caption(RAW, stopped_by="length", prefix=prefix, suffix=suffix, clean=True, trim=True)
    assert caption == "photo of a dog, A man riding a motorbike next to two giraffes and a dog. (cat)"
    mentions = find_mentions(caption, COCO_VOCABULARY)
    assert [m.text for m in mentions] == ["dog", "man", "motorbike", "giraffes", "dog", "cat"]
    edges = {"prefix": prefix, "suffix": suffix} if known_edges else {}
    tokens = mention_tokens(mentions, caption, ids, bpe, **edges)
    # Prefix and suffix were not generated; the rest sit at their place in RAW, shifted by the
    # stripped "ASSISTANT: " and the prefix.
    shift = len(prefix) - len("ASSISTANT: ")
    expected = [None] + [owner[m.start - shift] for m in mentions[1:-1]] + [None]
    assert tokens == expected
    motorbike = tokens[2]
    assert bpe.decode(ids[motorbike : motorbike + 1]).strip() == "m"  # the first of its tokens
    assert RAW[mentions[2].start - shift :].startswith("motorbike")


def test_a_quoted_caption_and_a_word_level_tokenizer(words_tokenizer):
    raw = "two objects: a red heart on the left and a white ring on the right."
    ids, owner = generated(words_tokenizer, raw)
    caption = finish_caption(raw, stopped_by="eos", prefix="shapes, ", clean=True, trim=True)
    mentions = find_mentions(caption, shapes_vocabulary())
    tokens = mention_tokens(mentions, caption, ids, words_tokenizer)
    assert tokens == [owner[raw.index("heart")], owner[raw.index("ring")]]
    assert [words_tokenizer.convert_ids_to_tokens(ids[t]) for t in tokens] == ["▁heart", "▁ring"]


def test_a_caption_not_from_these_tokens_is_an_error(bpe):
    ids, _ = generated(bpe, "A man riding a bike.")
    with pytest.raises(ValueError, match="does not hold"):
        mention_tokens([Mention("dog", 2, 5, "dog")], "A dog on a bike.", ids, bpe)
    with pytest.raises(ValueError, match="prefix"):
        mention_tokens([], "A man riding a bike.", ids, bpe, prefix="x ")


# --- the risk object ----------------------------------------------------------------------------


def per_token(ids):
    """Distinct signal values per token, so a wrong token shows."""
    return {
        "entropy": [0.1 * i for i in range(len(ids))],
        "neg_logprob": [0.05 * i + 0.01 for i in range(len(ids))],
        "neg_margin": [-5 + 0.2 * i for i in range(len(ids))],
        "branch_log_ratio": [0.5 - 0.01 * i for i in range(len(ids))],
    }


def test_caption_risk(bpe):
    ids, owner = generated(bpe, RAW)
    caption = finish_caption(RAW, stopped_by="length", prefix="photo of a dog, ", clean=True, trim=True)
    signals = per_token(ids)
    signals["neg_margin"][owner[RAW.index("giraffes")]] = float("nan")  # no value: no score
    result = caption_risk(caption, ids, signals, bpe, COCO_VOCABULARY, prefix="photo of a dog, ")
    json.dumps(result, allow_nan=False)
    mentions = result["mentions"]
    assert [(m["text"], m["object"]) for m in mentions] == [
        ("man", "person"), ("motorbike", "motorcycle"), ("giraffes", "giraffe"), ("dog", "dog")
    ]  # the prefix's dog is not the model's
    for m in mentions:
        assert caption[m["start"] : m["end"]] == m["text"]
        token = owner[RAW.index(m["text"])]
        assert m["token"] == token
        values = {name: signals[name][token] for name in SIGNALS}
        assert m["signals"] == {
            name: None if math.isnan(v) else round(v, 4) for name, v in values.items()
        }
        if m["text"] == "giraffes":
            assert m["score"] is None
        else:
            assert m["score"] == round(score(values), 4) and 0 < m["score"] < 1
    assert result["score"] == max(m["score"] for m in mentions if m["score"] is not None)


def test_no_mention_no_score(bpe):
    for raw, prefix in (("A sunny day at the beach.", ""), ("A sunny day at the beach.", "a dog: ")):
        ids, _ = generated(bpe, raw)
        result = caption_risk(prefix + raw, ids, per_token(ids), bpe, COCO_VOCABULARY, prefix=prefix)
        assert result == {"score": None, "mentions": []}


def test_signals_must_match_the_tokens(bpe):
    ids, _ = generated(bpe, "A dog.")
    signals = per_token(ids)
    signals["entropy"] = signals["entropy"][:-1]
    with pytest.raises(ValueError, match="'entropy' has"):
        caption_risk("A dog.", ids, signals, bpe, COCO_VOCABULARY)


# --- score and fit ------------------------------------------------------------------------------


def test_shipped_coefficients_are_fitted_and_score():
    coefficients = load_coefficients()
    assert coefficients["fitted_on"].startswith("priors world, train split") and coefficients["features"] == list(SIGNALS)
    calm = {"entropy": 0.1, "neg_logprob": 0.01, "neg_margin": -8.0, "branch_log_ratio": 0.0}
    unsure = {"entropy": 3.0, "neg_logprob": 2.5, "neg_margin": -0.1, "branch_log_ratio": 0.0}
    assert 0 < score(calm) < score(unsure) < 1
    assert score({**calm, "entropy": None}) is None
    assert score({"entropy": 1.0}) is None


def synthetic(n, seed, separable):
    rng = random.Random(seed)
    direction = {"entropy": 2.0, "neg_logprob": -1.0, "neg_margin": 0.0, "branch_log_ratio": 0.5}
    centre = {"entropy": 1.0, "neg_logprob": 5.0, "neg_margin": -3.0, "branch_log_ratio": 0.0}
    spread = {"entropy": 0.5, "neg_logprob": 2.0, "neg_margin": 3.0, "branch_log_ratio": 1.0}
    rows, labels = [], []
    for _ in range(n):
        z = {name: rng.gauss(0, 1) for name in SIGNALS}
        logit = sum(direction[name] * z[name] for name in SIGNALS) - 0.5
        label = logit > 0 if separable else rng.random() < 1 / (1 + math.exp(-logit))
        rows.append({name: centre[name] + spread[name] * z[name] for name in SIGNALS})
        labels.append(label)
    return rows, labels, direction


def test_fit_recovers_the_weights():
    rows, labels, direction = synthetic(6000, 1, separable=False)
    coefficients = fit(rows, labels, l2=1e-3, fitted_on="synthetic")
    assert coefficients["fitted_on"] == "synthetic" and coefficients["n"] == 6000
    for name in SIGNALS:
        assert coefficients["weights"][name] == pytest.approx(direction[name], abs=0.15)
    assert coefficients["intercept"] == pytest.approx(-0.5, abs=0.15)


def test_fit_finds_a_separating_direction(tmp_path):
    rows, labels, direction = synthetic(600, 2, separable=True)
    rows.append({**rows[0], "entropy": None})  # left out
    labels.append(True)
    coefficients = fit(rows, labels)
    assert coefficients["n"] == 600
    w = [coefficients["weights"][name] for name in SIGNALS]
    cosine = sum(a * direction[n] for a, n in zip(w, SIGNALS)) / (
        math.hypot(*w) * math.hypot(*direction.values())
    )
    assert cosine > 0.98
    path = tmp_path / "coefficients.json"
    path.write_text(json.dumps(coefficients), encoding="utf-8")
    loaded = load_coefficients(path)
    right = sum((score(row, loaded) > 0.5) == label for row, label in zip(rows[:-1], labels[:-1]))
    assert right / 600 > 0.97


def test_fit_and_coefficient_errors(tmp_path):
    rows, _, _ = synthetic(20, 3, separable=True)
    with pytest.raises(ValueError, match="hallucinated and correct"):
        fit(rows, [False] * 20)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"features": ["entropy"], "mean": {}, "scale": {}, "weights": {}}), encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: not risk coefficients"):
        load_coefficients(bad)


# --- metrics ------------------------------------------------------------------------------------


def random_sets(count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.randint(2, 30)
        scores = [round(rng.random(), 1) for _ in range(n)]  # many ties
        labels = [rng.random() < 0.4 for _ in range(n)]
        yield scores, labels


def test_auroc_is_the_pairwise_share():
    for scores, labels in random_sets(300, 4):
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        if not pos or not neg:
            assert auroc(scores, labels) is None
            continue
        pairs = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
        assert auroc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert auroc([0.1, None, 0.9], [False, True, True]) == 1.0  # None scores are left out


def test_auprc():
    # scikit-learn's documented example.
    assert auprc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.8333333)
    assert auprc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auprc([0.5, 0.5], [True, False]) == 0.5  # a tie enters together
    assert auprc([0.2], [False]) is None
    for scores, labels in random_sets(300, 5):
        pos = [s for s, y in zip(scores, labels) if y]
        if not pos:
            continue
        # The mean over positives of the precision at the threshold of their own score.
        precision = [sum(q >= p for q in pos) / sum(q >= p for q in scores) for p in pos]
        assert auprc(scores, labels) == pytest.approx(sum(precision) / len(pos))


def test_caught_at_keep():
    negatives = [0.1 * i for i in range(1, 11)]
    positives = [0.95, 0.9, 0.5, 1.5]
    scores, labels = negatives + positives, [False] * 10 + [True] * 4
    assert caught_at_keep(scores, labels) == 2 / 4  # threshold 0.9: 9 of 10 kept
    assert caught_at_keep(scores, labels, keep=1.0) == 1 / 4
    assert caught_at_keep([0.3], [True]) is None
    for scores, labels in random_sets(300, 6):
        neg = sorted(s for s, y in zip(scores, labels) if not y)
        pos = [s for s, y in zip(scores, labels) if y]
        if not pos or not neg:
            continue
        for keep in (0.5, 0.8, 0.9):
            threshold = min(t for t in neg if sum(q <= t for q in neg) >= keep * len(neg) - 1e-9)
            assert caught_at_keep(scores, labels, keep) == sum(p > threshold for p in pos) / len(pos)


def test_kept_chair_s():
    scores = [0.9, 0.1, None, 0.5, 0.2]
    hallucinated = [True, False, True, False, False]
    assert kept_chair_s(scores, hallucinated) == 1 / 4  # one dropped (0.9); the None is kept
    assert kept_chair_s(scores, hallucinated, drop=0.0) == 2 / 5
    assert kept_chair_s([None, None], [True, False]) == 1 / 2
    assert kept_chair_s([], []) is None
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 7)
        scores = [rng.choice([None, 0.1, 0.5, 0.5, 0.9]) for _ in range(n)]
        hallucinated = [rng.random() < 0.5 for _ in range(n)]
        drop = rng.choice([0.2, 0.3, 0.5])
        to_drop = math.floor(drop * n + 1e-9)
        # Every order the ties could be broken in: drop the first to_drop scored captions.
        results = []
        for order in itertools.permutations(range(n)):
            scored = sorted((i for i in order if scores[i] is not None), key=lambda i: -scores[i])
            dropped = set(scored[:to_drop])
            kept = [hallucinated[i] for i in range(n) if i not in dropped]
            results.append(sum(kept) / len(kept))
        assert kept_chair_s(scores, hallucinated, drop) == pytest.approx(sum(results) / len(results))


def test_fit_weighs_a_mention_as_that_many_copies_of_it():
    rng = random.Random(3)
    features = [{name: rng.gauss(0, 1) for name in risk.SIGNALS} for _ in range(200)]
    labels = [row["entropy"] + rng.gauss(0, 1) > 0.5 for row in features]
    doubled = set(range(0, 200, 3))
    weighted = risk.fit(features, labels, sample_weights=[2.0 if i in doubled else 1.0 for i in range(200)])
    copied = risk.fit(features + [features[i] for i in sorted(doubled)], labels + [labels[i] for i in sorted(doubled)])
    for key in ("mean", "scale", "weights"):
        assert weighted[key] == pytest.approx(copied[key], rel=1e-9, abs=1e-12)
    assert weighted["intercept"] == pytest.approx(copied["intercept"], rel=1e-9)
    with pytest.raises(ValueError, match="sample weights"):
        risk.fit(features, labels, sample_weights=[1.0])

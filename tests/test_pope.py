"""POPE question building and scoring on a synthetic COCO file built so each answer is known."""

import json

import pytest

from vacap.evaluate.pope import Question, build_questions, parse_answer, score

CLASSES = ["person", "car", "dog", "cat", "chair", "kite", "apple", "bicycle"]  # category order
P, C, D, T, H, K, A, B = CLASSES
# Two-class images, each eligible with per_image=2. Co-occurrence counts: P-C 2, and 1 each for
# P-H, C-K, D-T, H-D, K-A, T-B, A-B: every class asked about has one clear absent partner.
PAIRS = {
    1: {P, C}, 2: {P, C}, 3: {P, H}, 4: {C, K}, 5: {D, T},
    6: {H, D}, 7: {K, A}, 8: {T, B}, 9: {A, B},
}
# One-class images: eligible only with per_image=1; they set the image counts to
# car 6, person 5, dog 4, cat 3, then chair, kite, apple, bicycle 2 each (ties in category order).
SINGLES = {10: {C}, 11: {C}, 12: {C}, 13: {P}, 14: {P}, 15: {D}, 16: {D}, 17: {T}}
OBJECTS = {**PAIRS, **SINGLES}

# Absent objects by hand, in the order they are asked.
POPULAR = {
    1: [D, T], 2: [D, T], 3: [C, D], 4: [P, D], 5: [C, P],
    6: [C, P], 7: [C, P], 8: [C, P], 9: [C, P],
}
# (present, absent) pairs: each present object with its most frequent absent companion.
ADVERSARIAL = {
    1: {(P, H), (C, K)},
    2: {(P, H), (C, K)},
    3: {(P, C), (H, D)},
    4: {(C, P), (K, A)},
    5: {(D, H), (T, B)},
    6: {(H, P), (D, T)},
    7: {(K, C), (A, B)},
    8: {(T, D), (B, A)},
    9: {(A, K), (B, T)},
}


def file_name(image_id):
    return f"COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture
def instances(tmp_path):
    categories = [{"id": i, "name": name} for i, name in enumerate(CLASSES, start=1)]
    ids = {name: i for i, name in enumerate(CLASSES, start=1)}
    pairs = [(image_id, name) for image_id, names in OBJECTS.items() for name in sorted(names)]
    annotations = [
        {"id": n, "image_id": image_id, "category_id": ids[name]}
        for n, (image_id, name) in enumerate(pairs, start=1)
    ]
    # an image with no annotations is never eligible
    images = [{"id": i, "file_name": file_name(i)} for i in [*OBJECTS, 99]]
    path = tmp_path / "instances_val2014.json"
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))
    return path


def by_image(questions):
    grouped = {}
    for q in questions:
        grouped.setdefault(q.image_id, []).append(q)
    return grouped


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
@pytest.mark.parametrize("per_image, eligible", [(1, 17), (2, 9)])
def test_counts_per_eligible_image(instances, split, per_image, eligible):
    questions = build_questions(instances, split, per_image=per_image)
    grouped = by_image(questions)
    assert len(grouped) == eligible
    for qs in grouped.values():
        assert [q.label for q in qs] == ["yes", "no"] * per_image


def test_no_eligible_image_says_why(instances):
    with pytest.raises(ValueError, match="no image in the instances file has at least 3 annotated classes"):
        build_questions(instances, "random", per_image=3)


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_labels_and_no_overlap(instances, split):
    for image_id, qs in by_image(build_questions(instances, split, per_image=2)).items():
        present = {q.object for q in qs if q.label == "yes"}
        absent = {q.object for q in qs if q.label == "no"}
        assert present == OBJECTS[image_id]
        assert len(absent) == 2 and not absent & OBJECTS[image_id]
        assert all(q.file_name == file_name(image_id) for q in qs)


def test_question_text(instances):
    questions = build_questions(instances, "adversarial", per_image=2)
    texts = {q.object: q.text for q in questions}
    assert texts[P] == "Is there a person in the image?"
    assert texts[A] == "Is there an apple in the image?"


def test_popular_picks_the_most_frequent_absent_classes(instances):
    grouped = by_image(build_questions(instances, "popular", per_image=2))
    assert {i: [q.object for q in qs if q.label == "no"] for i, qs in grouped.items()} == POPULAR


def test_adversarial_picks_top_co_occurring_classes(instances):
    grouped = by_image(build_questions(instances, "adversarial", per_image=2))
    pairs = {i: {(qs[k].object, qs[k + 1].object) for k in (0, 2)} for i, qs in grouped.items()}
    assert pairs == ADVERSARIAL


def test_random_draws_beyond_the_popular_classes(instances):
    # Popular only ever asks about car, person, dog and cat; chance reaches the others.
    drawn = {
        q.object
        for seed in range(5)
        for q in build_questions(instances, "random", per_image=2, seed=seed)
        if q.label == "no"
    }
    assert drawn - {C, P, D, T}


def test_same_present_objects_in_every_split(instances):
    def asked(split):
        questions = build_questions(instances, split, per_image=1)
        return [(q.image_id, q.object) for q in questions if q.label == "yes"]

    assert asked("random") == asked("popular") == asked("adversarial")


def test_seeded_and_deterministic(instances):
    first = build_questions(instances, "random", per_image=2, seed=3)
    assert build_questions(instances, "random", per_image=2, seed=3) == first
    assert build_questions(instances, "random", per_image=2, seed=4) != first


def test_images_limits_to_a_prefix(instances):
    full = build_questions(instances, "random", per_image=2, seed=1)
    limited = build_questions(instances, "random", per_image=2, seed=1, images=4)
    assert len(by_image(limited)) == 4
    assert limited == full[: 4 * 4]
    assert build_questions(instances, "random", per_image=2, images=100) == build_questions(
        instances, "random", per_image=2
    )


def test_accepts_loaded_json(instances):
    loaded = json.loads(instances.read_text())
    from_file = build_questions(instances, "popular", per_image=2)
    assert build_questions(loaded, "popular", per_image=2) == from_file


def test_unknown_split(instances):
    with pytest.raises(ValueError, match="random, popular, adversarial"):
        build_questions(instances, "hard")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("YES!", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("Yes, I know.", "yes"),  # "know" is not "no"
        ("There is a dog sitting on a couch.", None),  # says neither: unanswered
        ("No", "no"),
        ("No.", "no"),
        ("NO!", "no"),
        ("no, there is not", "no"),
        ("  No, there is no dog.", "no"),
        ("There is no dog in the image.", "no"),
        ("There is not a dog.", "no"),
        ("There isn't a dog.", "no"),
        ("The image does not contain a dog.", "no"),
        ("Yes. There is no cat, though.", "yes"),  # only the first sentence counts
        ("I see a dog! No cat.", None),
        ("Nothing suggests otherwise", None),
        ("Eyes and yesterday", None),  # words, not letters
        ("two objects: a red heart at the top and a yellow ring.", None),
        ("", None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_score_on_a_hand_worked_confusion_matrix():
    labels = ["yes"] * 4 + ["no"] * 6
    text = "Is there a dog in the image?"
    questions = [Question(1, "x.jpg", "dog", label, text) for label in labels]
    answers = [
        "Yes", "Yes, there is.", "yes", "No.",  # TP 3, FN 1
        "Yes", "Yes, a dog.", "No", "There is no dog.", "no", "Not at all.",  # FP 2, TN 4
    ]
    result = score(questions, answers)
    assert (result["tp"], result["fn"], result["fp"], result["tn"]) == (3, 1, 2, 4)
    assert result["accuracy"] == 7 / 10
    assert result["precision"] == 3 / 5
    assert result["recall"] == 3 / 4
    assert result["f1"] == pytest.approx(2 / 3)  # 2 * 0.6 * 0.75 / 1.35
    assert result["yes_ratio"] == 5 / 10
    assert result["n"] == 10 and result["unanswered"] == 0


def test_unanswered_questions_are_left_out_of_every_rate():
    labels = ["yes"] * 4 + ["no"] * 6
    text = "Is there a dog in the image?"
    questions = [Question(1, "x.jpg", "dog", label, text) for label in labels]
    unanswered = "two objects: a red heart and a yellow ring."
    answers = [
        "Yes", unanswered, "yes", "No.",  # TP 2, FN 1, one unanswered
        unanswered, "Yes", "", "No", "no", unanswered,  # FP 1, TN 2, three unanswered
    ]
    result = score(questions, answers)
    assert result["unanswered"] == 4 and result["n"] == 6
    assert (result["tp"], result["fn"], result["fp"], result["tn"]) == (2, 1, 1, 2)
    assert result["accuracy"] == 4 / 6
    assert result["yes_ratio"] == 3 / 6
    assert result["precision"] == 2 / 3 and result["recall"] == 2 / 3


def test_score_needs_one_answer_per_question():
    with pytest.raises(ValueError):
        score([Question(1, "x.jpg", "dog", "yes", "Is there a dog in the image?")], [])

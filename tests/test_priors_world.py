"""The priors world (vacap.demo.priors) and the cause and position split of its hallucinations."""

from __future__ import annotations

import pytest

from vacap.demo.priors import (
    COVER,
    FAINT_ALPHA,
    MAX_OBJECTS,
    MIN_OBJECTS,
    PARTNERS,
    PRIOR_STRENGTH,
    SMALL_SIDE,
    USUAL_COLOURS,
    WEAK_SHARE,
    WEAKNESSES,
    position,
)
from vacap.demo.shapes import COLOURS, SHAPES, SIZE, Shape, _background_image, _mask
from vacap.demo.worlds import scenes
from vacap.evaluate.shapes import (
    KINDS,
    PRIORS,
    extract_objects,
    hallucination_cause,
    placed_objects,
    score_caption,
    summarize,
)

# --- generator -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits():
    return {split: scenes(1000, 0, split, world="priors") for split in ("train", "test")}


def _kinds(scene) -> set[str]:
    return {o.kind for o in scene.objects}


def test_same_seed_same_scenes_and_worlds_differ():
    a, b = scenes(10, 3, "train", world="priors"), scenes(10, 3, "train", world="priors")
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [(s.objects, s.caption) for s in a] == [(s.objects, s.caption) for s in b]
    assert [s.objects for s in scenes(10, 3, "train")] != [s.objects for s in a]
    with pytest.raises(ValueError, match="unknown world 'prior'; expected one of shapes, priors"):
        scenes(1, 0, "train", world="prior")


def test_train_split_has_the_priors(splits):
    train = splits["train"]
    for trigger, partner in PARTNERS.items():
        with_trigger = [s for s in train if trigger in _kinds(s)]
        assert len(with_trigger) > 250
        assert sum(partner in _kinds(s) for s in with_trigger) / len(with_trigger) >= PRIOR_STRENGTH
    for kind, colour in USUAL_COLOURS.items():
        found = [o for s in train for o in s.objects if o.kind == kind]
        assert sum(o.colour == colour for o in found) / len(found) >= PRIOR_STRENGTH


def test_test_split_has_no_priors(splits):
    test = splits["test"]
    for trigger, partner in PARTNERS.items():
        with_trigger = [s for s in test if trigger in _kinds(s)]
        rate = sum(partner in _kinds(s) for s in with_trigger) / len(with_trigger)
        # Independence: the other n-1 shapes of a scene come from the remaining 7.
        independent = sum((len(s.objects) - 1) / (len(SHAPES) - 1) for s in with_trigger) / len(with_trigger)
        assert rate == pytest.approx(independent, abs=0.05)
    objects = [o for s in test for o in s.objects]
    for kind, colour in USUAL_COLOURS.items():
        found = [o for o in objects if o.kind == kind]
        assert sum(o.colour == colour for o in found) / len(found) == pytest.approx(1 / len(COLOURS), abs=0.04)
    for kind in SHAPES:
        assert sum(o.kind == kind for o in objects) / len(objects) == pytest.approx(1 / len(SHAPES), abs=0.02)


def test_scene_contents_and_captions(splits):
    for split in ("train", "test"):
        drawn = splits[split]
        objects = [o for s in drawn for o in s.objects]
        assert {len(s.objects) for s in drawn} == set(range(MIN_OBJECTS, MAX_OBJECTS + 1))
        weak = [o.weak for o in objects if o.weak is not None]
        assert len(weak) / len(objects) == pytest.approx(WEAK_SHARE, abs=0.03)
        assert set(weak) == set(WEAKNESSES)
        for scene in drawn[:300]:
            kinds = [o.kind for o in scene.objects]
            assert len(set(kinds)) == len(kinds)
            for i, a in enumerate(scene.objects):
                for b in scene.objects[i + 1 :]:
                    assert max(abs(a.x - b.x), abs(a.y - b.y)) >= (a.size + b.size) / 2 + 2
            # Every object, left to right, by colour and shape, then where it is.
            ordered = sorted(scene.objects, key=lambda o: (o.x, o.y))
            assert extract_objects(scene.caption) == [(o.colour, o.kind) for o in ordered]
            for o in scene.objects:
                assert f"{o.colour} {o.kind} {position(o)}" in scene.caption


def test_positions_by_thirds():
    assert position(Shape("star", "red", 5, 5, 10)) == "at the top left"
    assert position(Shape("star", "red", 48, 5, 10)) == "at the top"
    assert position(Shape("star", "red", 90, 48, 10)) == "on the right"
    assert position(Shape("star", "red", 48, 48, 10)) == "in the middle"
    assert position(Shape("star", "red", 31, 64, 10)) == "at the bottom left"
    assert position(Shape("star", "red", 32, 95, 10)) == "at the bottom"


def _third(obj) -> tuple[str, str]:
    return ("top", "middle", "bottom")[3 * obj.y // SIZE], ("left", "middle", "right")[3 * obj.x // SIZE]


def test_places_are_read_from_captions_by_thirds(splits):
    caption = "a red star at the top left, blue and green circles on the right, a ring and a cross in the middle."
    assert placed_objects(caption) == [
        ("red", "star", ("top", "left")), ("blue", "circle", ("middle", "right")),
        ("green", "circle", ("middle", "right")), (None, "ring", None), (None, "cross", ("middle", "middle")),
    ]  # fmt: skip
    assert placed_objects("a heart at the bottom. a square at the top right.") == [
        (None, "heart", ("bottom", "middle")), (None, "square", ("top", "right"))
    ]  # fmt: skip
    for scene in splits["test"][:200]:
        ordered = sorted(scene.objects, key=lambda o: (o.x, o.y))
        assert placed_objects(scene.caption) == [(o.colour, o.kind, _third(o)) for o in ordered]


def _alphas(scene, obj) -> list[float]:
    """How much of ``obj``'s colour each pixel it fully covers shows over the bare background:
    1 where it is drawn in full, 0 where the background or a card shows."""
    background = _background_image(scene.background, SIZE)
    mask = _mask(obj, SIZE)
    colour = COLOURS[obj.colour]
    out = []
    for x in range(SIZE):
        for y in range(SIZE):
            if mask.getpixel((x, y)) == 255:
                pixel, bg = scene.image.getpixel((x, y)), background.getpixel((x, y))
                direction = [c - b for c, b in zip(colour, bg)]
                norm = sum(d * d for d in direction)
                out.append(sum((p - b) * d for p, b, d in zip(pixel, bg, direction)) / norm)
    return out


def test_weak_objects_are_drawn_as_the_ground_truth_says(splits):
    seen = dict.fromkeys(["clear", *WEAKNESSES], 0)
    for scene in splits["test"][:60]:
        for obj in scene.objects:
            alphas = _alphas(scene, obj)
            full = sum(a > 0.97 for a in alphas) / len(alphas)
            if obj.weak is None or obj.weak == "small":
                assert full == 1.0
                low, high = SMALL_SIDE if obj.weak == "small" else (SMALL_SIDE[1] + 1, SIZE)
                assert low <= obj.size <= high
            elif obj.weak == "faint":
                median = sorted(alphas)[len(alphas) // 2]
                assert FAINT_ALPHA[0] - 0.03 <= median <= FAINT_ALPHA[1] + 0.03
            else:  # covered: a card hides most of the bounding box, hence of the shape
                assert 0.0 < full < 1 - COVER[0] + 0.25
            seen[obj.weak or "clear"] += 1
    assert min(seen.values()) >= 10


# --- causes and positions of hallucinations --------------------------------------------------

SCENE = [
    Shape("star", "white", 20, 20, 20),  # trigger: its usual partner is a circle (absent here)
    Shape("triangle", "green", 70, 20, 20),  # trigger: its partner, the heart, is here
    Shape("heart", "purple", 50, 70, 20),  # usual colour red
    Shape("ring", "black", 20, 70, 20),  # trigger: partner diamond absent
]


@pytest.mark.parametrize(
    "mention, cause",
    [
        (("orange", "circle"), "prior"),  # the star's partner, not in the scene
        ((None, "circle"), "prior"),
        (("purple", "diamond"), "prior"),  # the ring's partner
        (("red", "heart"), "prior"),  # a heart is there but purple: red is the usual colour
        (("green", "square"), "prior"),  # no cross, but green is a square's usual colour
        (("purple", "square"), "perceptual"),  # no cross in the scene, not the usual colour
        (("orange", "heart"), "perceptual"),  # the heart's colour misread, not as the usual one
        (("red", "triangle"), "perceptual"),  # triangles have no usual colour
        (("blue", "star"), "perceptual"),  # stars are nobody's partner
        ((None, "cross"), "perceptual"),
    ],
)  # fmt: skip
def test_hallucination_cause(mention, cause):
    assert hallucination_cause(mention, SCENE, PARTNERS, USUAL_COLOURS) == cause


def test_a_present_partner_with_a_wrong_colour_is_perceptual():
    # The circle is there, so naming one is no co-occurrence guess; its colour is simply wrong.
    scene = [*SCENE, Shape("circle", "red", 70, 70, 20)]
    assert hallucination_cause(("yellow", "circle"), scene, PARTNERS, USUAL_COLOURS) == "perceptual"
    assert hallucination_cause(("blue", "circle"), scene, PARTNERS, USUAL_COLOURS) == "prior"


def test_cause_and_position_split_hand_worked():
    # 1st white star: right; 2nd blue circle: prior; 3rd green triangle: right; 4th orange heart:
    # perceptual; 5th black ring: right; 6th red heart: prior.
    a = score_caption(
        "there is a white star, a blue circle, a green triangle, an orange heart, a black ring and a red heart.",
        SCENE,
        world="priors",
    )
    assert (a["mentions"], a["hallucinated"], a["hallucinated_prior"], a["hallucinated_perceptual"]) == (6, 3, 2, 1)
    assert a["mentions_at"] == [1, 1, 1, 3] and a["hallucinated_at"] == [0, 1, 0, 2]
    # 1st purple diamond: prior; 2nd purple heart: right.
    b = score_caption("a purple diamond and a purple heart.", SCENE, world="priors")
    assert (b["hallucinated_prior"], b["hallucinated_perceptual"]) == (1, 0)
    summary = summarize([a, b])
    assert summary["CHAIR_i"] == pytest.approx(4 / 8)
    assert summary["CHAIR_i_prior"] == pytest.approx(3 / 8)
    assert summary["CHAIR_i_perceptual"] == pytest.approx(1 / 8)
    assert summary["prior_share"] == pytest.approx(3 / 4)
    assert summary["CHAIR_i_1st"] == pytest.approx(1 / 2)
    assert summary["CHAIR_i_2nd"] == pytest.approx(1 / 2)
    assert summary["CHAIR_i_3rd"] == pytest.approx(0 / 1)
    assert summary["CHAIR_i_later"] == pytest.approx(2 / 3)
    assert summary["recall"] == pytest.approx((3 + 1) / 8)  # star, triangle, ring; the purple heart


def test_each_world_classifies_by_its_own_priors():
    scene = [Shape("star", "white", 20, 20, 20), Shape("triangle", "orange", 70, 70, 20)]
    caption = "a white star, a red circle, a green square and a heart."
    # Both worlds: a circle is a star's partner. Priors world only: green is a square's usual
    # colour and a heart a triangle's partner; the shapes world has neither prior.
    shapes = score_caption(caption, scene)
    priors = score_caption(caption, scene, world="priors")
    assert (shapes["hallucinated"], shapes["hallucinated_prior"], shapes["hallucinated_perceptual"]) == (3, 1, 2)
    assert (priors["hallucinated"], priors["hallucinated_prior"], priors["hallucinated_perceptual"]) == (3, 3, 0)


# --- what the model did, which prior predicts it, and what chance gives ----------------------

KIND_SCENE = [
    Shape("square", "blue", 16, 16, 20),  # top left; blue is a circle's usual colour
    Shape("star", "white", 80, 16, 20),  # top right; trigger: its partner, the circle, is absent
    Shape("cross", "yellow", 80, 80, 20),  # bottom right; yellow is a diamond's usual colour
    Shape("heart", "purple", 48, 80, 20),  # bottom; usual colour red
    Shape("triangle", "orange", 16, 80, 20),  # bottom left; trigger: its partner, the heart, is here
]  # nothing at the top, on the left, in the middle or on the right


@pytest.mark.parametrize(
    "phrase, kind, prior, predicted_by, referent",
    [
        # The blue square renamed, keeping its colour, to the shape blue goes with in training
        # (also the star's partner: the colour's prior comes first).
        ("a blue circle at the top left", "renamed", "colour->shape", ("colour->shape", "co-occurrence"), "square"),
        ("a yellow diamond at the bottom right", "renamed", "colour->shape", ("colour->shape",), "cross"),
        # Renamed to a shape that is elsewhere: the stated place says which object it was.
        ("an orange heart at the bottom left", "renamed", "none", (), "triangle"),
        ("a green star at the top left", "renamed", "none", (), "square"),
        # Nothing there: an added co-occurrence partner; an added shape in its usual colour.
        ("a white circle in the middle", "added", "co-occurrence", ("co-occurrence",), None),
        ("a yellow diamond in the middle", "added", "shape->colour", ("shape->colour",), None),
        ("a blue circle on the left", "added", "co-occurrence", ("co-occurrence", "shape->colour"), None),
        ("a black ring on the right", "added", "none", (), None),
        # The heart, where it is, misread to its usual colour, or to another.
        ("a red heart at the bottom", "colour", "shape->colour", ("shape->colour",), "heart"),
        ("a green heart at the bottom", "colour", "none", (), "heart"),
        ("a red heart", "colour", "shape->colour", ("shape->colour",), "heart"),  # no place stated
        # The heart or the cross put where nothing is (so their colours are wrong too).
        ("a red heart at the top", "placement", "shape->colour", ("shape->colour",), "heart"),
        ("a black cross on the left", "placement", "none", (), "cross"),
        ("a blue circle", "added", "co-occurrence", ("co-occurrence", "shape->colour"), None),
    ],
)  # fmt: skip
def test_what_the_model_did_and_which_prior_predicts_it(phrase, kind, prior, predicted_by, referent):
    score = score_caption(f"there is a white star at the top right and {phrase}.", KIND_SCENE, world="priors")
    assert score["hallucinated_mentions"] != [] and score["mentions"] == 2
    (label,) = score["labels"]
    assert (label.kind, label.prior, label.predicted_by) == (kind, prior, predicted_by)
    assert (label.referent.kind if label.referent else None) == referent
    # The two-way cause is unchanged: prior-driven exactly when some prior predicts it.
    cause = hallucination_cause(score["hallucinated_mentions"][0], KIND_SCENE, PARTNERS, USUAL_COLOURS)
    assert cause == ("perceptual" if prior == "none" else "prior")
    assert score["hallucinated_prior"] == (prior != "none")


def test_the_shapes_world_states_no_places():
    # Its captions place objects relative to each other, so a place read there would be wrong:
    # every mention is unplaced, and a shape the scene lacks is added, by the shapes world's priors.
    (label,) = score_caption("a blue circle at the top left.", KIND_SCENE)["labels"]
    assert (label.kind, label.prior) == ("added", "co-occurrence")
    (label,) = score_caption("a blue heart at the bottom.", KIND_SCENE)["labels"]
    assert (label.kind, label.prior) == ("colour", "none")


@pytest.mark.parametrize(
    "phrase, chance",
    [
        # 7 other shapes for the blue square: only a blue circle is prior-driven.
        ("a blue circle at the top left", 1 / 7),
        # For the yellow cross: a circle (the star's partner) and a diamond (yellow's shape).
        ("a yellow diamond at the bottom right", 2 / 7),
        # Absent circle, ring, diamond in 8 colours each: every circle, and a yellow diamond.
        ("a white circle in the middle", 9 / 24),
        ("a circle in the middle", 1 / 3),  # no colour stated: the circle of 3 absent shapes
        # 7 wrong colours for the heart, one of them its usual red, wherever it is said to be.
        ("a green heart at the bottom", 1 / 7),
        ("a black heart at the top", 1 / 7),
    ],
)  # fmt: skip
def test_chance_hand_worked(phrase, chance):
    (label,) = score_caption(f"there is {phrase}.", KIND_SCENE, world="priors")["labels"]
    assert 1 - label.chance["none"] == pytest.approx(chance)
    assert sum(label.chance.values()) == pytest.approx(1)


def _prior_driven(colour, shape, truth) -> bool:
    """The documented two-way rule, written out again: a partner of a present trigger that the
    scene lacks, or a shape in its usual colour."""
    kinds = {o.kind for o in truth}
    partner = shape not in kinds and any(PARTNERS.get(kind) == shape for kind in kinds)
    return partner or (colour is not None and USUAL_COLOURS.get(shape) == colour)


def test_chance_is_the_share_of_a_random_hallucinator_of_the_same_kind(splits):
    """On real test scenes, every error of each kind a caption can make: its chance is the share
    of prior-driven errors among all errors of that kind for the same object or empty place,
    counted here by brute force with the two-way rule."""

    def label(truth, colour, shape, place):
        score = score_caption(f"there is a {colour} {shape} {place}.", truth, world="priors")
        assert score["hallucinated"] == 1
        (found,) = score["labels"]
        assert (found.prior != "none") == _prior_driven(colour, shape, truth)
        return found

    def mean(flags):
        flags = list(flags)
        return sum(flags) / len(flags)

    seen = dict.fromkeys(KINDS, 0)
    for scene in splits["test"][:3]:
        truth = scene.objects
        kinds = {o.kind for o in truth}
        cells = {_third(o) for o in truth}
        alone = [o for o in truth if sum(_third(x) == _third(o) for x in truth) == 1]
        probes = [Shape("star", "red", 16 + 32 * col, 16 + 32 * row, 10) for row in range(3) for col in range(3)]
        empty = [position(probe) for probe in probes if _third(probe) not in cells]
        for o in alone:
            renames = [k for k in SHAPES if k != o.kind and (o.colour, k) not in {(x.colour, x.kind) for x in truth}]
            renamed = mean(_prior_driven(o.colour, k, truth) for k in renames)
            for k in renames:
                found = label(truth, o.colour, k, position(o))
                assert (found.kind, found.referent) == ("renamed", o)
                assert 1 - found.chance["none"] == pytest.approx(renamed)
            wrong = [c for c in COLOURS if c != o.colour]
            misread = mean(_prior_driven(c, o.kind, truth) for c in wrong)
            for c in wrong:
                found = label(truth, c, o.kind, position(o))
                assert (found.kind, found.referent) == ("colour", o)
                assert 1 - found.chance["none"] == pytest.approx(misread)
            seen["renamed"] += len(renames)
            seen["colour"] += len(wrong)
        absent = [k for k in SHAPES if k not in kinds]
        added = mean(_prior_driven(c, k, truth) for k in absent for c in COLOURS)
        for place in empty:
            for k in absent:
                for c in COLOURS:
                    found = label(truth, c, k, place)
                    assert (found.kind, found.referent) == ("added", None)
                    assert 1 - found.chance["none"] == pytest.approx(added)
                    seen["added"] += 1
            for o in truth:
                wrong = [c for c in COLOURS if c != o.colour]
                misread = mean(_prior_driven(c, o.kind, truth) for c in wrong)
                for c in wrong:
                    found = label(truth, c, o.kind, place)
                    assert (found.kind, found.referent) == ("placement", o)
                    assert 1 - found.chance["none"] == pytest.approx(misread)
                    seen["placement"] += 1
    assert min(seen.values()) >= 20


def test_kind_prior_and_chance_figures_hand_worked():
    captions = [
        "a blue circle at the top left and a white star at the top right.",  # renamed, colour->shape: 1/7
        "a white circle in the middle and a red heart at the bottom.",  # added, co-occurrence: 9/24; colour, 1/7
        "a black ring on the right.",  # added, none: 9/24
    ]
    summary = summarize(score_caption(caption, KIND_SCENE, world="priors") for caption in captions)
    assert (summary["mention_count"], summary["hallucinated_count"]) == (5, 4)
    assert summary["hallucinated_by_kind"] == {"renamed": 1, "added": 2, "colour": 1, "placement": 0}
    assert summary["hallucinated_by_prior"] == {"colour->shape": 1, "co-occurrence": 1, "shape->colour": 1, "none": 1}
    assert summary["hallucinated_by_kind_and_prior"]["added"] == {
        "colour->shape": 0, "co-occurrence": 1, "shape->colour": 0, "none": 1
    }  # fmt: skip
    assert summary["hallucinated_predicted_by"] == {"colour->shape": 1, "co-occurrence": 2, "shape->colour": 1}
    chance = 1 / 7 + 9 / 24 + 1 / 7 + 9 / 24
    assert summary["prior_share"] == pytest.approx(3 / 4)
    assert summary["prior_share_chance"] == pytest.approx(chance / 4)
    assert summary["prior_share_excess"] == pytest.approx((3 - chance) / 4)
    assert summary["CHAIR_i_prior_chance"] == pytest.approx(chance / 5)
    assert summary["CHAIR_i_prior_excess"] == pytest.approx((3 - chance) / 5)
    # Each prior's expected count: a random circle is co-occurrence, a random yellow diamond
    # added is shape->colour, a blue circle for the square colour->shape, a red heart shape->colour.
    assert summary["hallucinated_by_prior_chance"] == pytest.approx(
        {"colour->shape": 1 / 7, "co-occurrence": 2 * 8 / 24, "shape->colour": 1 / 7 + 2 / 24, "none": 4 - chance}
    )
    assert list(summary["hallucinated_by_prior"]) == list(PRIORS)


# --- what training sees ----------------------------------------------------------------------


def test_training_leaves_weak_objects_to_the_captions():
    from vacap.demo.train import PATCH_SIZE, patch_labels

    objects = [Shape("star", "red", 20, 20, 20), Shape("circle", "blue", 70, 70, 20, "faint")]
    labels = patch_labels(objects)
    grid = SIZE // PATCH_SIZE

    def at(x, y):
        return labels[(y // PATCH_SIZE) * grid + x // PATCH_SIZE]

    assert at(20, 20) == [1 + SHAPES.index("star"), 1 + list(COLOURS).index("red")]
    assert at(70, 70) == [-100, -100]  # left out of the probe's loss
    assert at(90, 5) == [0, 0]


def test_the_shapes_tokenizer_is_the_shipped_demo_models():
    from transformers import AutoTokenizer

    from vacap.demo import MODEL_DIR
    from vacap.demo.train import build_tokenizer

    shipped = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert build_tokenizer("shapes").get_vocab() == shipped.get_vocab()
    tokenizer = build_tokenizer("priors")
    vocab = tokenizer.get_vocab()
    assert {k: v for k, v in vocab.items() if k in shipped.get_vocab()} == shipped.get_vocab()
    for scene in scenes(30, 5, "train", world="priors"):
        tokens = tokenizer(scene.caption, add_special_tokens=False)["input_ids"]
        assert vocab["<unk>"] not in tokens

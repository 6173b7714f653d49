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
from vacap.evaluate.shapes import extract_objects, hallucination_cause, score_caption, summarize

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

"""The shapes world (vacap.demo.shapes) and its caption scoring (vacap.evaluate.shapes)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from vacap.demo.shapes import (
    COLOUR_PRIORS,
    CO_OCCURRENCE,
    COLOURS,
    SHAPES,
    SIZE,
    Background,
    Shape,
    make_scene,
    render,
)
from vacap.demo.worlds import scenes
from vacap.evaluate.shapes import extract_objects, format_table, score_caption, summarize

# --- generator -------------------------------------------------------------------------------


def _pixels(scene) -> bytes:
    return scene.image.tobytes()


def test_same_seed_same_scenes_pixel_for_pixel():
    a, b = scenes(20, 7, "train"), scenes(20, 7, "train")
    assert [_pixels(s) for s in a] == [_pixels(s) for s in b]
    assert [s.objects for s in a] == [s.objects for s in b]
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.background for s in a] == [s.background for s in b]


def test_the_shapes_world_is_unchanged():
    # Fingerprint of the scenes the shipped `demo` model and its results were made from,
    # recorded before the priors world was added beside this one.
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for scene in scenes(30, 7, split):
            digest.update(scene.image.tobytes())
            digest.update(repr([(o.kind, o.colour, o.x, o.y, o.size) for o in scene.objects]).encode())
            digest.update(scene.caption.encode())
    assert digest.hexdigest() == "bfb3203afc85601543d13a69fb2ca7692df20751008e1d2b31d6ca3fe8827a59"
    assert all(o.weak is None for s in scenes(30, 7, "train") for o in s.objects)


def test_different_seed_or_split_different_scenes():
    base = scenes(10, 7, "train")
    for other in (scenes(10, 8, "train"), scenes(10, 7, "test")):
        assert [s.objects for s in other] != [s.objects for s in base]
        assert sum(_pixels(x) != _pixels(y) for x, y in zip(base, other)) >= 9


def test_make_scene_draws_from_the_given_rng_only():
    random.seed(1)
    a = make_scene(random.Random(3), "test")
    random.seed(2)
    b = make_scene(random.Random(3), "test")
    assert a.objects == b.objects and _pixels(a) == _pixels(b)


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        scenes(1, 0, "validation")


def test_scene_contents_are_valid():
    for scene in scenes(300, 3, "train") + scenes(300, 3, "test"):
        assert scene.image.mode == "RGB" and scene.image.size == (SIZE, SIZE)
        assert 1 <= len(scene.objects) <= 4
        kinds = [o.kind for o in scene.objects]
        assert len(set(kinds)) == len(kinds), "a shape appears at most once per scene"
        for o in scene.objects:
            assert o.kind in SHAPES and o.colour in COLOURS
            assert o.size // 2 <= o.x < SIZE - o.size // 2 and o.size // 2 <= o.y < SIZE - o.size // 2
        # Bounding boxes do not overlap, so every object is fully visible.
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert max(abs(a.x - b.x), abs(a.y - b.y)) >= (a.size + b.size) / 2
        # The caption names every object by colour and shape.
        assert sorted(extract_objects(scene.caption)) == sorted((o.colour, o.kind) for o in scene.objects)
        # The background is never an object's colour.
        for colour in (scene.background.start, scene.background.end):
            assert colour not in COLOURS.values()


@pytest.mark.parametrize("kind", SHAPES)
def test_one_object_is_drawn_where_the_ground_truth_says(kind):
    background = Background((120, 110, 130), (120, 110, 130))
    shape = Shape(kind, "blue", 40, 56, 30)
    image = render([shape], background, SIZE)
    corners = [(0, 0), (SIZE - 1, 0), (0, SIZE - 1), (SIZE - 1, SIZE - 1)]
    assert all(image.getpixel(p) == (120, 110, 130) for p in corners)
    # Pixels in the bounding box that have the object's colour: most of a filled shape.
    box = [(x, y) for x in range(40 - 15, 40 + 15) for y in range(56 - 15, 56 + 15)]
    inside = sum(image.getpixel(p) == COLOURS["blue"] for p in box)
    outside = sum(
        image.getpixel((x, y)) == COLOURS["blue"] for x in range(SIZE) for y in range(SIZE) if (x, y) not in set(box)
    )
    assert inside > 0.2 * len(box) and outside == 0
    if kind != "ring":  # a ring's centre is its hole
        assert image.getpixel((40, 56)) == COLOURS["blue"]
    else:
        assert image.getpixel((40, 56)) == (120, 110, 130)


def test_render_gradient_and_noise_backgrounds():
    gradient = render([], Background((100, 100, 100), (160, 160, 160), vertical=True), SIZE)
    assert gradient.getpixel((5, 0))[0] < gradient.getpixel((5, SIZE - 1))[0]
    noisy = render([], Background((120, 120, 120), (120, 120, 120), noise=20, noise_seed=5), SIZE)
    values = [noisy.getpixel((x, y))[0] for x in range(SIZE) for y in range(SIZE)]
    assert len(set(values)) > 5 and all(110 <= v <= 130 for v in values)
    again = render([], Background((120, 120, 120), (120, 120, 120), noise=20, noise_seed=5), SIZE)
    assert noisy.tobytes() == again.tobytes()


def _co_occurrence(drawn, trigger, partner):
    with_trigger = [s for s in drawn if trigger in {o.kind for o in s.objects}]
    both = sum(partner in {o.kind for o in s.objects} for s in with_trigger)
    # Independence (test split): the other n-1 shapes are drawn from the remaining 7.
    expected = sum((len(s.objects) - 1) / (len(SHAPES) - 1) for s in with_trigger)
    return both / len(with_trigger), expected / len(with_trigger)


def _colour_rate(drawn, kind, colour):
    found = [o for s in drawn for o in s.objects if o.kind == kind]
    return sum(o.colour == colour for o in found) / len(found)


@pytest.fixture(scope="module")
def splits():
    return {split: scenes(2000, 0, split) for split in ("train", "test")}


def test_train_split_has_the_priors(splits):
    for trigger, (partner, probability) in CO_OCCURRENCE.items():
        rate, independent = _co_occurrence(splits["train"], trigger, partner)
        assert rate == pytest.approx(probability, abs=0.05)
        assert rate > independent + 0.3
    for kind, (colour, probability) in COLOUR_PRIORS.items():
        assert _colour_rate(splits["train"], kind, colour) == pytest.approx(probability, abs=0.05)


def test_test_split_is_decorrelated(splits):
    for trigger, (partner, _) in CO_OCCURRENCE.items():
        rate, independent = _co_occurrence(splits["test"], trigger, partner)
        assert rate == pytest.approx(independent, abs=0.05)
    for kind, (colour, _) in COLOUR_PRIORS.items():
        assert _colour_rate(splits["test"], kind, colour) == pytest.approx(1 / len(COLOURS), abs=0.04)
    # Shapes and colours are uniform.
    kinds = Counter(o.kind for s in splits["test"] for o in s.objects)
    colours = Counter(o.colour for s in splits["test"] for o in s.objects)
    total = sum(kinds.values())
    assert all(abs(c / total - 1 / 8) < 0.025 for c in kinds.values())
    assert all(abs(c / total - 1 / 8) < 0.025 for c in colours.values())


def test_captions_use_several_styles(splits):
    starts = Counter(s.caption.split()[0] for s in splits["train"][:300])
    assert {"there", "a", "one", "two", "three", "four"} <= set(starts)
    assert any(" above " in s.caption or " below " in s.caption for s in splits["train"][:300])
    assert any(" to the left of " in s.caption for s in splits["train"][:300])


# --- object extraction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a red circle above a blue star.", [("red", "circle"), ("blue", "star")]),
        ("there is a green square and a yellow heart.", [("green", "square"), ("yellow", "heart")]),
        (
            "two objects: a red heart on the left and a white ring on the right.",
            [("red", "heart"), ("white", "ring")],
        ),
        ("three objects: a red circle, an orange star and a black cross.",
         [("red", "circle"), ("orange", "star"), ("black", "cross")]),
        # plurals are one mention each; synonyms map to the canonical shape
        ("two red circles and some crosses", [("red", "circle"), (None, "cross")]),
        ("a blue disc next to a purple rhombus and a donut", [("blue", "circle"), ("purple", "diamond"), (None, "ring")]),
        # several colours on one shape word
        ("red and blue circles", [("red", "circle"), ("blue", "circle")]),
        # size words and numbers do not break the link; other words do
        ("a small red star", [("red", "star")]),
        ("the red is next to a star", [(None, "star")]),
        ("the circle is red", [(None, "circle")]),
        ("a red and a blue square", [("blue", "square")]),
        # not shapes
        ("a red background with stripes", []),
        ("", []),
        ("A RED CIRCLE.", [("red", "circle")]),
        ("a violet triangle", [("purple", "triangle")]),
        ("the square, the triangle and the diamond", [(None, "square"), (None, "triangle"), (None, "diamond")]),
    ],
)  # fmt: skip
def test_extract_objects(caption, expected):
    assert extract_objects(caption) == expected


# --- scoring ---------------------------------------------------------------------------------

TRUTH = [Shape("circle", "red", 20, 20, 24), Shape("star", "blue", 70, 20, 24), Shape("ring", "white", 50, 70, 24)]


def test_score_caption_hand_worked():
    # red circle: right; blue star: right; green heart: hallucinated (shape too); the ring missed.
    s = score_caption("a red circle, a blue star and a green heart.", TRUTH)
    assert s["mentions"] == 3 and s["hallucinated"] == 1 and s["hallucinated_shape"] == 1
    assert s["objects"] == 3 and s["recalled"] == 2 and s["recalled_shape"] == 2
    assert s["words"] == 10 and s["hallucinated_mentions"] == [("green", "heart")]
    # Wrong colour: a hallucination, but not a shape hallucination; the star is not recalled.
    s = score_caption("a red star and a ring.", TRUTH)
    assert (s["mentions"], s["hallucinated"], s["hallucinated_shape"]) == (2, 1, 0)
    assert (s["recalled"], s["recalled_shape"]) == (1, 2)
    # Repeats count once.
    s = score_caption("a red circle and a red circle and red circles", TRUTH)
    assert (s["mentions"], s["hallucinated"], s["recalled"]) == (1, 0, 1)


def test_summarize_hand_worked():
    scores = [
        score_caption("a red circle, a blue star and a green heart.", TRUTH),  # 3 mentions, 1 bad
        score_caption("a red star and a ring.", TRUTH),  # 2 mentions, 1 bad
        score_caption("a white ring.", TRUTH),  # 1 mention, 0 bad
        score_caption("nothing here", TRUTH),  # 0 mentions
    ]
    summary = summarize(scores)
    assert summary["captions"] == 4
    assert summary["CHAIR_s"] == pytest.approx(2 / 4)
    assert summary["CHAIR_i"] == pytest.approx(2 / 6)
    assert summary["recall"] == pytest.approx((2 + 1 + 1 + 0) / 12)
    assert summary["CHAIR_s_shape"] == pytest.approx(1 / 4)
    assert summary["CHAIR_i_shape"] == pytest.approx(1 / 6)
    assert summary["recall_shape"] == pytest.approx((2 + 2 + 1 + 0) / 12)
    assert summary["mean_length"] == pytest.approx((10 + 6 + 3 + 2) / 4)
    assert summarize([])["CHAIR_i"] == 0.0


def test_format_table():
    row = {"setting": "greedy", "method": "greedy", **summarize([score_caption("a red circle.", TRUTH)])}
    row["tokens_per_s"] = 12.5
    table = format_table([row])
    lines = table.strip().splitlines()
    assert lines[0].startswith("| setting |") and len(lines) == 3
    assert "| greedy | greedy | 0.0 | 0.0 | 33.3 |" in lines[2] and lines[2].endswith("| 12.5 |")


# --- `vacap eval shapes` and the settings grid it shares with `vacap compare` ------------------


def _vacap(*args, columns: int = 250):
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "vacap.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def test_settings_grid_sweeps_each_method_in_the_settings_that_act_in_it():
    from vacap.compare import MECHANISMS_ALONE, parse_sweeps, settings_grid

    for kwargs, flags in [
        (dict(sweeps={"sparsity": [0.3]}), ["--sparsity"]),
        (dict(sweeps={"alpha": [0.5]}), ["--alpha"]),
        (dict(sweeps={"sink_beta": [0.5]}), ["--sink-beta"]),
        (dict(ablation=True), ["--ablation"]),
        (dict(sweeps={"sparsity": [0.3], "alpha": [0.5]}), ["--sparsity", "--alpha"]),
    ]:
        with pytest.raises(ValueError, match="no run among --methods \\(greedy, fastv\\) uses") as error:
            settings_grid(["greedy", "fastv"], **kwargs)
        assert all(f"{flag} (acts only with --method vasparse" in str(error.value) for flag in flags)
    assert list(settings_grid(["greedy"])) == ["greedy"]
    grid = settings_grid(["greedy", "vasparse"], {"sparsity": [0.3, 0.7]}, ablation=True)
    assert list(grid) == ["greedy", "vasparse sparsity=0.3", "vasparse sparsity=0.7", *MECHANISMS_ALONE]
    grid = settings_grid(["vasparse"], {"lam": [0.0, 2.0], "kv_budget": [0.5]})
    assert grid == {
        "vasparse lam=0 kv-budget=0.5": dict(method="vasparse", lam=0.0, kv_budget=0.5),
        "vasparse lam=2 kv-budget=0.5": dict(method="vasparse", lam=2.0, kv_budget=0.5),
    }
    sweeps = parse_sweeps(contrast_layers="2,4", mask_rate="0.5")
    assert sweeps == {"contrast_layers": [2, 4], "mask_rate": [0.5]}
    assert all(type(n) is int for n in sweeps["contrast_layers"])
    assert list(settings_grid(["vasparse"], sweeps)) == [
        "vasparse contrast-layers=2 mask-rate=0.5", "vasparse contrast-layers=4 mask-rate=0.5"
    ]  # fmt: skip
    # --alpha acts in vcd too; --sparsity only in vasparse; greedy takes neither and runs once.
    grid = settings_grid(["greedy", "vasparse", "vcd"], {"sparsity": [0.3], "alpha": [0.1, 1.0]})
    assert grid == {
        "greedy": dict(method="greedy"),
        "vasparse sparsity=0.3 alpha=0.1": dict(method="vasparse", sparsity=0.3, alpha=0.1),
        "vasparse sparsity=0.3 alpha=1": dict(method="vasparse", sparsity=0.3, alpha=1.0),
        "vcd alpha=0.1": dict(method="vcd", alpha=0.1),
        "vcd alpha=1": dict(method="vcd", alpha=1.0),
    }
    # Each method's own knobs sweep that method only.
    grid = settings_grid(
        ["greedy", "vista", "var", "pai"], parse_sweeps(vista_lambda="0,0.3", var_p="0.6", pai_alpha="0.2,1")
    )
    assert grid == {
        "greedy": dict(method="greedy"),
        "vista vista-lambda=0": dict(method="vista", vista_lambda=0.0),
        "vista vista-lambda=0.3": dict(method="vista", vista_lambda=0.3),
        "var var-p=0.6": dict(method="var", var_p=0.6),
        "pai pai-alpha=0.2": dict(method="pai", pai_alpha=0.2),
        "pai pai-alpha=1": dict(method="pai", pai_alpha=1.0),
    }
    # A setting that a combination turns off is left out of that run's label and settings.
    assert list(settings_grid(["vasparse"], {"alpha": [0.0, 1.0], "contrast_layers": [2]})) == [
        "vasparse alpha=0", "vasparse alpha=1 contrast-layers=2"
    ]  # fmt: skip


@pytest.mark.parametrize("command", [["eval", "shapes"], ["compare", "sample_images/house.jpg"]])
@pytest.mark.parametrize("flags", [["--sparsity", "0.3"], ["--lam", "0.5"], ["--ablation"]])
def test_vasparse_flags_without_vasparse_are_usage_errors(command, flags):
    out = _vacap(*command, "--methods", "greedy", *flags)
    assert out.returncode == 2
    message = " ".join(out.stderr.replace("│", " ").split())
    assert "no run among --methods (greedy) uses it" in message
    assert f"{flags[0]} (acts only with --method vasparse" in message


def test_var_dims_join_the_var_runs_they_act_in():
    from vacap.compare import parse_sweeps, settings_grid

    grid = settings_grid(["greedy", "var"], parse_sweeps(var_p="0.3,1"), fixed={"var_dims": (3, 5)})
    assert grid == {
        "greedy": dict(method="greedy"),
        "var var-p=0.3": dict(method="var", var_p=0.3, var_dims=(3, 5)),
        "var var-p=1": dict(method="var", var_p=1.0),
    }
    for command in (["eval", "shapes"], ["compare", "sample_images/house.jpg"]):
        out = _vacap(*command, "--methods", "greedy,vcd", "--var-dims", "3,5")
        message = " ".join(out.stderr.replace("│", " ").split())
        assert out.returncode == 2 and "--var-dims (acts only with --method var" in message, command
        assert "no run among --methods (greedy, vcd) uses it" in message


def test_eval_shapes_table_fits_80_columns_and_runs_only_what_was_asked():
    sweep = _vacap("eval", "shapes", "-n", "1", "--methods", "greedy,vasparse", "--sparsity", "0.35,0.7",
                   "--alpha", "0.15,1", "--dtype", "fp32", columns=80)  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr
    lines = sweep.stdout.splitlines()
    labels = ["greedy", "vasparse sparsity=0.35 alpha=0.15", "vasparse sparsity=0.35 alpha=1",
              "vasparse sparsity=0.7 alpha=0.15", "vasparse sparsity=0.7 alpha=1",
              "vasparse selection only", "vasparse sink only", "vasparse contrast only"]  # fmt: skip
    rows = [line for line in lines if line.startswith(("greedy", "vasparse"))]
    # Each label whole, then the numbers; then the differences from greedy, one row per setting.
    assert [row.split("  ")[0] for row in rows] == labels + labels[1:]
    assert max(map(len, lines)) <= 80
    assert "…" not in sweep.stdout
    greedy = _vacap("eval", "shapes", "-n", "1", "--methods", "greedy", "--dtype", "fp32", "--json")
    assert greedy.returncode == 0, greedy.stderr
    assert list(json.loads(greedy.stdout)["results"]) == ["greedy"]


def test_eval_shapes_sweeps_any_vasparse_setting_with_paired_intervals_against_greedy():
    out = _vacap("eval", "shapes", "-n", "6", "--methods", "greedy,vasparse", "--lam", "0,2", "--kv-budget", "0.5",
                 "--no-ablation", "--dtype", "fp32", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    results = report["results"]
    assert report["baseline"] == "greedy"
    assert list(results) == ["greedy", "vasparse lam=0 kv-budget=0.5", "vasparse lam=2 kv-budget=0.5"]
    assert "CHAIR_s_diff" not in results["greedy"]
    for label in list(results)[1:]:
        for name in ("CHAIR_s", "CHAIR_i"):
            difference, low, high = results[label][f"{name}_diff"]
            assert difference == pytest.approx(results[label][name] - results["greedy"][name])
            assert low <= difference <= high
    bad = _vacap("eval", "shapes", "--methods", "vasparse", "--kv-budget", "0,1")
    assert bad.returncode == 2 and "kv_budget must be in (0, 1]" in bad.stderr


def test_eval_shapes_sweeps_the_contrast_branch_and_rejects_bad_values():
    out = _vacap("eval", "shapes", "-n", "1", "--methods", "greedy,vasparse", "--contrast-layers", "2",
                 "--mask-rate", "0.5,1", "--no-ablation", "--dtype", "fp32", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert list(json.loads(out.stdout)["results"]) == [
        "greedy", "vasparse contrast-layers=2 mask-rate=0.5", "vasparse contrast-layers=2 mask-rate=1"
    ]  # fmt: skip
    # A layer count that is not a whole number, and one the model does not have (checked on load).
    for flags, message in [
        (["--contrast-layers", "2,1.5"], "--contrast-layers: invalid literal for int()"),
        (["--contrast-layers", "5"], "contrast_layers must be at most the model's 4 decoder layers"),
    ]:
        bad = _vacap("eval", "shapes", "-n", "1", "--methods", "vasparse", *flags)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr

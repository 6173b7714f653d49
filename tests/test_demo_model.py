"""The shipped demo models (vacap/demo/model, vacap/demo/model-priors) load through vacap's own
code and caption sensibly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vacap.demo import MODEL_DIR, PRIORS_MODEL_DIR
from vacap.demo.worlds import scenes
from vacap.evaluate.shapes import extract_objects

needs_demo_model = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").exists(), reason="demo model not trained (python -m vacap.demo.train)"
)


def _single_object_scene():
    """The first test-split scene (seed 0) with exactly one object: a known, clear target."""
    return next(s for s in scenes(40, 0, "test") if len(s.objects) == 1)


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory):
    scene = _single_object_scene()
    path = tmp_path_factory.mktemp("demo") / "scene.png"
    scene.image.save(path)
    return scene, path


def _assert_shipped_small_and_documented(folder):
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "generation_config.json", "TRAINING.md"} <= set(files)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) < 25e6


@needs_demo_model
def test_shipped_files_are_small_and_documented():
    _assert_shipped_small_and_documented(MODEL_DIR)


@needs_demo_model
def test_loads_through_load_model():
    from vacap.model import load_model

    model = load_model(str(MODEL_DIR), dtype="fp32", device="cpu")
    assert type(model.hf).__name__ == "LlavaForConditionalGeneration"
    assert len(model.layers) >= 4  # VASparse works from layer 2 on
    assert model.preparer.prompt_text("Please describe this image in detail.") == (
        "USER: <image>\nPlease describe this image in detail. ASSISTANT:"
    )
    inputs = model.prepare([_single_object_scene().image], "Please describe this image in detail.")
    embeds, image_mask = model.embed(inputs)
    assert int(image_mask.sum()) == 64 and embeds.shape[-1] == model.hf.config.text_config.hidden_size
    assert model.eos_ids == (model.tokenizer.eos_token_id,)
    # The word-level tokenizer knows every caption word and restores the spacing exactly.
    for scene in scenes(20, 1, "train"):
        ids = model.tokenizer(scene.caption, add_special_tokens=False)["input_ids"]
        assert model.tokenizer.unk_token_id not in ids
        assert model.decode(ids) == scene.caption


@needs_demo_model
@pytest.mark.dtype
@pytest.mark.parametrize(
    "settings",
    [{"method": "greedy", "dtype": "fp32"}, {"dtype": "auto"}, {"dtype": "bf16"}],
    ids=["greedy-fp32", "default", "vasparse-bf16"],
)
def test_captions_a_single_object_scene(sample_image, settings):
    from vacap import Captioner

    scene, path = sample_image
    (record,) = Captioner(str(MODEL_DIR), device="cpu", max_new_tokens=32, **settings).caption([path])
    assert record["status"] == "ok", record["error"]
    assert record["tokens"] < 32, "the model stops by itself"
    mentioned = set(extract_objects(record["caption"]))
    truth = {(o.colour, o.kind) for o in scene.objects}
    assert mentioned & truth, f"{record['caption']!r} names none of {truth}"


# --- demo-priors: the model of the priors world (vacap.demo.priors) ----------------------------

needs_priors_model = pytest.mark.skipif(
    not (PRIORS_MODEL_DIR / "model.safetensors").exists(),
    reason="demo-priors model not trained (python -m vacap.demo.train --world priors)",
)


@pytest.fixture(scope="module")
def clear_priors_scene(tmp_path_factory):
    """The first priors-world test scene (seed 0) with 3 objects, all clearly visible."""
    scene = next(
        s for s in scenes(60, 0, "test", world="priors") if len(s.objects) == 3 and all(o.weak is None for o in s.objects)
    )
    path = tmp_path_factory.mktemp("demo-priors") / "scene.png"
    scene.image.save(path)
    return scene, path


@needs_priors_model
def test_demo_priors_is_shipped_small_deep_and_loads_by_name():
    from vacap.model import load_model

    _assert_shipped_small_and_documented(PRIORS_MODEL_DIR)
    model = load_model("demo-priors", dtype="fp32", device="cpu")
    assert type(model.hf).__name__ == "LlavaForConditionalGeneration"
    assert len(model.layers) >= 8  # --start-layer 2 leaves most layers to VASparse
    for scene in scenes(10, 1, "train", world="priors"):
        ids = model.tokenizer(scene.caption, add_special_tokens=False)["input_ids"]
        assert model.tokenizer.unk_token_id not in ids
        assert model.decode(ids) == scene.caption


@needs_priors_model
def test_demo_priors_names_at_least_two_objects_of_a_clear_scene_right(clear_priors_scene):
    from vacap import Captioner

    scene, path = clear_priors_scene
    (record,) = Captioner("demo-priors", method="greedy", dtype="fp32", device="cpu").caption([path])
    assert record["status"] == "ok", record["error"]
    assert record["tokens"] < 128, "the model stops by itself"
    right = set(extract_objects(record["caption"])) & {(o.colour, o.kind) for o in scene.objects}
    assert len(right) >= 2, f"{record['caption']!r} against {[(o.colour, o.kind) for o in scene.objects]}"


@needs_priors_model
def test_eval_shapes_world_priors_reports_the_cause_split_with_intervals():
    out = subprocess.run(
        [sys.executable, "-m", "vacap.cli", "eval", "shapes", "--world", "priors", "-n", "6", "--methods",
         "greedy,vasparse", "--no-ablation", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    # The progress bar (on stderr, so the JSON stays parseable) counted every caption.
    assert "2 settings x 6 scenes" in out.stderr and "100%" in out.stderr
    report = json.loads(out.stdout)
    assert (report["model"], report["world"], report["baseline"]) == ("demo-priors", "priors", "greedy")
    greedy, vasparse = report["results"]["greedy"], report["results"]["vasparse"]
    assert greedy["hallucinated_count"] > 0
    for row in (greedy, vasparse):
        assert row["CHAIR_i_prior"] + row["CHAIR_i_perceptual"] == pytest.approx(row["CHAIR_i"])
        assert 0 <= row["recall"] <= 1
        # Each hallucination has one kind and one prior; "none" is the perceptual part.
        assert row["hallucinated_count"] == round(row["CHAIR_i"] * row["mention_count"])
        assert sum(row["hallucinated_by_kind"].values()) == row["hallucinated_count"]
        assert sum(row["hallucinated_by_prior"].values()) == row["hallucinated_count"]
        assert {kind: sum(by_prior.values()) for kind, by_prior in row["hallucinated_by_kind_and_prior"].items()} == (
            row["hallucinated_by_kind"]
        )
        prior = row["hallucinated_count"] - row["hallucinated_by_prior"]["none"]
        assert prior == round(row["CHAIR_i_prior"] * row["mention_count"])
        assert all(n >= row["hallucinated_by_prior"][name] for name, n in row["hallucinated_predicted_by"].items())
        # Chance: an expected count per prior, adding up to the hallucinations; excess = share - chance.
        chance = row["hallucinated_by_prior_chance"]
        assert sum(chance.values()) == pytest.approx(row["hallucinated_count"])
        assert row["prior_share_chance"] * row["hallucinated_count"] == pytest.approx(row["hallucinated_count"] - chance["none"])
        assert 0 <= row["prior_share_chance"] <= 1
        assert row["prior_share_excess"] == pytest.approx(row["prior_share"] - row["prior_share_chance"])
        assert row["CHAIR_i_prior_chance"] == pytest.approx(row["prior_share_chance"] * row["CHAIR_i"])
        assert row["CHAIR_i_prior_excess"] == pytest.approx(row["CHAIR_i_prior"] - row["CHAIR_i_prior_chance"])
    for name in ("CHAIR_i", "CHAIR_i_prior", "CHAIR_i_perceptual", "CHAIR_i_prior_excess", "prior_share_excess",
                 "recall"):  # fmt: skip
        difference, low, high = vasparse[f"{name}_diff"]
        assert difference == pytest.approx(vasparse[name] - greedy[name])
        assert low <= difference <= high


@needs_priors_model
def test_eval_shapes_world_priors_table_shows_the_prior_part_chance_and_excess():
    out = subprocess.run(
        [sys.executable, "-m", "vacap.cli", "eval", "shapes", "--world", "priors", "-n", "3", "--methods", "greedy"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    header = next(line for line in lines if line.startswith("setting")).split()
    assert header == ["setting", "CHAIR_i", "prior", "chance", "excess", "recall", "err"]
    figures = dict(zip(header[1:], map(float, next(line for line in lines if line.startswith("greedy")).split()[1:])))
    assert figures["excess"] == pytest.approx(figures["prior"] - figures["chance"], abs=0.0011)

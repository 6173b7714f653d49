"""The shipped demo model (vacap/demo/model) loads through vacap's own code and captions sensibly."""

from __future__ import annotations

import pytest

from vacap.demo import MODEL_DIR
from vacap.demo.shapes import scenes
from vacap.evaluate.shapes import extract_objects

pytestmark = pytest.mark.skipif(
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


def test_shipped_files_are_small_and_documented():
    files = {p.name: p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "generation_config.json", "TRAINING.md"} <= set(files)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) < 25e6


def test_loads_through_load_model():
    from vacap.model import load_model

    model = load_model(str(MODEL_DIR), dtype="fp32", device="cpu")
    assert type(model.hf).__name__ == "LlavaForConditionalGeneration"
    assert len(model.layers) >= 4  # VASparse works from layer 2 on
    assert model.prompt_text("Please describe this image in detail.") == (
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

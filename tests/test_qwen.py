"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, M-RoPE and their hub layout in vacap's own loop."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import IMAGES, MAX_NEW, PROMPT, hf_greedy

from vacap.decode import Steering, generate
from vacap.model import ModelLoadError, load_model
from vacap.tiny_models import QWEN_ARCHITECTURES


@pytest.fixture(scope="module", params=QWEN_ARCHITECTURES)
def qwen(request, tiny_model):
    path = tiny_model(request.param)
    return path, load_model(str(path), dtype="fp32", device="cpu")


def ours(model, images, prompt=PROMPT, max_new=MAX_NEW) -> list[list[int]]:
    return [g.tokens for g in generate(model, model.prepare(images, prompt), Steering(), max_new)]


def test_greedy_matches_hf_generate_single_and_batched(qwen):
    path, model = qwen
    single = model.prepare(IMAGES[:1], PROMPT)
    assert ours(model, IMAGES[:1]) == hf_greedy(path, single)

    # Images of different sizes and prompts of different lengths: different grids (one not
    # square), so different image-token counts and M-RoPE deltas, in a left-padded batch.
    prompts = [PROMPT, "Describe the scene briefly.", "What is in the picture?", PROMPT + " " + PROMPT]
    batch = model.prepare(IMAGES, prompts)
    grids = batch["image_grid_thw"][:, 1:].tolist()
    assert len({tuple(g) for g in grids}) > 2 and any(h != w for h, w in grids)
    assert not batch["attention_mask"].bool().all()
    batched = [g.tokens for g in generate(model, batch, Steering(), MAX_NEW)]
    assert batched == hf_greedy(path, batch)
    assert len({t for row in batched for t in row}) > 5, "parity on varied tokens, not on an instant EOS"
    assert batched == [ours(model, [image], prompt)[0] for image, prompt in zip(IMAGES, prompts)]


def test_image_tokens_follow_the_image_grid(qwen):
    _, model = qwen
    inputs = model.prepare(IMAGES, PROMPT)
    counts = (inputs["input_ids"] == model.image_token_id).sum(-1).tolist()
    grids = model.image_grids(inputs)
    assert counts == [h * w for h, w in grids]
    assert (3, 2) in grids  # 30 x 44 pixels: 3 rows of 2 merged tokens


def test_positions_are_the_models_own_rope_index(qwen):
    path, model = qwen
    inputs = model.prepare(IMAGES, PROMPT)
    positions, deltas = model.positions(inputs)
    assert positions.shape == (3, *inputs["input_ids"].shape)
    # An image's tokens share one time position; their rows and columns differ.
    image = inputs["input_ids"][1] == model.image_token_id
    assert positions[0, 1, image].unique().numel() == 1 and positions[1, 1, image].unique().numel() == 3
    # The next token's position (count of real tokens + delta) is one past the prompt's largest.
    n = inputs["attention_mask"].sum(-1, keepdim=True)
    assert torch.equal(n + deltas, positions.amax(dim=(0, 2))[:, None] + 1)


def test_unsupported_architectures_are_refused_with_the_supported_ones_named(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["Qwen2AudioForConditionalGeneration"], "model_type": "qwen2_audio"})
    )
    with pytest.raises(ModelLoadError) as error:
        load_model(str(folder), device="cpu")
    message = str(error.value)
    assert "Qwen2AudioForConditionalGeneration" in message
    for name in ("LlavaForConditionalGeneration", *("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")):
        assert name in message

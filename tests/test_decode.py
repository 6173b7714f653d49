"""The decode loop and KV cache against Hugging Face's own greedy generate."""

from __future__ import annotations

import pytest
import torch
from helpers import IMAGES, MAX_NEW, PROMPT, hf_greedy, noise_image

from vacap.cache import KVCache
from vacap.decode import Steering, generate
from vacap.model import load_model
from vacap.tiny_models import ARCHITECTURES


def ours(model, images) -> list[list[int]]:
    inputs = model.prepare(images, PROMPT)
    return [g.tokens for g in generate(model, inputs, Steering(), MAX_NEW)]


@pytest.mark.dtype
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_hf_generate_single_and_batched(tiny_model, arch, dtype):
    path = tiny_model(arch)
    model = load_model(str(path), dtype=dtype, device="cpu")

    single = ours(model, IMAGES[:1])
    assert single == hf_greedy(path, model.prepare(IMAGES[:1], PROMPT), dtype=model.dtype)

    batched_inputs = model.prepare(IMAGES, PROMPT)
    batched = [g.tokens for g in generate(model, batched_inputs, Steering(), MAX_NEW)]
    assert batched == hf_greedy(path, batched_inputs, dtype=model.dtype)
    assert len({t for row in batched for t in row}) > 5, "parity on varied tokens, not on an instant EOS"
    if dtype == "fp32":
        # Each image decoded alone gives what it got in the mixed batch. Only fp32 promises this:
        # bf16 kernels round differently for different batch shapes on CPUs without native bf16.
        assert batched == [ours(model, [image])[0] for image in IMAGES]


@pytest.mark.dtype
def test_greedy_matches_hf_generate_on_a_llava_next_length_prompt(tiny_model):
    path = tiny_model("llava-next", size="long")
    model = load_model(str(path), dtype="fp32", device="cpu")
    inputs = model.prepare([noise_image(384, 384, 5)], PROMPT)
    # The 2 x 2 anyres grid of 192-px tiles: LLaVA-NeXT's cache length.
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == 2928
    tokens = [g.tokens for g in generate(model, inputs, Steering(), 8)]
    assert tokens == hf_greedy(path, inputs, 8)
    assert len(set(tokens[0])) > 3


def test_anyres_batch_is_really_padded(tiny_model):
    model = load_model(str(tiny_model("llava-next")), dtype="fp32", device="cpu")
    inputs = model.prepare(IMAGES, PROMPT)
    image_tokens = (inputs["input_ids"] == model.image_token_id).sum(-1)
    assert len(set(image_tokens.tolist())) > 1
    assert not inputs["attention_mask"].bool().all()


def test_stops_at_eos_and_at_max_new_tokens(tiny_model):
    model = load_model(str(tiny_model("llava-llama")), dtype="fp32", device="cpu")
    images = [noise_image(20 + 7 * i, 30, 10 + i) for i in range(12)]
    max_new = 48
    outputs = generate(model, model.prepare(images, PROMPT), Steering(), max_new)
    by_eos = [g for g in outputs if g.stopped_by == "eos"]
    by_length = [g for g in outputs if g.stopped_by == "length"]
    assert by_eos and by_length, "the fixture should give both kinds of stop on these images"
    for g in by_eos:
        assert g.tokens[-1] in model.eos_ids and not set(g.tokens[:-1]) & set(model.eos_ids)
    for g in by_length:
        assert len(g.tokens) == max_new and not set(g.tokens) & set(model.eos_ids)


def test_cache_writes_in_place_and_gathers_per_head():
    cache = KVCache(2, 2, 2, 4, 8, dtype=torch.float32, device=torch.device("cpu"))
    k_ptr = cache.k.data_ptr()
    k = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).view(2, 2, 3, 4)
    keys, values, valid = cache.append(0, k, -k, torch.tensor([[False, True, True], [True, True, True]]))
    keys, _, valid = cache.append(0, k[:, :, :1] + 100, k[:, :, :1], torch.ones(2, 1, dtype=torch.bool))
    assert cache.k.data_ptr() == k_ptr and cache.length == [4, 0]
    assert torch.equal(keys[:, :, :3], k) and torch.equal(keys[:, :, 3], k[:, :, 0] + 100)
    assert valid.tolist() == [[False, True, True, True], [True, True, True, True]]

    # Head 0 keeps slots (3, 1), head 1 keeps (2, 0): heads may keep different slots.
    index = torch.tensor([[3, 1], [2, 0]]).expand(2, 2, 2)
    cache.gather(0, index, torch.ones(2, 2, dtype=torch.bool))
    keys, values, valid = cache.view(0)
    assert cache.length[0] == 2 and keys.shape == (2, 2, 2, 4)
    assert torch.equal(keys[:, 0, 0], k[:, 0, 0] + 100) and torch.equal(keys[:, 0, 1], k[:, 0, 1])
    assert torch.equal(keys[:, 1, 0], k[:, 1, 2]) and torch.equal(values[:, 1, 1], -k[:, 1, 0])
    assert not cache.valid[0, :, 2:].any()
    with pytest.raises(RuntimeError, match="full"):
        cache.append(1, torch.zeros(2, 2, 9, 4), torch.zeros(2, 2, 9, 4), torch.ones(2, 9, dtype=torch.bool))

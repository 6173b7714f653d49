"""VASparse, VCD and FastV inside the decode loop, against independent recomputations.

The expected values come from Hugging Face's own modules (eager ``output_attentions``, the
decoder layers called with explicit masks), never from vacap's decode loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import IMAGES, PROMPT, hf_greedy, hf_model, noise_image

from vacap.config import DecodeConfig
from vacap.decode import Steering, generate
from vacap.methods import steering_for
from vacap.model import load_model

MAX_NEW = 12
OFF = dict(sparsity=0.0, alpha=0.0, sink_beta=0.0, kv_budget=1.0)


def run(model, images, max_new=MAX_NEW, **settings):
    config = DecodeConfig(max_new_tokens=max_new, **settings)
    steering = steering_for(model, config)
    outputs = generate(model, model.prepare(images, PROMPT), steering, max_new)
    return [g.tokens for g in outputs], steering


def positions(inputs):
    """HF forward numbers left-padded rows from 0 at the padding; generate, like vacap, does not."""
    return (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)


# llava-next: anyres, so a batch of differently shaped images is left padded.
@pytest.fixture(scope="module", params=["llava-llama", "llava-qwen2", "llava-next"])
def loaded(request, tiny_model):
    path = tiny_model(request.param)
    return path, load_model(str(path), dtype="fp32", device="cpu")


@pytest.mark.dtype
def test_identity_1_mechanisms_off_is_hf_greedy(loaded):
    path, model = loaded
    tokens, _ = run(model, IMAGES, method="vasparse", **OFF)
    assert tokens == hf_greedy(path, model.prepare(IMAGES, PROMPT))
    assert run(model, IMAGES, method="greedy")[0] == tokens


@pytest.mark.dtype
def test_defaults_act_are_deterministic_and_batch_independent(loaded):
    _, model = loaded
    greedy, _ = run(model, IMAGES, method="greedy")
    default, _ = run(model, IMAGES)
    assert default != greedy, "the default VASparse settings should change some caption"
    assert run(model, IMAGES)[0] == default
    assert [run(model, [image])[0][0] for image in IMAGES] == default


def test_identity_2_selection_keeps_k_slots_per_head_in_the_loop(loaded):
    _, model = loaded
    sparsity = 0.6
    config = DecodeConfig(max_new_tokens=3, sparsity=sparsity, alpha=0.0, sink_beta=0.0)
    steering = steering_for(model, config)
    seen = []
    original = steering.layer_logits

    def spy(layer, logits, cache, prefill):
        out = original(layer, logits, cache, prefill)
        if not prefill:
            seen.append((layer, torch.isfinite(out[:, :, 0]), cache.valid[layer, :, : logits.shape[-1]]))
        return out

    steering.layer_logits = spy
    generate(model, model.prepare(IMAGES[:2], PROMPT), steering, 3)
    assert seen
    for layer, finite, valid in seen:
        n = valid.sum(-1)  # (B,)
        if layer < config.start_layer:
            assert finite.all(), "no selection below start_layer (padding is masked later, by the loop)"
            continue
        k = torch.clamp(torch.ceil((1 - sparsity) * n - 1e-9), min=1).long()
        assert torch.equal(finite.sum(-1), k[:, None].expand(-1, finite.shape[1]))
        assert finite[:, :, -1].all(), "the current token is always kept"
        assert not (finite & ~valid[:, None]).any()


def test_identity_3_sink_beta_zero_is_bitwise_off(loaded):
    _, model = loaded
    inputs = model.prepare(IMAGES[:2], PROMPT)
    captured = {}

    class Capture(Steering):
        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

        def layer_logits(self, layer, logits, cache, prefill):
            return self.inner.layer_logits(layer, logits, cache, prefill)

        def next_token(self, logits, token_input, position):
            captured.setdefault(self.name, []).append(logits.clone())
            return self.inner.next_token(logits, token_input, position)

    settings = dict(max_new_tokens=4, sparsity=0.0, alpha=0.0, sink_beta=0.0)
    generate(model, inputs, Capture(steering_for(model, DecodeConfig(**settings)), "vasparse"), 4)
    generate(model, inputs, Capture(Steering(), "plain"), 4)
    assert all(torch.equal(a, b) for a, b in zip(captured["vasparse"], captured["plain"]))
    # And the penalty really acts when beta > 0, without NaN under selection's -inf mask.
    tokens, steering = run(model, IMAGES[:2], max_new=4, sparsity=0.5, alpha=0.0, sink_beta=0.5)
    colsum = steering.cache.fields["colsum"]
    assert torch.isfinite(colsum).all() and colsum.sum() > 0


def test_identity_4_contrast_token_is_argmax_over_plausible_set(loaded):
    path, model = loaded
    hf = hf_model(path)
    alpha, apc = 0.7, 0.05
    inputs = model.prepare(IMAGES, PROMPT)
    with torch.no_grad():
        z_theta = hf(**inputs, position_ids=positions(inputs)).logits[:, -1].float()
        last_embedding = hf.get_input_embeddings()(inputs["input_ids"][:, -1])
        z_phi = hf.lm_head(hf.model.language_model.norm(last_embedding)).float()
    expected = []
    for zt, zp in zip(z_theta.tolist(), z_phi.tolist()):
        top = max(zt)
        p = [math.exp(z - top) for z in zt]
        plausible = [j for j, pj in enumerate(p) if pj >= apc * max(p)]
        expected.append(max(plausible, key=lambda j: (1 + alpha) * zt[j] - alpha * zp[j]))
    tokens, _ = run(model, IMAGES, max_new=1, sparsity=0.0, sink_beta=0.0, alpha=alpha, apc_beta=apc)
    assert [t[0] for t in tokens] == expected
    assert expected != z_theta.argmax(-1).tolist(), "pick a case where contrast changes a token"


def test_identity_5_saliency_matches_hf_eager_attentions(loaded):
    path, model = loaded
    hf = hf_model(path)
    inputs = model.prepare(IMAGES, PROMPT)
    with torch.no_grad():
        last = hf(**inputs, position_ids=positions(inputs), output_attentions=True).attentions[-1].float()
    image = inputs["input_ids"] == model.image_token_id
    valid = inputs["attention_mask"].bool()
    _, steering = run(model, IMAGES, max_new=1, sparsity=0.5, alpha=0.0, sink_beta=0.0)
    v = steering.cache.fields["v"][0, :, 0, : image.shape[1]]
    for b in range(len(IMAGES)):
        mass = (last[b] * image[b]).sum(-1).mean(0)  # (T,)
        expected = torch.softmax(mass[valid[b]], 0)
        got = torch.softmax(v[b][valid[b]], 0)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        before_image = valid[b] & (torch.arange(image.shape[1]) < int(image[b].float().argmax()))
        assert before_image.any() and (v[b][before_image] == 0).all()


def test_identity_6_kv_budget(loaded):
    _, model = loaded
    inputs = model.prepare(IMAGES, PROMPT)
    valid = inputs["attention_mask"].bool()
    n = valid.sum(-1)
    T = valid.shape[1]
    plain, _ = run(model, IMAGES, **OFF)

    # r = 1 changes nothing: no compaction, no bias, same tokens.
    tokens, steering = run(model, IMAGES, max_new=1, sparsity=0.5, kv_budget=1.0)
    assert steering.cache.bias is None and set(steering.cache.length) == {T}

    # Clusters partition the dropped set: cluster sizes (exp of the bias) add up to the dropped count.
    budget, ratio = 0.5, 0.3
    _, steering = run(model, IMAGES, max_new=1, **{**OFF, "kv_budget": budget, "cluster_ratio": ratio})
    cache = steering.cache
    start = DecodeConfig().start_layer
    for layer in range(len(model.layers)):
        if layer < start:
            assert cache.length[layer] == T
            continue
        bias = cache.layer_bias(layer)
        live = cache.valid[layer, :, : cache.length[layer]]
        for b in range(len(IMAGES)):
            kept = math.ceil(budget * int(n[b]) - 1e-9)
            dropped = int(n[b]) - kept
            clusters = math.ceil(ratio * dropped - 1e-9)
            assert live[b].tolist() == [True] * (kept + clusters) + [False] * (len(live[b]) - kept - clusters)
            # Kept tokens first (no bias), then the clusters, whose sizes add up to the dropped count.
            assert (bias[b][:, :kept] == 0).all()
            sizes = bias[b][:, kept : kept + clusters].exp()
            assert (sizes >= 1 - 1e-5).all()
            torch.testing.assert_close(sizes.sum(-1), torch.full_like(sizes[:, 0], float(dropped)))

    # Single-member clusters (cluster_ratio 1) reproduce every dropped token exactly.
    tokens, _ = run(model, IMAGES, **{**OFF, "kv_budget": budget, "cluster_ratio": 1.0})
    assert tokens == plain
    # A real budget changes the cache the steps attend to, and so (here) some caption.
    assert run(model, IMAGES, **{**OFF, "kv_budget": 0.3, "cluster_ratio": 0.1})[0] != plain


@pytest.mark.dtype
def test_vcd_first_token_matches_recomputation(tiny_model):
    path = tiny_model("llava-llama")
    model = load_model(str(path), dtype="fp32", device="cpu")
    hf = hf_model(path)
    config = DecodeConfig(method="vcd", max_new_tokens=1).resolved()
    inputs = model.prepare(IMAGES, PROMPT)
    # VCD's forward diffusion, written out: sigmoid schedule over 1000 steps.
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, 0)[config.vcd_noise_step]
    pixels = inputs["pixel_values"]
    eps = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(config.seed))
    noised = (alpha_bar.sqrt() * pixels + (1 - alpha_bar).sqrt() * eps).float()
    with torch.no_grad():
        z = hf(**inputs).logits[:, -1].float()
        z_noised = hf(**{**inputs, "pixel_values": noised}).logits[:, -1].float()
    p = torch.softmax(z, -1)
    plausible = p >= config.apc_beta * p.max(-1, keepdim=True).values
    expected = torch.where(plausible, 2 * z - z_noised, -math.inf).argmax(-1)
    tokens, _ = run(model, IMAGES, max_new=1, method="vcd")
    assert [t[0] for t in tokens] == expected.tolist()


@pytest.mark.dtype
def test_fastv_first_token_matches_layerwise_recomputation(tiny_model):
    path = tiny_model("llava-llama")
    model = load_model(str(path), dtype="fp32", device="cpu")
    hf = hf_model(path)
    config = DecodeConfig(method="fastv")
    K, R = config.fastv_layer, config.fastv_ratio
    image = noise_image(40, 30, 1)
    inputs = model.prepare([image], PROMPT)
    ids = inputs["input_ids"][0]
    is_image = ids == model.image_token_id
    with torch.no_grad():
        attentions = hf(**inputs, output_attentions=True).attentions
        received = attentions[K - 1][0].mean(0).mean(0)  # mean over heads, then over queries
        image_slots = is_image.nonzero().squeeze(1)
        n_drop = int(R * len(image_slots))
        dropped = image_slots[received[image_slots].argsort()[:n_drop]]
        # Run HF's decoder layers by hand: causal mask below K, dropped columns masked from K on.
        lm = hf.model.language_model
        T = ids.shape[0]
        causal = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)
        pruned = causal.clone()
        pruned[:, dropped] = torch.finfo(torch.float32).min
        pruned[dropped, dropped] = 0.0  # a dropped token still sees itself (its row is never read)
        hidden = hf.model(**inputs, output_hidden_states=True).hidden_states[0]
        positions = torch.arange(T)[None]
        rotary = lm.rotary_emb(hidden, positions)
        for index, layer in enumerate(lm.layers):
            mask = (causal if index < K else pruned)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        expected = hf.lm_head(lm.norm(hidden[:, -1])).argmax(-1).item()
    tokens, _ = run(model, [image], max_new=1, method="fastv")
    assert tokens[0][0] == expected
    assert len(dropped) > 0

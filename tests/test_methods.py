"""VASparse, VCD and FastV inside the decode loop, against independent recomputations.

The expected values come from Hugging Face's own modules (eager ``output_attentions``, the
decoder layers called with explicit masks), never from vacap's decode loop.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import (
    IMAGES,
    PROMPT,
    extended,
    hf_greedy,
    hf_layer_logits,
    hf_layer_qkv,
    hf_model,
    hf_states,
    image_mass,
    noise_image,
    numpy_dpc_knn,
    positions,
)

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


def fed_tokens(outputs, max_new: int, pad_id: int) -> torch.Tensor:
    """The tokens the loop fed back, # (B, max_new): each row's output, then padding once it stopped."""
    return torch.tensor([out.tokens + [pad_id] * (max_new - len(out.tokens)) for out in outputs])


class Spy:
    """Records what a method's hooks returned or saw at decode steps, per layer."""

    def __init__(self, steering):
        self.raw, self.logits, self.probs = {}, {}, {}
        layer_logits, observe = steering.layer_logits, steering.observe

        def spy_logits(layer, logits, cache, chunk):
            out = layer_logits(layer, logits, cache, chunk)
            if not chunk.prefill:
                self.raw.setdefault(layer, []).append(logits[:, :, 0].clone())
                self.logits.setdefault(layer, []).append(out[:, :, 0].clone())
            return out

        def spy_observe(layer, probs, cache, query_valid, chunk):
            if not chunk.prefill:
                self.probs.setdefault(layer, []).append(probs[:, :, 0].clone())
            observe(layer, probs, cache, query_valid, chunk)

        steering.layer_logits, steering.observe = spy_logits, spy_observe


def expected_keep(s: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, sparsity: float, lam: float) -> torch.Tensor:
    """The kept set of section 1, written out: top-k of delta with the current (last) slot kept.

    s # (B, H, T) raw logits of the current query; v # (B, T) image mass of every slot's token.
    Returns # (B, H, T) bool.
    """
    B, H, T = s.shape
    keep = torch.zeros(B, H, T, dtype=torch.bool)
    for b in range(B):
        idx = valid[b].nonzero().squeeze(1).tolist()
        p = torch.softmax(v[b, idx].double(), 0)
        phat = (p - p.min()) / (p.max() - p.min())
        k = max(1, math.ceil((1 - sparsity) * len(idx) - 1e-9))
        for h in range(H):
            square = s[b, h, idx].double() ** 2
            delta = square / square.max() + lam * phat
            best = sorted(range(len(idx) - 1), key=lambda i: -float(delta[i]))[: k - 1]
            keep[b, h, [idx[i] for i in best] + [idx[-1]]] = True
    return keep


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

    def spy(layer, logits, cache, chunk):
        out = original(layer, logits, cache, chunk)
        if not chunk.prefill:
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

    class Capture:  # every hook the inner method's own, only next_token recorded
        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

        def next_token(self, logits, token_input, position, choose):
            captured.setdefault(self.name, []).append(logits.clone())
            return self.inner.next_token(logits, token_input, position, choose)

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


@pytest.mark.dtype
def test_identity_5_saliency_matches_hf_eager_attentions(loaded):
    path, model = loaded
    hf = hf_model(path)
    max_new = 4
    inputs = model.prepare(IMAGES, PROMPT)
    # Sparsity 0.001 keeps every slot of these short caches (k = n), so the attention each
    # generated token paid is HF's plain one and v can be recomputed for generated tokens too.
    steering = steering_for(model, DecodeConfig(max_new_tokens=max_new, sparsity=0.001, alpha=0.0, sink_beta=0.0))
    outputs = generate(model, inputs, steering, max_new)
    fed = fed_tokens(outputs, max_new, model.pad_id)[:, : max_new - 1]  # the last one is never processed
    full = extended(inputs, fed)
    expected = image_mass(hf_states(hf, full).attentions[-1], full["input_ids"] == model.image_token_id)
    valid = full["attention_mask"].bool()
    v = steering.cache.fields["v"][0, :, 0, : valid.shape[1]]
    assert v.shape == expected.shape and (expected[valid] > 0).any()
    torch.testing.assert_close(v[valid], expected[valid], rtol=1e-4, atol=1e-6)
    image = full["input_ids"] == model.image_token_id
    for b in range(len(IMAGES)):
        before_image = valid[b] & (torch.arange(image.shape[1]) < int(image[b].float().argmax()))
        assert before_image.any() and (v[b][before_image] == 0).all()


def test_identity_6_kv_budget_off_and_single_member_clusters(loaded):
    _, model = loaded
    T = model.prepare(IMAGES, PROMPT)["input_ids"].shape[1]
    plain, _ = run(model, IMAGES, **OFF)
    # r = 1 changes nothing: no compaction, no bias, the tokens of the same settings without it.
    tokens, steering = run(model, IMAGES, max_new=1, **{**OFF, "sparsity": 0.5, "kv_budget": 1.0})
    assert steering.cache.bias is None and set(steering.cache.length) == {T}
    assert tokens == run(model, IMAGES, max_new=1, **{**OFF, "sparsity": 0.5})[0]
    # Single-member clusters (cluster_ratio 1) reproduce every dropped token exactly.
    tokens, _ = run(model, IMAGES, **{**OFF, "kv_budget": 0.5, "cluster_ratio": 1.0})
    assert tokens == plain
    # A real budget changes the cache the steps attend to, and so (here) some caption.
    assert run(model, IMAGES, **{**OFF, "kv_budget": 0.3, "cluster_ratio": 0.1})[0] != plain


@pytest.mark.dtype
def test_identity_6_kv_budget_clusters_recomputed_from_hf(loaded):
    """Kept slots, DPC-KNN clusters, their keys, values, bias and statistics (image flag, v, c), all
    recomputed from HF's own modules and the contract's formulas; free slots hold nothing."""
    path, model = loaded
    hf = hf_model(path)
    budget, ratio, knn, lam = 0.5, 0.3, 5, 1.0
    settings = dict(sparsity=0.5, lam=lam, alpha=0.0, sink_beta=0.5, kv_budget=budget, cluster_ratio=ratio, knn=knn)
    inputs = model.prepare(IMAGES, PROMPT)
    valid = inputs["attention_mask"].bool()
    image = inputs["input_ids"] == model.image_token_id
    _, steering = run(model, IMAGES, max_new=1, **settings)
    cache = steering.cache
    states, pos = hf_states(hf, inputs), positions(inputs)
    v = image_mass(states.attentions[-1], image)
    group = model.n_heads // model.n_kv_heads
    start = DecodeConfig().start_layer
    clustered = merged_v = 0
    for layer in range(start, len(model.layers)):
        _, keys, values = hf_layer_qkv(hf, states.hidden_states[layer], pos, layer)
        s = hf_layer_logits(hf, states.hidden_states[layer], pos, layer)[:, :, -1]  # the last prompt query
        colsum = (states.attentions[layer] * valid[:, None, :, None]).sum(2)  # (B, H, T)
        for b in range(len(IMAGES)):
            idx = valid[b].nonzero().squeeze(1)
            n = len(idx)
            p = torch.softmax(v[b, idx].double(), 0)
            phat = (p - p.min()) / (p.max() - p.min())
            square = s[b][:, idx].double() ** 2  # (H, n)
            delta = (square / square.amax(-1, keepdim=True) + lam * phat).view(model.n_kv_heads, group, n).amax(1)
            delta[:, -1] = math.inf
            n_keep = math.ceil(budget * n - 1e-9)
            width = n_keep + math.ceil(ratio * (n - n_keep) - 1e-9)
            assert cache.valid[layer, b].tolist() == [True] * width + [False] * (cache.capacity - width)
            for g in range(model.n_kv_heads):
                order = sorted(range(n), key=lambda i: (-float(delta[g, i]), i))
                kept, dropped = idx[sorted(order[:n_keep])], idx[sorted(order[n_keep:])]
                n_clusters = width - n_keep
                assign = torch.tensor(numpy_dpc_knn(keys[b, g, dropped].double().numpy(), n_clusters, knn)[0])
                members = [dropped[assign == c] for c in range(n_clusters)]
                clustered += sum(len(m) > 1 for m in members)

                def expect(x, reduce):  # kept slots as they were, then one reduced slot per cluster
                    return torch.stack([*x[..., kept].unbind(-1), *(reduce(x[..., m]) for m in members)], -1)

                # vacap's layers below start_layer run SDPA, HF's reference eager attention: the keys
                # and values they feed differ by fp32 rounding, a few 1e-6 here and there.
                torch.testing.assert_close(cache.k[layer, b, g, :width].T, expect(keys[b, g].T, lambda x: x.mean(-1)),
                                           rtol=1e-4, atol=5e-5)  # fmt: skip
                torch.testing.assert_close(cache.v[layer, b, g, :width].T,
                                           expect(values[b, g].T, lambda x: x.mean(-1)), rtol=1e-4, atol=5e-5)  # fmt: skip
                sizes = torch.tensor([len(m) for m in members], dtype=torch.float32)
                torch.testing.assert_close(cache.bias[layer, b, g, :width], torch.cat([torch.zeros(n_keep), sizes.log()]))
                flags = expect(image[b].float(), lambda x: (x.mean(-1) > 0.5).float())
                assert torch.equal(cache.fields["image"][layer, b, g, :width], flags)
                # v (for P) of a cluster is its members' mean; a sum would give it a larger P.
                torch.testing.assert_close(cache.fields["v"][layer, b, g, :width], expect(v[b], lambda x: x.mean(-1)),
                                           rtol=1e-4, atol=1e-6)  # fmt: skip
                merged_v += sum(len(m) > 1 and bool(v[b, m].any()) for m in members)
                heads = range(g * group, (g + 1) * group)
                torch.testing.assert_close(cache.fields["colsum"][layer, b, list(heads), :width],
                                           expect(colsum[b, list(heads)], lambda x: x.sum(-1)), rtol=1e-4, atol=1e-5)  # fmt: skip
        # Revision 2: slots past the compacted content hold nothing at all.
        for name, field in [("k", cache.k), ("v", cache.v), *cache.fields.items()]:
            free = field[layer].movedim(2, 1)[~cache.valid[layer]]  # (B, heads, T, ...) -> (free slots, heads, ...)
            assert not free.any(), f"{name} left in a free slot of layer {layer}"
    assert clustered > 0, "some cluster should merge several tokens"
    assert merged_v > 0, "some cluster should merge several tokens that paid the image attention"


def test_identity_6_tokens_after_compaction_start_from_their_own_statistics(loaded):
    _, model = loaded
    settings = dict(max_new_tokens=3, sparsity=0.5, alpha=0.0, sink_beta=0.5, kv_budget=0.3)
    steering = steering_for(model, DecodeConfig(**settings))
    spy = Spy(steering)
    generate(model, model.prepare(IMAGES, PROMPT), steering, 3)
    cache = steering.cache
    for layer in range(DecodeConfig().start_layer, len(model.layers)):
        first, second = cache.length[layer] - 2, cache.length[layer] - 1  # the two generated tokens
        image = cache.fields["image"][layer]
        assert not image[:, :, [first, second]].any(), "a generated token is not an image slot"
        # Column sums: only the attention the generated tokens received from queries after them.
        got = cache.fields["colsum"][layer][:, :, [first, second]]
        step_1, step_2 = spy.probs[layer]
        received = torch.stack([step_1[:, :, first] + step_2[:, :, first], step_2[:, :, second]], -1)
        torch.testing.assert_close(got, received)


def test_kv_budget_keeps_no_view_of_the_prefill_logits(loaded):
    _, model = loaded
    steering = steering_for(model, DecodeConfig(max_new_tokens=1, kv_budget=0.5))
    kept = []
    compact = steering.after_prefill

    def inspect(cache):
        kept.extend(steering._prompt_logits.values())
        compact(cache)

    steering.after_prefill = inspect
    generate(model, model.prepare(IMAGES, PROMPT), steering, 1)
    assert kept
    # Each is the last query's row alone, not a window onto a (B, H, T, T) tensor.
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in kept)


@pytest.mark.dtype
def test_identity_7_sink_column_sums_match_hf_and_grow_by_one_row(loaded):
    path, model = loaded
    hf = hf_model(path)
    sparsity, lam, beta = 0.6, 1.0, 0.5
    settings = dict(sparsity=sparsity, lam=lam, alpha=0.0, sink_beta=beta)
    inputs = model.prepare(IMAGES, PROMPT)
    valid = inputs["attention_mask"].bool()
    T = valid.shape[1]
    start = DecodeConfig().start_layer
    states = hf_states(hf, inputs)
    _, after_prefill = run(model, IMAGES, max_new=1, **settings)
    c = after_prefill.cache.fields["colsum"][:, :, :, :T]
    assert not c[:start].any(), "no column sums below start_layer"
    for layer in range(start, len(model.layers)):
        # Padding queries left out: their rows are HF's, not attention any real token paid.
        expected = (states.attentions[layer] * valid[:, None, :, None]).sum(2)
        torch.testing.assert_close(c[layer], expected, rtol=1e-4, atol=1e-5)

    # One step: the current token's row, with the penalty and the selection the contract defines,
    # in every layer (the loop makes every layer's sink factor in the first one). HF gives the
    # raw logits s of the first such layer only: the later ones see what VASparse changed.
    steering = steering_for(model, DecodeConfig(max_new_tokens=2, **settings))
    spy = Spy(steering)
    outputs = generate(model, inputs, steering, 2)
    full = extended(inputs, fed_tokens(outputs, 2, model.pad_id)[:, :1])
    full_valid = full["attention_mask"].bool()
    full_states = hf_states(hf, full)
    s = hf_layer_logits(hf, full_states.hidden_states[start], positions(full), start)[:, :, -1]
    real = full_valid[:, None].expand_as(s)  # padding slots hold other filler in each
    torch.testing.assert_close(spy.raw[start][0][real], s[real], rtol=1e-4, atol=1e-4)
    v = image_mass(full_states.attentions[-1], full["input_ids"] == model.image_token_id)
    v[:, -1] = 0  # the current token's v is recorded in the last layer, after this one selects
    for layer in range(start, len(model.layers)):
        s = s if layer == start else spy.raw[layer][0]
        before = torch.nn.functional.pad(c[layer], (0, 1))
        w = torch.softmax(before.masked_fill(~full_valid[:, None], -math.inf), -1)
        penalised = (1 + beta) * s - beta * w * s
        keep = expected_keep(s, v, full_valid, sparsity, lam)
        row = torch.softmax(penalised.masked_fill(~keep, -math.inf), -1)
        # A slot the step drops must grow by exactly 0.
        grown = steering.cache.fields["colsum"][layer, :, :, : T + 1] - before
        torch.testing.assert_close(grown, row, rtol=1e-4, atol=1e-5)


@pytest.mark.dtype
def test_identity_8_selection_in_a_real_step_matches_top_k_from_hf(loaded):
    """The slots each head attends to at the first decode step in layer start_layer, against the
    top-k of delta recomputed from HF's modules: raw logits (not the penalised ones), and P from
    HF's last-layer attentions."""
    path, model = loaded
    hf = hf_model(path)
    sparsity, lam = 0.6, 1.0
    inputs = model.prepare(IMAGES, PROMPT)
    config = DecodeConfig(max_new_tokens=2, sparsity=sparsity, lam=lam, alpha=0.0, sink_beta=1.0)
    steering = steering_for(model, config)
    spy = Spy(steering)
    outputs = generate(model, inputs, steering, 2)
    full = extended(inputs, fed_tokens(outputs, 2, model.pad_id)[:, :1])
    states = hf_states(hf, full)
    start = config.start_layer
    s = hf_layer_logits(hf, states.hidden_states[start], positions(full), start)[:, :, -1]
    v = image_mass(states.attentions[-1], full["input_ids"] == model.image_token_id)
    v[:, -1] = 0
    expected = expected_keep(s, v, full["attention_mask"].bool(), sparsity, lam)
    [attended] = spy.logits[start]
    assert torch.equal(torch.isfinite(attended), expected)
    # The set is a real choice: the saliency term changes it (lam = 0 would keep other slots).
    assert not torch.equal(expected, expected_keep(s, v, full["attention_mask"].bool(), sparsity, 0.0))


@pytest.mark.dtype
# Both ends and a rate between, beside the default 0.5: a loop that ignored --mask-rate would
# hide the default's share of the image slots and fail at each of the others.
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 1.0])
def test_identity_9_contrast_branch_runs_m_layers_with_image_slots_hidden(loaded, rate):
    path, model = loaded
    hf = hf_model(path)
    m, alpha, apc = 2, 3.0, 0.01
    inputs = model.prepare(IMAGES, PROMPT)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    image = ids == model.image_token_id
    config = DecodeConfig(max_new_tokens=1, sparsity=0.0, sink_beta=0.0, alpha=alpha, apc_beta=apc,
                          contrast_layers=m, mask_rate=rate)  # fmt: skip
    steering = steering_for(model, config)
    branch_outputs = []
    run_branch = steering._phi_hidden

    def capture(token_input, position):
        branch_outputs.append(run_branch(token_input, position))
        return branch_outputs[-1]

    steering._phi_hidden = capture
    tokens = [out.tokens[0] for out in generate(model, inputs, steering, 1)]
    hidden = steering.cache.fields["hidden"][0, :, 0, : ids.shape[1]] > 0.5
    assert not (hidden & ~image).any()
    assert hidden.sum(-1).tolist() == [round(rate * n) for n in image.sum(-1).tolist()]

    # The branch, recomputed with HF's decoder layers: the last prompt token again, at its own
    # position, seeing the prompt's cached keys minus the hidden image slots and minus the main
    # pass's copy of itself.
    T, pos = ids.shape[1], positions(inputs)
    lm = hf.model.language_model
    states = hf_states(hf, inputs)
    low = torch.finfo(torch.float32).min
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & valid[:, None, :]
    allowed[:, -1, :-1] &= ~hidden[:, :-1]
    mask = torch.where(allowed, 0.0, low)[:, None]
    x = hf.get_input_embeddings()(ids[:, -1:])
    with torch.no_grad():
        for j in range(m):
            sequence = torch.cat([states.hidden_states[j][:, :-1], x], 1)
            rotary = lm.rotary_emb(sequence, pos)
            x = lm.layers[j](sequence, attention_mask=mask, position_embeddings=rotary, position_ids=pos)[:, -1:]
        z_phi = hf.lm_head(lm.norm(x[:, 0])).float()
        z_theta = states.logits[:, -1].float()
        z_phi_embedding = hf.lm_head(lm.norm(hf.get_input_embeddings()(ids[:, -1]))).float()

    def choose(z_phi):
        p = torch.softmax(z_theta, -1)
        plausible = p >= apc * p.amax(-1, keepdim=True)
        return torch.where(plausible, (1 + alpha) * z_theta - alpha * z_phi, -math.inf).argmax(-1).tolist()

    torch.testing.assert_close(branch_outputs[0], x[:, 0], rtol=1e-3, atol=2e-4)
    assert tokens == choose(z_phi)
    assert choose(z_phi) != choose(z_phi_embedding), "the m layers must matter for this check to mean anything"

    # The branch's own slot is rolled back: after three steps every layer holds prompt + 2 tokens.
    three = steering_for(model, dataclasses.replace(config, max_new_tokens=3))
    generate(model, inputs, three, 3)
    assert three.cache.length == [T + 2] * len(model.layers)


@pytest.mark.dtype
@pytest.mark.parametrize("alpha, weight", [(None, 1.0), (0.4, 0.4)])  # VCD's own alpha, or the user's
def test_vcd_first_token_matches_recomputation(tiny_model, alpha, weight):
    path = tiny_model("llava-llama")
    model = load_model(str(path), dtype="fp32", device="cpu")
    hf = hf_model(path)
    config = DecodeConfig(method="vcd", max_new_tokens=1, alpha=alpha).resolved()
    assert config.alpha == weight
    inputs = model.prepare(IMAGES, PROMPT)
    # VCD's forward diffusion, written out: sigmoid schedule over 1000 steps.
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, 0)[config.vcd_noise_step]
    pixels = inputs["pixel_values"]
    # Every image its own noise from the seed, whatever batch it is in.
    eps = torch.cat([torch.randn(x[None].shape, generator=torch.Generator().manual_seed(config.seed)) for x in pixels])
    noised = (alpha_bar.sqrt() * pixels + (1 - alpha_bar).sqrt() * eps).float()
    with torch.no_grad():
        z = hf(**inputs).logits[:, -1].float()
        z_noised = hf(**{**inputs, "pixel_values": noised}).logits[:, -1].float()
    p = torch.softmax(z, -1)
    plausible = p >= config.apc_beta * p.max(-1, keepdim=True).values
    expected = torch.where(plausible, (1 + weight) * z - weight * z_noised, -math.inf).argmax(-1)
    if alpha is not None:  # the weight matters here: another weight would choose other tokens
        assert not torch.equal(expected, torch.where(plausible, 2 * z - z_noised, -math.inf).argmax(-1))
    tokens, _ = run(model, IMAGES, max_new=1, method="vcd", alpha=alpha)
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


def test_fastv_compaction_leaves_no_stale_image_flag_for_diagnostics(tiny_model):
    from vacap.diagnostics import Diagnostics

    # Anyres: many image tokens, so FastV drops more of them than the prompt has tokens after
    # the image, and the slots that compaction frees held image tokens.
    model = load_model(str(tiny_model("llava-next")), dtype="fp32", device="cpu")
    config = DecodeConfig(method="fastv", max_new_tokens=3, diagnostics="summary")
    steering = Diagnostics(steering_for(model, config), model, config.start_layer)
    inputs = model.prepare(IMAGES[:1], PROMPT)
    image_slots = (inputs["input_ids"][0] == model.image_token_id).nonzero()
    assert len(inputs["input_ids"][0]) - 1 - int(image_slots.max()) < len(image_slots) * config.fastv_ratio
    generate(model, inputs, steering, 3)
    cache, image = steering.cache, steering.cache.fields["image"]
    for layer in range(config.fastv_layer, len(model.layers)):
        length = cache.length[layer]
        # Generated tokens sit in the slots the dropped image tokens left; they are not image slots.
        assert not image[layer, :, :, length - 2 : length].any()
        assert not image[layer, :, :, length:].any()

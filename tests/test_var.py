"""VAR (docs/VAR.md) inside the decode loop: its identities, each a test.

Random tiny models have no massive activations, so the tests make sinks exist: every hidden
dimension a sink dimension and tau a quantile of the image tokens' scores, taken from Hugging
Face's own hidden states (so a quarter of the image tokens are sinks in the first layer VAR acts
in); or a massive value planted in the first token's embedding. Expected values come from
Hugging Face's modules and a literal loop over rows, never from vacap's loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import IMAGES, PROMPT, extended, hf_greedy, hf_layer_qkv, hf_model, hf_states, positions
from test_syncs import stream_syncs, syncs
from transformers.models.llama.modeling_llama import repeat_kv

from vacap.config import DecodeConfig
from vacap.decode import Steering, generate, generate_stream
from vacap.methods import steering_for
from vacap.model import load_model
from vacap.var import SINK_FIELD, massive_dims, model_sink_dims, redistribute, sink_scores

MAX_NEW = 8
START = 1  # the tiny models have 4 layers: VAR acts in layers 1 and 2


def run(model, images, max_new=MAX_NEW, **settings):
    config = DecodeConfig(max_new_tokens=max_new, **settings)
    steering = steering_for(model, config)
    outputs = generate(model, model.prepare(images, PROMPT), steering, max_new)
    return [g.tokens for g in outputs], steering


def rms_scores(hidden: torch.Tensor) -> torch.Tensor:
    """max_d |x_d| / rms(x) over every dimension, written out # (B, T)."""
    x = hidden.float()
    return (x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()).abs().amax(-1)


def sinks_exist(path, model) -> dict:
    """Settings under which a quarter of the first image's tokens are sinks in layer START."""
    inputs = model.prepare(IMAGES[:1], PROMPT)
    hidden = hf_states(hf_model(path), inputs).hidden_states[START]
    image = inputs["input_ids"] == model.image_token_id
    tau = float(rms_scores(hidden)[image].quantile(0.75))
    dims = tuple(range(hidden.shape[-1]))
    return dict(method="var", var_dims=dims, var_tau=tau, var_start_layer=START)


@pytest.fixture(scope="module", params=["llava-llama", "llava-qwen2", "llava-next"])
def loaded(request, tiny_model):
    path = tiny_model(request.param)
    return path, load_model(str(path), dtype="fp32", device="cpu")


@pytest.mark.dtype
def test_identity_1_p_one_is_hf_greedy(loaded):
    path, model = loaded
    for images in (IMAGES[:1], IMAGES):  # batch 1, and a padded batch (anyres: different lengths)
        tokens, steering = run(model, images, method="var", var_p=1.0)
        assert tokens == hf_greedy(path, model.prepare(images, PROMPT), MAX_NEW)
        assert tokens == run(model, images, method="greedy")[0]
        assert SINK_FIELD not in steering.cache.fields  # off: no field, the fused path everywhere


def test_identity_1_a_model_without_sink_dimensions_decodes_as_greedy(loaded, caplog):
    path, model = loaded
    with caplog.at_level("WARNING", logger="vacap"):
        tokens, steering = run(model, IMAGES, method="var")  # tau 20: unreachable at hidden size 64
        assert tokens == run(model, IMAGES, method="var")[0] == run(model, IMAGES, method="greedy")[0]
    assert SINK_FIELD not in steering.cache.fields
    said = [r.getMessage() for r in caplog.records if "no sink dimension" in r.getMessage()]
    assert len(said) == 1 and "changes nothing" in said[0]  # once per loaded model, not per batch


def literal_redistribution(a, sink, image, p, rho, floor):
    """Equations 3-5 of docs/VAR.md for one attention row a # (S,), by plain loops."""
    S = len(a)
    m = sum(float(a[j]) for j in range(S) if image[j])
    n = sum(float(a[j]) for j in range(S) if image[j] and not sink[j])
    s = sum(float(a[j]) for j in range(S) if sink[j])
    visual_sink = any(image[j] and sink[j] for j in range(S))
    if not (visual_sink and m >= floor and n >= rho * m):
        return a.clone(), False
    out = a.clone()
    for j in range(S):
        if sink[j]:
            out[j] = p * a[j]
        elif image[j]:
            out[j] = a[j] + (1 - p) * s * a[j] / n
    return out, True


def test_identity_3_redistribution_is_the_literal_rule_and_keeps_rows_summing_to_one():
    g = torch.Generator().manual_seed(0)
    B, H, c, S = 3, 4, 5, 12
    probs = torch.softmax(torch.randn(B, H, c, S, generator=g) * 2, -1)
    image = torch.zeros(B, S, dtype=torch.bool)
    image[:, 2:9] = True
    sink = torch.rand(B, S, generator=g) < 0.3
    sink[:, 0] = True  # a text sink (BOS) in every row
    sink[2, 2:9] = False  # row 2: no visual sink, so VAR leaves it alone
    eligible = torch.rand(B, c, generator=g) < 0.8
    p, rho, floor = 0.6, 0.5, 0.2
    out = redistribute(probs, sink, image, eligible, p, rho, floor)
    changed = 0
    for b in range(B):
        for h in range(H):
            for i in range(c):
                row = probs[b, h, i]
                expected, chosen = literal_redistribution(row, sink[b], image[b], p, rho, floor)
                if not eligible[b, i]:
                    expected, chosen = row, False
                torch.testing.assert_close(out[b, h, i], expected, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(out[b, h, i].sum(), torch.tensor(1.0))
                changed += chosen
    assert changed > 0 and torch.equal(out[2], probs[2])


def hf_var_logits(path, model, inputs, settings, prompt: int) -> torch.Tensor:
    """The last position's next-token logits # (V,) of one image with VAR, recomputed from
    Hugging Face's modules: each decoder layer is HF's own, except in layers VAR acts in, whose
    attention is written out (HF's projections and rotary, softmax, ``literal_redistribution``
    per row). The first ``prompt`` tokens are the prompt: only they may be sinks; the rest are
    generated tokens fed back (a decode step's query sees the prompt as the prefill left it)."""
    hf = hf_model(path)
    config = DecodeConfig(**settings)
    lm = hf.model.language_model
    L = len(lm.layers)
    with torch.no_grad():
        hidden = hf_states(hf, inputs).hidden_states[0]
        T = hidden.shape[1]
        pos = positions(inputs)
        image = (inputs["input_ids"] == model.image_token_id)[0]
        last_image = int(image.nonzero().max())
        causal = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)
        rotary = lm.rotary_emb(hidden, pos)
        dims = torch.zeros(hidden.shape[-1], dtype=torch.bool)
        dims[list(config.var_dims)] = True
        chosen_rows = visual_sinks = 0
        for index, layer in enumerate(lm.layers):
            if not config.var_start_layer <= index < L - 1:
                hidden = layer(hidden, attention_mask=causal[None, None], position_embeddings=rotary, position_ids=pos)
                continue
            x = hidden.float()
            sink = ((x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()).abs() * dims).amax(-1)[0] > config.var_tau
            sink[prompt:] = False
            visual_sinks += int((sink & image).sum())
            q, k, v = hf_layer_qkv(hf, hidden, pos, index)
            k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
            probs = torch.softmax((q @ k.transpose(2, 3)) * layer.self_attn.scaling + causal, -1)[0]  # (H, T, T)
            for h in range(probs.shape[0]):
                for i in range(last_image + 1, T):  # the prefill's queries after the image
                    probs[h, i], chosen = literal_redistribution(
                        probs[h, i], sink, image, config.var_p, config.var_rho, config.var_image_floor
                    )
                    chosen_rows += chosen
            out = (probs[None] @ v).transpose(1, 2).reshape(1, T, -1)
            hidden = hidden + layer.self_attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        assert visual_sinks > 0 and chosen_rows > 0, "the test needs VAR to act"
        return hf.lm_head(lm.norm(hidden[0, -1]))


@pytest.mark.dtype
@pytest.mark.parametrize("arch", ["llava-llama", "llava-qwen2"])
def test_identity_2_logits_match_hf_recomputation_in_prefill_and_step(tiny_model, arch):
    path = tiny_model(arch)
    model = load_model(str(path), dtype="fp32", device="cpu")
    model.eos_ids = ()  # two steps even where the first token is EOS
    settings = sinks_exist(path, model)
    inputs = model.prepare(IMAGES[:1], PROMPT)
    steering = steering_for(model, DecodeConfig(max_new_tokens=2, **settings))
    seen = []
    head = steering.head
    steering.head = lambda *args: seen.append(head(*args)) or seen[-1]
    tokens = generate(model, inputs, steering, 2)[0].tokens
    T = inputs["input_ids"].shape[1]
    expected = hf_var_logits(path, model, inputs, settings, T)
    torch.testing.assert_close(seen[0][0], expected, rtol=1e-4, atol=1e-4)
    greedy = Steering().head(model, *_first_hidden(model, inputs))
    assert (expected - greedy[0]).abs().max() > 1e-3, "VAR should move the logits"
    # The step after: the first generated token is fed back, a query of its own, never a sink.
    stepped = extended(inputs, torch.tensor([[tokens[0]]]))
    torch.testing.assert_close(seen[1][0], hf_var_logits(path, model, stepped, settings, T), rtol=1e-4, atol=1e-4)


def _first_hidden(model, inputs):
    """Greedy's last prompt hidden state, for the comparison above: (hidden, input, position)."""
    seen = []
    steering = Steering()
    steering.head = lambda model, hidden, token_input, position: seen.append((hidden, token_input, position)) or (
        model.lm_head(model.norm(hidden))
    )
    generate(model, inputs, steering, 1)
    return seen[0]


@pytest.mark.dtype
def test_identity_4_captions_do_not_depend_on_the_batch_or_the_stream(tiny_model):
    path = tiny_model("llava-next")  # anyres: the batch is left padded
    model = load_model(str(path), dtype="fp32", device="cpu")
    settings = sinks_exist(path, model)
    batch, steering = run(model, IMAGES, **settings)
    assert batch != run(model, IMAGES, method="greedy")[0], "the settings should change some caption"
    assert batch == [run(model, [image], **settings)[0][0] for image in IMAGES]
    config = DecodeConfig(max_new_tokens=MAX_NEW, **settings)
    stream = ((i, model.prepare([image], PROMPT)) for i, image in enumerate(IMAGES))
    streamed = dict(generate_stream(model, stream, lambda: steering_for(model, config), 2, MAX_NEW))
    assert [streamed[i].tokens for i in range(len(IMAGES))] == batch
    # Padding slots are never sinks; generated tokens neither (only the prompt is looked at).
    valid = steering.cache.valid[0]
    assert not (steering.cache.fields[SINK_FIELD][:, :, 0] > 0.5)[:, ~valid].any()


def planted(path, dim: int):
    """The model with a massive value in dimension ``dim`` of its prompt's first token's embedding."""
    model = load_model(str(path), dtype="fp32", device="cpu")
    first = model.tokenizer(model.preparer.prompt_text(PROMPT))["input_ids"][0]
    with torch.no_grad():
        model.embed_tokens.weight[first, dim] = 1000.0
    return model


def test_identity_5_sink_dimensions_are_where_the_first_token_is_massive(tiny_model):
    path = tiny_model("llava-llama")
    # Hidden size 64: |x_d| / rms(x) is at most 8, so the tiny test uses tau 5 (docs/VAR.md, section 2).
    tau, layers = 5.0, range(START, 3)
    clean = load_model(str(path), dtype="fp32", device="cpu")
    assert model_sink_dims(clean, tau, layers) is None  # a random model has no massive activations
    model = planted(path, 17)
    dims = model_sink_dims(model, tau, layers)
    assert dims.nonzero().flatten().tolist() == [17]
    # Independently: HF's hidden states of the first token alone.
    hf = hf_model(path)
    with torch.no_grad():
        hf.model.language_model.embed_tokens.weight.copy_(model.embed_tokens.weight)
        first = model.tokenizer(model.preparer.prompt_text(PROMPT))["input_ids"][0]
        states = hf.model.language_model(input_ids=torch.tensor([[first]]), output_hidden_states=True).hidden_states
    assert torch.equal(massive_dims(torch.stack([states[layer][0, 0] for layer in layers]), tau), dims)
    # In a prompt the first token is a sink in every layer VAR acts in, and nothing else is.
    tokens, steering = run(model, IMAGES[:2], method="var", var_tau=tau, var_start_layer=START)
    sink = steering.cache.fields[SINK_FIELD][:, :, 0] > 0.5  # (L, B, T)
    first_slots = steering.cache.valid[0].int().argmax(-1)  # each row's first real slot
    for layer in layers:
        assert sink[layer].nonzero()[:, 1].tolist() == first_slots.tolist()
    assert not sink[0].any() and not sink[3].any()
    assert float(sink_scores(states[START][0, 0], dims)) > tau


def test_identity_6_no_extra_host_sync_per_step(tiny_model):
    model = planted(tiny_model("llava-llama"), 5)  # so that the model has a sink dimension of its own
    model.eos_ids = ()  # every row runs to max_new
    settings = dict(method="var", var_tau=2.5, var_dims=tuple(range(64)), var_start_layer=START)
    inputs = model.prepare(IMAGES[:2], PROMPT)
    for found in (dict(), dict(var_dims=(), var_tau=5.0)):  # given dimensions, and the model's own
        chosen = {**settings, **found}
        syncs(model, inputs, chosen, 1)  # the model's own are found (and counted) once per model
        short, long = syncs(model, inputs, chosen, 2), syncs(model, inputs, chosen, 6)
        assert len(long) - len(short) == 4, long[len(short) :]
        short, long = stream_syncs(model, IMAGES[:2], chosen, 2), stream_syncs(model, IMAGES[:2], chosen, 6)
        plain = [stream_syncs(model, IMAGES[:2], dict(method="greedy"), n) for n in (2, 6)]
        assert len(long) - len(short) == len(plain[1]) - len(plain[0])


def test_config_validates_var_knobs_and_keeps_them_to_var():
    for bad, message in (
        (dict(var_p=1.5), "var_p must be in [0, 1]"),
        (dict(var_rho=-0.1), "var_rho must be in [0, 1]"),
        (dict(var_tau=0.0), "var_tau must be a finite number > 0"),
        (dict(var_start_layer=0), "var_start_layer must be >= 1"),
        (dict(var_dims=(3, 3)), "var_dims must not repeat"),
        (dict(var_dims=(-1,)), "var_dims must be a tuple"),
    ):
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            DecodeConfig(method="var", **bad)
    with pytest.raises(ValueError, match="var_start_layer must be at most 2"):
        DecodeConfig(method="var", var_start_layer=3).check_layers(4)
    DecodeConfig(method="var", var_start_layer=3, var_p=1.0).check_layers(4)  # off: no layer needed
    greedy = DecodeConfig(method="greedy")
    assert greedy.resolved().var_p == 1.0 and not any(k.startswith("var_") for k in greedy.as_params())
    params = DecodeConfig(method="var").as_params()
    assert params["var_p"] == 0.6 and params["var_dims"] == () and params["sparsity"] == 0.0
    assert set(greedy.unused(["var_p", "var_tau"])) == {"var_p", "var_tau"}
    assert set(DecodeConfig(method="var", var_p=1.0).unused(["var_p", "var_tau"])) == {"var_tau"}
    assert DecodeConfig(method="var").unused(["var_p", "var_tau", "var_dims"]) == {}


def vacap_cli(*args):
    env = {**os.environ, "COLUMNS": "250"}
    command = [sys.executable, "-m", "vacap.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("diagnostics", ["none", "tokens"])
def test_caption_method_var_on_the_demo_model(tmp_path, diagnostics):
    scene = os.path.join(os.path.dirname(__file__), "..", "sample_images", "scene_1.png")
    out = vacap_cli(
        "caption", scene, "--model", "demo", "--dtype", "fp32", "--method", "var", "--max-new-tokens", "6",
        "--diagnostics", diagnostics, "--output", tmp_path / "out.jsonl",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (record,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text("utf-8").splitlines()]
    assert record["status"] == "ok" and record["method"] == "var" and record["tokens"] > 0
    params = record["params"]
    assert (params["var_p"], params["var_rho"], params["var_tau"], params["var_start_layer"]) == (0.6, 0.5, 20.0, 2)
    if diagnostics == "tokens":
        assert len(record["token_diagnostics"]) == record["tokens"]

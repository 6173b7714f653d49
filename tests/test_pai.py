"""PAI (docs/PAI.md) inside the decode loop: its identities, each against an independent recomputation.

The expected values come from Hugging Face's own modules (projections, rotary, norms, MLPs, LM
head, and HF's whole forward for the image-free prompt), never from vacap's decode loop.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import IMAGES, PROMPT, SAMPLES, hf_greedy, hf_layer_qkv, hf_model, positions
from test_syncs import stream_syncs, syncs
from transformers.models.llama.modeling_llama import repeat_kv

from vacap.config import DecodeConfig
from vacap.decode import generate, generate_stream
from vacap.diagnostics import Diagnostics
from vacap.methods import steering_for
from vacap.model import load_model
from vacap.pai import PayAttentionToImage

MAX_NEW = 4
OFF = dict(method="pai", pai_alpha=0.0, alpha=0.0)
# The defaults, and each mechanism alone: amplification only (guidance off), guidance only.
VARIANTS = {"defaults": {}, "amplification": dict(alpha=0.0), "guidance": dict(pai_alpha=0.0)}


def run(model, images, max_new=MAX_NEW, steps="dynamic", **settings):
    config = DecodeConfig(max_new_tokens=max_new, **{"method": "pai", **settings})
    steering = steering_for(model, config)
    seen = []
    next_token = steering.next_token

    def spy(logits, token_input, position, choose):
        seen.append(logits.clone())
        return next_token(logits, token_input, position, choose)

    steering.next_token = spy
    outputs = generate(model, model.prepare(images, PROMPT), steering, max_new, steps=steps)
    return [g.tokens for g in outputs], seen


@pytest.fixture(scope="module", params=["llava-llama", "llava-qwen2", "llava-next"])
def loaded(request, tiny_model):
    path = tiny_model(request.param)
    return path, load_model(str(path), dtype="fp32", device="cpu"), hf_model(path)


@torch.no_grad()
def amplified_logits(hf, inputs, alpha: float, start: int, first: int) -> torch.Tensor:
    """HF's decoder layers written out with PAI's intervention: in layers ``start`` on, every
    query from position ``first`` on (each was the last query of its forward in a decode: the
    prompt's last token, then each generated one) gives its image keys A + alpha * |A| before
    the softmax. -> next-token logits of every position # (B, T, V)."""
    lm = hf.model.language_model
    h = hf(**inputs, output_hidden_states=True).hidden_states[0]
    pos = positions(inputs)
    B, T, _ = h.shape
    image = inputs["input_ids"] == hf.config.image_token_id  # (B, T)
    seen = torch.ones(T, T, dtype=torch.bool).tril()[None] & inputs["attention_mask"].bool()[:, None]  # (B, T, T)
    for index, layer in enumerate(lm.layers):
        attn = layer.self_attn
        q, k, v = hf_layer_qkv(hf, h, pos, index)
        k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
        s = (q @ k.transpose(2, 3)).float() * attn.scaling  # (B, H, T, T)
        if index >= start:
            boost = torch.zeros(B, 1, T, T, dtype=torch.bool)
            boost[:, :, first:] = image[:, None, None]
            s = torch.where(boost, s + alpha * s.abs(), s)
        s = torch.where(seen[:, None], s, torch.finfo(s.dtype).min)
        out = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return hf.lm_head(lm.norm(h)).float()


def image_free_ids(model, inputs) -> torch.Tensor:
    """A one-row prompt's tokens without its image tokens # (1, T')."""
    ids = inputs["input_ids"][0]
    return ids[ids != model.image_token_id][None]


def guided_choice(z: torch.Tensor, z_text: torch.Tensor, gamma: float, beta: float) -> int:
    """PAI's refinement as its authors write it: gamma (log p - log p_text) + log p_text, cut to
    log p >= log(beta) + max log p. z, z_text # (V,)."""
    log_p, log_q = z.double().log_softmax(-1), z_text.double().log_softmax(-1)
    out = gamma * (log_p - log_q) + log_q
    return int(torch.where(log_p >= math.log(beta) + log_p.max(), out, -math.inf).argmax())


@pytest.mark.dtype
@pytest.mark.parametrize("images", [IMAGES[:1], IMAGES], ids=["batch-1", "batch-4"])
def test_identity_1_mechanisms_off_is_hf_greedy(loaded, images):
    path, model, _ = loaded
    tokens, seen = run(model, images, **OFF)
    assert tokens == hf_greedy(path, model.prepare(images, PROMPT), MAX_NEW)
    assert {z.shape[0] for z in seen} == {len(images)}, "guidance off adds no image-free rows"
    steering = steering_for(model, DecodeConfig(**OFF))
    assert not any(steering.needs_attention(layer, prefill) for layer in range(4) for prefill in (True, False))


@pytest.mark.dtype
@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_2_tokens_match_the_recomputation_step_by_step(loaded, variant):
    """Each row of a (for llava-next, left padded) batch against HF run on that image alone."""
    _, model, hf = loaded
    config = DecodeConfig(method="pai", **VARIANTS[variant]).resolved()
    tokens, _ = run(model, IMAGES, **VARIANTS[variant])
    greedy, _ = run(model, IMAGES, **OFF)
    assert tokens != greedy, "the mechanism should change some token of these captions"
    for image, row in zip(IMAGES, tokens):
        inputs = model.prepare([image], PROMPT)
        T = inputs["input_ids"].shape[1]
        text = image_free_ids(model, inputs)
        for j, token in enumerate(row):
            new = torch.tensor([row[:j]], dtype=torch.long)
            step = {**inputs, "input_ids": torch.cat([inputs["input_ids"], new], 1)}
            step["attention_mask"] = torch.ones_like(step["input_ids"])
            z = amplified_logits(hf, step, config.pai_alpha, config.pai_start_layer, T - 1)[0, -1]
            if config.alpha == 0:
                assert token == int(z.argmax())
                continue
            with torch.no_grad():
                z_text = hf(input_ids=torch.cat([text, new], 1)).logits[0, -1].float()
            assert token == guided_choice(z, z_text, 1 + config.alpha, config.apc_beta)


@pytest.mark.dtype
def test_identity_3_first_step_logits_of_both_branches_match_hf(loaded):
    """The logits themselves, not only their argmax: the amplified model's, and the image-free
    copies' against HF's plain forward of the shorter prompt (left padded in the batch)."""
    _, model, hf = loaded
    config = DecodeConfig(method="pai").resolved()
    _, seen = run(model, IMAGES, max_new=1)
    z, z_text = seen[0][: len(IMAGES)], seen[0][len(IMAGES) :]
    for b, image in enumerate(IMAGES):
        inputs = model.prepare([image], PROMPT)
        T = inputs["input_ids"].shape[1]
        expected = amplified_logits(hf, inputs, config.pai_alpha, config.pai_start_layer, T - 1)[0, -1]
        torch.testing.assert_close(z[b], expected, atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            plain = hf(input_ids=image_free_ids(model, inputs)).logits[0, -1].float()
        torch.testing.assert_close(z_text[b], plain, atol=1e-4, rtol=1e-4)


def test_amplification_acts_from_the_start_layer_on_the_last_query_only(loaded):
    """A' = A + alpha |A| exactly at image slots of the query that predicts a token, in layers
    from pai_start_layer on; every other logit passes unchanged."""
    _, model, _ = loaded
    config = DecodeConfig(method="pai", alpha=0.0, pai_start_layer=1)
    steering = steering_for(model, config)
    raw, used = {}, {}
    original = steering.layer_logits

    def spy(layer, logits, cache, chunk):
        out = original(layer, logits, cache, chunk)
        seen.append((layer, chunk, logits.clone(), out.clone()))
        return out

    seen = []
    steering.layer_logits = spy
    inputs = model.prepare(IMAGES, PROMPT)
    generate(model, inputs, steering, 3)
    image = (inputs["input_ids"] == model.image_token_id)[:, None, None]  # (B, 1, 1, T)
    assert {layer for layer, *_ in seen} == set(range(1, len(model.layers))), "eager from the start layer on"
    assert sum(chunk.last for _, chunk, _, _ in seen) == 3 * (len(model.layers) - 1)
    for layer, chunk, s, out in seen:
        mask = torch.zeros_like(s, dtype=torch.bool)
        if chunk.last:
            mask[:, :, -1:, : image.shape[-1]] = image[..., : s.shape[-1]]
        torch.testing.assert_close(out, torch.where(mask, s + 0.5 * s.abs(), s), atol=0, rtol=0)
        assert torch.equal(out, s) != chunk.last


@pytest.mark.dtype
def test_captions_do_not_depend_on_the_batch(loaded):
    _, model, _ = loaded
    batched, _ = run(model, IMAGES, max_new=8)
    assert [run(model, [image], max_new=8)[0][0] for image in IMAGES] == batched


@pytest.mark.dtype
@pytest.mark.parametrize("variant", VARIANTS)
def test_continuous_batching_gives_each_image_what_it_gets_alone(tiny_model, variant):
    # Anyres: the prompts differ in length, so spliced rows (and their copies) are re-aligned.
    model = load_model(str(tiny_model("llava-next")), dtype="fp32", device="cpu")
    config = DecodeConfig(method="pai", max_new_tokens=8, **VARIANTS[variant])
    expected = [run(model, [image], max_new=8, **VARIANTS[variant])[0][0] for image in IMAGES]
    prepared = ((i, model.prepare([image], PROMPT)) for i, image in enumerate(IMAGES))
    out = dict(generate_stream(model, prepared, lambda: steering_for(model, config), 2, 8))
    assert [out[i].tokens for i in range(len(IMAGES))] == expected


@pytest.mark.dtype
def test_guidance_alone_runs_static_steps_with_the_same_tokens(tiny_model):
    """Without amplification no per-layer hook acts, so --compile's static step may run PAI's
    guidance; amplification keeps the dynamic step."""
    model = load_model(str(tiny_model("llava-next")), dtype="fp32", device="cpu")
    assert steering_for(model, DecodeConfig(method="pai", pai_alpha=0.0)).prefill_only_hooks
    assert not steering_for(model, DecodeConfig(method="pai")).prefill_only_hooks
    dynamic, _ = run(model, IMAGES, max_new=6, pai_alpha=0.0)
    static, _ = run(model, IMAGES, max_new=6, steps="static", pai_alpha=0.0)
    assert static == dynamic


@pytest.fixture(scope="module")
def runs_long(tiny_model):
    model = load_model(str(tiny_model("llava-llama")), dtype="fp32", device="cpu")
    model.eos_ids = ()  # every row runs to max_new, so each call makes the same number of steps
    return model


# With risk signals too: the risk branch is vacap's own and must cost PAI no sync per step either.
SYNC_SETTINGS = {**{name: dict(method="pai", **v) for name, v in VARIANTS.items()}, "risk": dict(method="pai", risk=True)}


@pytest.mark.parametrize("name", SYNC_SETTINGS)
def test_each_decode_step_syncs_once(runs_long, name):
    settings = SYNC_SETTINGS[name]
    inputs = runs_long.prepare(IMAGES[:2], PROMPT)
    short, long = syncs(runs_long, inputs, settings, 2), syncs(runs_long, inputs, settings, 6)
    assert len(long) - len(short) == 4, long[len(short) :]
    short, long = stream_syncs(runs_long, IMAGES[:2], settings, 2), stream_syncs(runs_long, IMAGES[:2], settings, 6)
    assert len(long) - len(short) == 4, long[len(short) :]


def test_diagnostics_wrap_pai_and_change_no_token(runs_long):
    config = DecodeConfig(method="pai", max_new_tokens=3, diagnostics="summary")
    inner = steering_for(runs_long, config)
    assert isinstance(inner, PayAttentionToImage)
    wrapped = Diagnostics(inner, runs_long, config.start_layer)
    inputs = runs_long.prepare(IMAGES[:2], PROMPT)
    out = generate(runs_long, inputs, wrapped, 3)
    assert [g.tokens for g in out] == [g.tokens for g in generate(runs_long, inputs, steering_for(runs_long, config), 3)]
    assert len(wrapped.steps) == 3 and all(step["image"].shape == (2,) for step in wrapped.steps)


def test_settings_resolve_validate_and_stay_out_of_other_methods_records():
    pai = DecodeConfig(method="pai").resolved()
    assert (pai.alpha, pai.apc_beta, pai.pai_alpha, pai.pai_start_layer) == (0.1, 0.1, 0.5, 2)
    assert (pai.sparsity, pai.sink_beta, pai.contrast_layers, pai.kv_budget) == (0.0, 0.0, 0, 1.0)
    assert {"pai_alpha": 0.5, "pai_start_layer": 2, "alpha": 0.1}.items() <= DecodeConfig(method="pai").as_params().items()
    for method in ("greedy", "vasparse", "vcd", "fastv"):
        config = DecodeConfig(method=method)
        assert config.resolved().pai_alpha == 0.0
        assert not {"pai_alpha", "pai_start_layer"} & set(config.as_params())
        assert set(config.unused(["pai_alpha", "pai_start_layer"])) == {"pai_alpha", "pai_start_layer"}
    assert DecodeConfig(method="pai").unused(["pai_alpha", "pai_start_layer", "alpha", "apc_beta"]) == {}
    assert set(DecodeConfig(method="pai", pai_alpha=0.0).unused(["pai_start_layer"])) == {"pai_start_layer"}
    assert set(DecodeConfig(method="pai", alpha=0.0).unused(["apc_beta"])) == {"apc_beta"}
    for bad, message in [(dict(pai_alpha=-0.1), "pai_alpha must be"), (dict(pai_alpha=math.nan), "pai_alpha must be"),
                         (dict(pai_start_layer=-1), "pai_start_layer must be >= 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            DecodeConfig(method="pai", **bad)
    with pytest.raises(ValueError, match="pai_start_layer must be below the model's 4 decoder layers"):
        DecodeConfig(method="pai", pai_start_layer=4).check_layers(4)
    DecodeConfig(method="pai", pai_start_layer=4, pai_alpha=0.0).check_layers(4)


def vacap(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "vacap.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def test_caption_cli_runs_pai_with_diagnostics_and_records_its_settings(tmp_path):
    records = tmp_path / "records.jsonl"
    scene = SAMPLES / "scene_2.png"
    out = vacap("caption", scene, "--model", "demo", "--dtype", "fp32", "--method", "pai",
                "--max-new-tokens", "6", "--diagnostics", "tokens", "-o", records)  # fmt: skip
    assert out.returncode == 0, out.stderr
    record = json.loads(records.read_text())
    assert record["status"] == "ok" and record["method"] == "pai"
    params = record["params"]
    assert (params["alpha"], params["apc_beta"], params["pai_alpha"], params["pai_start_layer"]) == (0.1, 0.1, 0.5, 2)
    assert len(record["token_diagnostics"]) == record["tokens"]
    # The attention-only variant through the existing --alpha flag: no image-free pass.
    alone = tmp_path / "alone.jsonl"
    out = vacap("caption", scene, "--model", "demo", "--dtype", "fp32", "--method", "pai", "--alpha", "0",
                "--max-new-tokens", "6", "-o", alone)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(alone.read_text())["params"]["alpha"] == 0.0
    refused = vacap("caption", scene, "--model", "demo", "--method", "pai", "--sparsity", "0.3", "-o", alone)
    assert refused.returncode == 2 and "--sparsity" in refused.stderr

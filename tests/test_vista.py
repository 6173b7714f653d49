"""VISTA (docs/VISTA.md) inside the decode loop, against independent recomputations.

The expected values come from Hugging Face's own modules (its decoder layers with forward hooks,
its LM head and final norm), never from vacap's decode loop. Numbers refer to the identities of
docs/VISTA.md section 5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGES, PROMPT, SAMPLES, hf_greedy, hf_model, positions
from test_syncs import stream_syncs, syncs

from vacap import Captioner
from vacap.config import DecodeConfig
from vacap.decode import generate, generate_stream
from vacap.methods import steering_for
from vacap.model import load_model
from vacap.vista import window

MAX_NEW = 8
OFF = dict(method="vista", vista_lambda=0.0, vista_gamma=0.0)
# A window of three of the tiny models' four layers, besides the default's one (layer 3).
WIDE = dict(vista_window_start=0.25, vista_window_end=0.75)


def run(model, images, max_new=MAX_NEW, **settings):
    config = DecodeConfig(max_new_tokens=max_new, **settings)
    outputs = generate(model, model.prepare(images, PROMPT), steering_for(model, config), max_new)
    return [g.tokens for g in outputs]


def first_logits(model, inputs, **settings) -> torch.Tensor:
    """The logits the method chose its first token from # (B, V): its first ``head``."""
    steering = steering_for(model, DecodeConfig(max_new_tokens=1, **settings))
    head, seen = steering.head, []

    def spy(*args):
        seen.append(head(*args).float())
        return seen[-1]

    steering.head = spy
    generate(model, inputs, steering, 1)
    return seen[0]


@pytest.fixture(scope="module", params=["llava-llama", "llava-qwen2", "llava-next"])
def loaded(request, tiny_model):
    path = tiny_model(request.param)
    return path, load_model(str(path), dtype="fp32", device="cpu"), hf_model(path, attention="sdpa")


def hf_layer_outputs(hf, call) -> list[torch.Tensor]:
    """Every decoder layer's output # (B, T, hidden) in Hugging Face's forward ``call()``."""
    outputs, handles = [], []
    for block in hf.model.language_model.layers:
        handles.append(block.register_forward_hook(lambda _m, _i, out: outputs.append(out)))
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@torch.no_grad()
def hf_vector(hf, inputs) -> torch.Tensor:
    """Eq. 1 from Hugging Face: the last token's output of every layer with the image minus the
    same for the prompt's token ids without the image tokens, re-left-padded # (B, L, hidden)."""
    positive = hf_layer_outputs(hf, lambda: hf(**inputs, position_ids=positions(inputs)))
    image_token = hf.config.image_token_id
    rows = [ids[(mask > 0) & (ids != image_token)] for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    width = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (width - len(r), 0)) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows])
    text = {"input_ids": ids, "attention_mask": mask}
    negative = hf_layer_outputs(hf, lambda: hf.model.language_model(**text, position_ids=positions(text)))
    return torch.stack([p[:, -1] - n[:, -1] for p, n in zip(positive, negative)], 1).float()


def expected_steer(m: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 2 written out per token: m # (t, hidden), v # (hidden,). A zero output (some padding
    slots) stays zero."""
    out = []
    for token in m.double():
        if not token.any():
            out.append(token)
            continue
        similarity = float(token @ -v.double() / (token.norm() * v.double().norm()))
        turned = token / token.norm() + lam * (1 + max(0.0, similarity)) * v.double() / v.double().norm()
        out.append(turned / turned.norm() * token.norm())
    return torch.stack(out).to(m.dtype)


@torch.no_grad()
def hf_first_logits(hf, inputs, lam: float, gamma: float, layers: range) -> torch.Tensor:
    """The first token's logits under VISTA # (B, V), from Hugging Face's forward with every
    MLP's output steered by eq. 2 (hooks) and SLA (eq. 3) on its layers' outputs."""
    vector = hf_vector(hf, inputs)
    handles = []
    if lam:
        for index, block in enumerate(hf.model.language_model.layers):

            def hook(_module, _input, m, index=index):
                return torch.stack([expected_steer(row, vector[b, index], lam) for b, row in enumerate(m)])

            handles.append(block.mlp.register_forward_hook(hook))
    try:
        out = {}
        outputs = hf_layer_outputs(hf, lambda: out.update(logits=hf(**inputs, position_ids=positions(inputs)).logits))
    finally:
        for handle in handles:
            handle.remove()
    z = out["logits"][:, -1].float()
    norm, head = hf.model.language_model.norm, hf.lm_head
    z_window = torch.stack([head(norm(outputs[index][:, -1])).float() for index in layers]).mean(0)
    return (1 - gamma) * z + gamma * z_window


def test_window_rule():
    """Section 3's rule: layers 25-30 of 32 (indices 24-29), at least one layer, never the last
    unless it is the only one."""
    assert window(32, 0.78125, 0.9375) == range(24, 30)
    assert window(40, 0.78125, 0.9375) == range(31, 37)
    assert window(28, 0.78125, 0.9375) == range(21, 26)
    assert window(4, 0.78125, 0.9375) == range(2, 3)
    assert window(4, 0.25, 0.75) == range(0, 3)
    assert window(4, 1.0, 1.0) == range(2, 3)
    assert window(1, 0.78125, 0.9375) == range(0, 1)


def test_settings_are_checked_and_resolved():
    with pytest.raises(ValueError, match="vista_gamma must be in"):
        DecodeConfig(method="vista", vista_gamma=1.5)
    with pytest.raises(ValueError, match="vista_lambda must be a finite number >= 0"):
        DecodeConfig(method="vista", vista_lambda=-0.1)
    with pytest.raises(ValueError, match="vista_window_start must be at most vista_window_end"):
        DecodeConfig(method="vista", vista_window_start=0.9, vista_window_end=0.8)
    with pytest.raises(ValueError, match="vista_window_start must be in"):
        DecodeConfig(method="vista", vista_window_start=0.0)
    vista = DecodeConfig(method="vista").resolved()
    assert (vista.vista_lambda, vista.vista_gamma) == (0.17, 0.3)
    for method in ("greedy", "vasparse", "vcd", "fastv"):
        other = DecodeConfig(method=method).resolved()
        assert (other.vista_lambda, other.vista_gamma) == (0.0, 0.0)
        unused = DecodeConfig(method=method).unused(["vista_lambda", "vista_gamma"])
        assert set(unused) == {"vista_lambda", "vista_gamma"}
    assert DecodeConfig(method="vista", vista_gamma=0.0).unused(["vista_window_start", "vista_lambda"]) == {
        "vista_window_start": "--method vista with a --vista-gamma above 0"
    }


@pytest.mark.dtype
def test_identity_1_both_off_is_hf_greedy(loaded):
    path, model, _ = loaded
    tokens = run(model, IMAGES, **OFF)
    assert tokens == hf_greedy(path, model.prepare(IMAGES, PROMPT), max_new=MAX_NEW)
    assert run(model, IMAGES, method="greedy") == tokens
    assert run(model, IMAGES[1:2], **OFF) == tokens[1:2]


def test_identity_2_vector_is_hf_difference(loaded):
    """The vector of every row (a padded batch on llava-next) is Hugging Face's eq. 1."""
    from vacap.vista import visual_vector

    _, model, hf = loaded
    inputs = model.prepare(IMAGES, PROMPT)
    valid = inputs["attention_mask"].bool()
    vector = visual_vector(model, *model.embed(inputs), valid, model.positions(inputs, valid)[0])
    expected = hf_vector(hf, inputs)
    assert vector.shape == expected.shape
    torch.testing.assert_close(vector, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "settings",
    [
        dict(vista_gamma=0.0),
        dict(vista_lambda=0.0),
        dict(vista_lambda=0.0, **WIDE),
        dict(),
        dict(vista_lambda=0.5, **WIDE),
    ],
    ids=["vsv", "sla", "sla-wide", "both", "both-strong-wide"],
)
def test_identity_3_first_logits_are_hf_recomputed(loaded, settings):
    """Each mechanism alone and both: the first token's logits equal Hugging Face's forward with
    eq. 2 hooked onto every MLP and eq. 3 computed from its layers' outputs."""
    _, model, hf = loaded
    inputs = model.prepare(IMAGES, PROMPT)
    config = DecodeConfig(method="vista", **settings)
    got = first_logits(model, inputs, method="vista", **settings)
    layers = window(len(model.layers), config.vista_window_start, config.vista_window_end)
    expected = hf_first_logits(hf, inputs, config.vista_lambda, config.vista_gamma, layers)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(got, first_logits(model, inputs, method="greedy"), atol=1e-3)


def test_identity_4_batch_and_stream_independent(loaded):
    """fp32: a caption does not depend on its batch, nor on continuous batching's row juggling."""
    _, model, _ = loaded
    batch = run(model, IMAGES, method="vista")
    assert batch != run(model, IMAGES, method="greedy"), "the default VISTA settings should change some caption"
    assert [run(model, [image], method="vista")[0] for image in IMAGES] == batch
    config = DecodeConfig(max_new_tokens=MAX_NEW, method="vista")
    prepared = ((i, model.prepare([image], PROMPT)) for i, image in enumerate(IMAGES))
    stream = generate_stream(model, prepared, lambda: steering_for(model, config), 2, MAX_NEW)
    assert [g.tokens for _, g in sorted(stream, key=lambda kv: kv[0])] == batch


@pytest.fixture(scope="module")
def endless(tiny_model):
    loaded = load_model(str(tiny_model("llava-llama")), dtype="fp32", device="cpu")
    loaded.eos_ids = ()  # every row runs to max_new, so each call makes the same number of steps
    return loaded


@pytest.mark.parametrize("risk", [False, True])
def test_identity_5_no_sync_per_step(endless, risk):
    """VISTA's steps read nothing back: the step's one read is the loop's stop check."""
    settings = dict(method="vista", risk=risk)
    inputs = endless.prepare(IMAGES[:2], PROMPT)
    short, long = syncs(endless, inputs, settings, 2), syncs(endless, inputs, settings, 6)
    assert len(long) - len(short) == 4, long[len(short) :]
    short, long = stream_syncs(endless, IMAGES[:2], settings, 2), stream_syncs(endless, IMAGES[:2], settings, 6)
    assert len(long) - len(short) == 4, long[len(short) :]


def vacap(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "vacap.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def test_identity_6_caption_cli_records_vista(tmp_path):
    """`vacap caption --method vista --diagnostics tokens` on the demo model: records state the
    settings used and the per-token diagnostics; the captions are those decoded without
    diagnostics (continuous batching, in process)."""
    images = [SAMPLES / "house.jpg", SAMPLES / "shapes_square.png"]
    records = tmp_path / "vista.jsonl"
    out = vacap("caption", *images, "--model", "demo", "--method", "vista", "--max-new-tokens", "6",
                "--diagnostics", "tokens", "-o", records)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    params = rows[0]["params"]
    assert params["method"] == "vista"
    assert (params["vista_lambda"], params["vista_gamma"]) == (0.17, 0.3)
    assert (params["vista_window_start"], params["vista_window_end"]) == (0.78125, 0.9375)
    for row in rows:
        assert "".join(e["token"] for e in row["token_diagnostics"]) == row["caption"]
    plain = Captioner("demo", method="vista", max_new_tokens=6).caption(images)
    assert [r["caption"] for r in plain] == [r["caption"] for r in rows]

"""Per-token risk signals (vacap/risk_signals.py) in the decode loop.

They never change a caption; entropy, -log p and -margin equal what Hugging Face's own
``generate`` scores give; the branch's log-ratio equals the contract's branch (docs/VASPARSE.md
section 3, identity 9) recomputed with Hugging Face's decoder layers; and neither the batch,
continuous batching nor a method's shared branch changes a signal beyond float rounding.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from helpers import IMAGES, PROMPT, extended, hf_model, hf_states, positions

from vacap.captioner import Captioner
from vacap.config import DecodeConfig
from vacap.decode import RISK_FIELD, generate, generate_stream
from vacap.diagnostics import Diagnostics
from vacap.methods import VASparse, steering_for
from vacap.model import load_model
from vacap.risk_signals import NAMES, RiskSettings, step_signals, token_log_prob
from vacap.sampling import Sampling
from vacap.vasparse import draw_hidden

MAX_NEW = 12
SAMPLED = dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram=2)
SETTINGS = {
    "greedy": dict(method="greedy"),
    "vasparse": dict(),
    "vasparse-contrast-layers-2": dict(contrast_layers=2),
    "vasparse-contrast-layers-4": dict(contrast_layers=4),  # its branch is risk's: shared
    "vasparse-kv-budget": dict(kv_budget=0.5),
    "vcd": dict(method="vcd"),
    "fastv": dict(method="fastv"),
    "greedy-sampled": dict(method="greedy", **SAMPLED),
    "vasparse-sampled": dict(contrast_layers=4, **SAMPLED),
}


def identity(image) -> str:
    """What keys an image's sampling draws, as an image's sha256 does in a real run."""
    return hashlib.sha256(image.tobytes()).hexdigest()


def run(model, images, settings: dict, risk: bool = True, max_new: int = MAX_NEW, **kwargs):
    config = DecodeConfig(max_new_tokens=max_new, risk=risk, **settings)
    inputs = model.prepare(images, PROMPT)
    steering = steering_for(model, config)
    return generate(
        model, inputs, steering, max_new, sampling=Sampling.of(config), identities=[identity(i) for i in images],
        risk=RiskSettings.of(config), **kwargs,
    )  # fmt: skip


def stream(model, images, settings: dict, rows: int, risk: bool = True):
    config = DecodeConfig(max_new_tokens=MAX_NEW, risk=risk, **settings)
    prepared = ((i, model.prepare([image], PROMPT)) for i, image in enumerate(images))
    out = generate_stream(
        model, prepared, lambda: steering_for(model, config), rows, MAX_NEW, Sampling.of(config),
        identity=lambda i: identity(images[i]), risk=RiskSettings.of(config),
    )  # fmt: skip
    return dict(out)


def signal_tensor(generated) -> torch.Tensor:
    """# (n tokens, 4) in the order of NAMES."""
    return torch.tensor([generated.signals[name] for name in NAMES]).T


@pytest.fixture(scope="module")
def llama(tiny_model):
    path = tiny_model("llava-llama")
    return path, load_model(str(path), dtype="fp32", device="cpu")


# llava-next: anyres, so a batch of differently shaped images is left padded.
@pytest.fixture(scope="module", params=["llava-llama", "llava-next"])
def loaded(request, tiny_model):
    path = tiny_model(request.param)
    return path, load_model(str(path), dtype="fp32", device="cpu")


def test_step_signals_hand_worked():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(5.0), -math.inf]])  # p = 1/8, 2/8, 5/8, 0
    p = torch.tensor([1, 2, 5]) / 8
    out = step_signals(logits, torch.tensor([1]))
    expected = [-(p * p.log()).sum().item(), -math.log(2 / 8), -(math.log(5 / 8) - math.log(2 / 8))]
    torch.testing.assert_close(out, torch.tensor([expected]))
    torch.testing.assert_close(token_log_prob(logits, torch.tensor([2])), torch.tensor([math.log(5 / 8)]))


@pytest.mark.dtype
@pytest.mark.parametrize("name", SETTINGS)
def test_risk_changes_no_caption(llama, name):
    _, model = llama
    images = IMAGES[:3]
    plain = [g.tokens for g in run(model, images, SETTINGS[name], risk=False)]
    with_risk = run(model, images, SETTINGS[name])
    assert [g.tokens for g in with_risk] == plain
    assert [g.signals is None for g in run(model, images, SETTINGS[name], risk=False)] == [True] * 3
    for g in with_risk:
        assert sorted(g.signals) == sorted(NAMES)
        assert all(len(values) == len(g.tokens) for values in g.signals.values())
        assert all(math.isfinite(v) for values in g.signals.values() for v in values)
    streamed, streamed_plain = (stream(model, images, SETTINGS[name], rows=2, risk=r) for r in (True, False))
    assert [streamed[i].tokens for i in range(3)] == [streamed_plain[i].tokens for i in range(3)] == plain


@pytest.mark.dtype
def test_distribution_signals_equal_hf_generate_scores(loaded):
    path, model = loaded
    inputs = model.prepare(IMAGES, PROMPT)
    ours = run(model, IMAGES, dict(method="greedy"))
    hf = hf_model(path, attention="sdpa")
    with torch.no_grad():
        out = hf.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW, output_scores=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    scores = torch.stack(out.scores, 1).float()  # (B, steps, V): raw logits, greedy has no processor
    chosen = out.sequences[:, inputs["input_ids"].shape[1] :]
    for b, g in enumerate(ours):
        n = len(g.tokens)
        assert chosen[b, :n].tolist() == g.tokens
        logp = scores[b, :n].double().log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        neg_logprob = -logp.gather(1, chosen[b, :n, None]).squeeze(1)
        top = logp.topk(2, -1).values
        expected = {"entropy": entropy, "neg_logprob": neg_logprob, "neg_margin": top[:, 1] - top[:, 0]}
        for name, values in expected.items():
            torch.testing.assert_close(torch.tensor(g.signals[name], dtype=torch.float64), values, rtol=1e-6, atol=3e-6)
    assert len({round(v, 3) for g in ours for v in g.signals["neg_margin"]}) > 5, "varied values, not one repeated"


def hf_branch_log_probs(hf, inputs, fed: torch.Tensor, hidden: torch.Tensor, m: int) -> torch.Tensor:
    """log p_branch of each fed token # (B, S), recomputed with HF's decoder layers as identity 9's
    test does, one step at a time: step j's current token (the prompt's last, then fed[:, j - 1])
    runs again through the first m layers at its own position, seeing the full model's states
    of every earlier token (keys and values made by HF's layer from them) minus the hidden image
    slots, and itself; then the final norm and the LM head."""
    lm = hf.model.language_model
    T0, S = inputs["input_ids"].shape[1], fed.shape[1]
    full = extended(inputs, fed[:, :-1])  # prompt and every fed token but the last
    states = hf_states(hf, full)
    valid, pos = full["attention_mask"].bool(), positions(full)
    low = torch.finfo(torch.float32).min
    hidden = torch.cat([hidden, torch.zeros(fed.shape[0], S - 1, dtype=torch.bool)], 1)  # generated: never hidden
    out = torch.empty(fed.shape)
    with torch.no_grad():
        for j in range(S):
            t = T0 - 1 + j  # the current token's index in the sequence
            allowed = torch.ones(t + 1, t + 1, dtype=torch.bool).tril()[None] & valid[:, None, : t + 1]
            allowed[:, -1, :t] &= ~hidden[:, :t]
            mask = torch.where(allowed, 0.0, low)[:, None]
            x = hf.get_input_embeddings()(full["input_ids"][:, t : t + 1])
            if j == 0:
                x = states.hidden_states[0][:, t : t + 1]  # the prompt's last token, as embedded
            for layer in range(m):
                sequence = torch.cat([states.hidden_states[layer][:, :t], x], 1)
                rotary = lm.rotary_emb(sequence, pos[:, : t + 1])
                x = lm.layers[layer](
                    sequence, attention_mask=mask, position_embeddings=rotary, position_ids=pos[:, : t + 1]
                )[:, -1:]
            logp = hf.lm_head(lm.norm(x[:, 0])).float().log_softmax(-1)
            out[:, j] = logp.gather(1, fed[:, j : j + 1]).squeeze(1)
    return out, states.logits.float().log_softmax(-1)[:, T0 - 1 :]


@pytest.mark.dtype
def test_branch_log_ratio_equals_the_branch_recomputed_with_hf_layers(loaded):
    path, model = loaded
    hf = hf_model(path)
    inputs = model.prepare(IMAGES, PROMPT)
    ours = run(model, IMAGES, dict(method="greedy"))
    S = max(len(g.tokens) for g in ours)
    fed = torch.tensor([g.tokens + [model.pad_id] * (S - len(g.tokens)) for g in ours])  # what the loop fed

    image = inputs["input_ids"] == model.image_token_id
    hidden = draw_hidden(image, 0.5, seed=0)
    assert not (hidden & ~image).any()
    assert hidden.sum(-1).tolist() == [round(0.5 * n) for n in image.sum(-1).tolist()]
    m = min(4, len(model.layers))
    branch, full_logp = hf_branch_log_probs(hf, inputs, fed, hidden, m)
    seen_all, _ = hf_branch_log_probs(hf, inputs, fed, torch.zeros_like(hidden), m)
    full = full_logp[:, :S].gather(2, fed[:, :, None]).squeeze(2)
    for b, g in enumerate(ours):
        n = len(g.tokens)
        torch.testing.assert_close(torch.tensor(g.signals["neg_logprob"]), -full[b, :n], rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(
            torch.tensor(g.signals["branch_log_ratio"]), branch[b, :n] - full[b, :n], rtol=1e-5, atol=5e-5
        )
    # The hidden slots matter: without them the branch gives other values.
    assert (branch - seen_all).abs().max() > 1e-2


@pytest.mark.dtype
@pytest.mark.parametrize(
    "name", ["greedy", "vasparse", "vasparse-contrast-layers-4", "vasparse-kv-budget", "vcd", "fastv"]
)
def test_batch_and_continuous_batching_change_no_signal(tiny_model, name):
    model = load_model(str(tiny_model("llava-next")), dtype="fp32", device="cpu")
    images = IMAGES[:3]
    assert not model.prepare(images, PROMPT)["attention_mask"].bool().all(), "a padded batch"
    batched = run(model, images, SETTINGS[name])
    alone = [run(model, [image], SETTINGS[name])[0] for image in images]
    streamed = stream(model, images, SETTINGS[name], rows=2)
    for b, single in enumerate(alone):
        assert batched[b].tokens == single.tokens == streamed[b].tokens
        torch.testing.assert_close(signal_tensor(batched[b]), signal_tensor(single), rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(signal_tensor(streamed[b]), signal_tensor(single), rtol=1e-5, atol=5e-5)


@pytest.mark.dtype
def test_a_methods_own_branch_is_shared_only_where_it_is_risks_and_equals_the_risk_pass(llama, monkeypatch):
    _, model = llama
    shared = steering_for(model, DecodeConfig(contrast_layers=4))
    assert shared.shares_branch(4, 0.5, 0)
    assert Diagnostics(shared, model, 2).shares_branch(4, 0.5, 0)
    for settings in [dict(contrast_layers=2), dict(contrast_layers=4, mask_rate=0.3), dict(contrast_layers=4, seed=1),
                     dict(contrast_layers=4, alpha=0.0), dict(method="greedy"), dict(method="vcd")]:  # fmt: skip
        assert not steering_for(model, DecodeConfig(**settings)).shares_branch(4, 0.5, 0), settings

    images = IMAGES[:3]
    reused = run(model, images, SETTINGS["vasparse-contrast-layers-4"])
    steerings = []
    begin = VASparse.begin

    def spy(self, cache, image_mask):
        steerings.append(cache)
        begin(self, cache, image_mask)

    monkeypatch.setattr(VASparse, "begin", spy)
    monkeypatch.setattr(VASparse, "shares_branch", lambda self, layers, rate, seed: False)
    beside = run(model, images, SETTINGS["vasparse-contrast-layers-4"])
    # Run beside, the risk branch hides the slots the method's branch hides.
    cache = steerings[0]
    assert torch.equal(cache.fields[RISK_FIELD][0, :, 0] > 0.5, cache.fields["hidden"][0, :, 0] > 0.5)
    for a, b in zip(reused, beside):
        assert a.tokens == b.tokens
        torch.testing.assert_close(signal_tensor(a), signal_tensor(b), rtol=1e-5, atol=3e-5)


def test_static_steps_and_diagnostics_carry_the_signals(llama):
    _, model = llama
    images = IMAGES[:2]
    dynamic = run(model, images, dict(method="greedy"))
    static = run(model, images, dict(method="greedy"), steps="static")
    config = DecodeConfig(max_new_tokens=MAX_NEW, contrast_layers=4, risk=True)
    diagnosed = generate(
        model, model.prepare(images, PROMPT), Diagnostics(steering_for(model, config), model, 2), MAX_NEW,
        risk=RiskSettings.of(config),
    )  # fmt: skip
    plain = run(model, images, dict(contrast_layers=4))
    for a, b, c, d in zip(dynamic, static, diagnosed, plain):
        assert a.tokens == b.tokens and c.tokens == d.tokens
        torch.testing.assert_close(signal_tensor(a), signal_tensor(b), rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(signal_tensor(c), signal_tensor(d), rtol=1e-5, atol=5e-5)


def test_risk_is_in_the_records_params_only_when_on():
    plain, risky = DecodeConfig(), DecodeConfig(risk=True)
    assert "risk" not in plain.as_params()
    assert risky.as_params() == {**plain.as_params(), "risk": True}
    assert RiskSettings.of(plain) is None
    assert RiskSettings.of(DecodeConfig(risk=True, seed=7)) == RiskSettings(seed=7, layers=4, mask_rate=0.5)


@pytest.mark.parametrize("settings", [dict(batch_size=2), dict(batch_size=2, diagnostics="summary")])
def test_captioner_records_carry_a_risk_object_and_nothing_else_changes(llama, tmp_path, settings):
    path, _ = llama
    files = []
    for i, image in enumerate(IMAGES[:3]):
        files.append(tmp_path / f"{i}.png")
        image.save(files[-1])
    captioner = Captioner(str(path), device="cpu", dtype="fp32", max_new_tokens=MAX_NEW, risk=True, **settings)
    records = captioner.caption(files)
    plain = captioner.with_settings(risk=False).caption(files)
    for record, other in zip(records, plain):
        assert record["status"] == "ok" and "risk" not in other
        assert {k: v for k, v in record.items() if k not in ("risk", "seconds", "params")} == {
            k: v for k, v in other.items() if k not in ("seconds", "params")
        }
        assert record["params"] == {**other["params"], "risk": True}
        scores = [m["score"] for m in record["risk"]["mentions"] if m["score"] is not None]
        assert record["risk"]["score"] == (max(scores) if scores else None)


@pytest.mark.dtype
@pytest.mark.parametrize("name", ["greedy", "vasparse-contrast-layers-2", "fastv"])
def test_risk_changes_no_caption_in_bf16(tiny_model, name):
    model = load_model(str(tiny_model("llava-next")), dtype="bf16", device="cpu")
    plain = run(model, IMAGES[:3], SETTINGS[name], risk=False)
    risky = run(model, IMAGES[:3], SETTINGS[name])
    assert [g.tokens for g in risky] == [g.tokens for g in plain]
    assert all(math.isfinite(v) for g in risky for values in g.signals.values() for v in values)

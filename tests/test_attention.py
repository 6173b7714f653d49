"""The loop's two attention paths (fused SDPA, eager with hooks) and the chunked prefill.

Equalities here are between vacap's own paths; each path's agreement with Hugging Face is
checked in test_decode.py (SDPA: greedy against HF generate) and test_methods.py (eager: the
contract's statistics against HF eager attentions).
"""

from __future__ import annotations

import pytest
import torch
from helpers import IMAGES, PROMPT

from vacap.cache import KVCache
from vacap.config import DecodeConfig
from vacap.decode import CHUNK_BYTES, CPU_CHUNK_QUERIES, GPU_CHUNK_BYTES, Steering, forward, generate, query_chunks
from vacap.diagnostics import Diagnostics
from vacap.methods import steering_for
from vacap.model import load_model


class Eager:
    """Wraps a steering and asks for the eager path in every layer, prefill and step."""

    def __init__(self, inner):
        self.inner, self.layers = inner, set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def needs_attention(self, layer, prefill):
        return True

    def layer_logits(self, layer, logits, cache, chunk):
        self.layers.add(layer)
        return self.inner.layer_logits(layer, logits, cache, chunk)


class Rows:
    """Wraps a steering and records the shape of every attention chunk its hooks see."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def layer_logits(self, layer, logits, cache, chunk):
        self.seen.append((layer, chunk.prefill, tuple(logits.shape)))
        return self.inner.layer_logits(layer, logits, cache, chunk)


def prefill(model, steering, images, chunk_size=None):
    """The prefill as ``generate`` runs it, with a chosen chunk size -> (hidden # (B, T, hidden), cache)."""
    inputs = model.prepare(images, PROMPT)
    embeds, image_mask, valid = steering.embed(model, inputs)
    B, T, _ = embeds.shape
    cache = KVCache(len(model.layers), B, model.n_kv_heads, model.head_dim, T + 2, dtype=embeds.dtype,
                    device=embeds.device)  # fmt: skip
    steering.begin(cache, image_mask)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = forward(model, cache, embeds, positions, valid, steering, chunk_size=chunk_size)
    steering.after_prefill(cache)
    return hidden, cache


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Two summation orders in fp32: equal to 1e-5 of the values' scale (hidden states and keys
    reach about 100 with these random weights), far below what a wrong mask, scale or chunk
    offset gives."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.fixture(scope="module", params=["llava-llama", "llava-qwen2", "llava-next"])
def model(request, tiny_model):
    return load_model(str(tiny_model(request.param)), dtype="fp32", device="cpu")


def test_default_chunks_bound_the_logits_and_cover_every_query():
    for t, T, batch, heads in [(2928, 2928, 4, 32), (607, 607, 1, 16), (1, 3000, 8, 32), (9, 9, 1, 1)]:
        chunks = query_chunks(t, T, batch, heads)
        assert [c.start for c in chunks] == [0] + [c.stop for c in chunks[:-1]] and chunks[-1].stop == t
        assert all(batch * heads * (c.stop - c.start) * T * 4 <= CHUNK_BYTES for c in chunks)
        assert all(c.slots == T - t + c.stop for c in chunks)
    # Nearly equal sizes: no short last chunk.
    assert [c.stop - c.start for c in query_chunks(10, 10, 1, 1, size=3)] == [2, 3, 2, 3]


def test_cpu_chunks_stay_small_enough_for_the_cache_and_gpu_chunks_large():
    # A 607-token prompt at batch 1 fits 431 queries under CHUNK_BYTES; on a CPU its chunks stay
    # at CPU_CHUNK_QUERIES (twice as fast there: issue 28). Where the bytes bind first they rule.
    assert max(c.stop - c.start for c in query_chunks(607, 607, 1, 16)) <= CPU_CHUNK_QUERIES
    by_bytes = CHUNK_BYTES // (4 * 16 * 2928)
    assert len(query_chunks(2928, 2928, 1, 16)) == len(query_chunks(2928, 2928, 1, 16, size=by_bytes))
    # On a GPU: a batch of 8 prompts of 2.9k tokens on 32 heads in tens of chunks, not hundreds.
    chunks = query_chunks(2928, 2928, 8, 32, gpu=True)
    assert len(chunks) < 40
    assert all(8 * 32 * (c.stop - c.start) * 2928 * 4 <= GPU_CHUNK_BYTES for c in chunks)


@pytest.mark.dtype
def test_fused_and_eager_paths_give_the_same_states_and_tokens(model):
    # llava-next: a left-padded batch; llava-qwen2: grouped-query attention.
    fused, _ = prefill(model, Steering(), IMAGES)
    eager = Eager(Steering())
    written_out, _ = prefill(model, eager, IMAGES)
    assert eager.layers == set(range(len(model.layers)))
    valid = model.prepare(IMAGES, PROMPT)["attention_mask"].bool()
    close(written_out[valid], fused[valid])
    inputs = model.prepare(IMAGES, PROMPT)
    tokens = [g.tokens for g in generate(model, inputs, Steering(), 12)]
    assert tokens == [g.tokens for g in generate(model, inputs, Eager(Steering()), 12)]


@pytest.mark.dtype
def test_kv_budget_bias_is_the_same_in_the_fused_step(model):
    """With only the KV budget on, steps take the fused path with the clusters' log-size bias as
    an additive mask; the eager path adds it to the logits."""
    config = DecodeConfig(max_new_tokens=6, sparsity=0.0, sink_beta=0.0, alpha=0.0, kv_budget=0.3)
    inputs = model.prepare(IMAGES, PROMPT)
    logits, biases = {}, []
    for name, wrap in (("fused", lambda s: s), ("eager", Eager)):
        inner = steering_for(model, config)
        seen = logits[name] = []
        choose = inner.next_token

        def record(z, token_input, position, pick, seen=seen, choose=choose):
            seen.append(z.clone())
            return choose(z, token_input, position, pick)

        inner.next_token = record
        generate(model, inputs, wrap(inner), config.max_new_tokens)
        biases.append(inner.cache.bias)
    assert (biases[0] > 0).any(), "clusters of several tokens: a real bias"
    assert len(logits["fused"]) == len(logits["eager"]) == config.max_new_tokens
    for fused, eager in zip(logits["fused"], logits["eager"]):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


def test_methods_take_the_eager_path_only_where_they_read_attention(model):
    last, start = len(model.layers) - 1, DecodeConfig().start_layer
    cases = {
        # defaults: sink from start_layer in prefill and steps, selection in steps, P in the last layer
        "defaults": (dict(), set(range(start, last + 1)), set(range(start, last + 1))),
        # the budget reads the prompt's last logits; steps without selection or sink need only P's v
        "budget only": (dict(sparsity=0.0, sink_beta=0.0, alpha=0.0, kv_budget=0.5), set(range(start, last + 1)),
                        {last}),  # fmt: skip
        "greedy": (dict(method="greedy"), set(), set()),
        "fastv": (dict(method="fastv"), {DecodeConfig().fastv_layer - 1}, set()),
    }
    inputs = model.prepare(IMAGES[:2], PROMPT)
    for name, (settings, in_prefill, in_steps) in cases.items():
        steering = Rows(steering_for(model, DecodeConfig(max_new_tokens=3, **settings)))
        generate(model, inputs, steering, 3)
        assert {layer for layer, prefill, _ in steering.seen if prefill} == in_prefill, name
        assert {layer for layer, prefill, _ in steering.seen if not prefill} == in_steps, name


@pytest.mark.parametrize("size", [1, 7])
def test_chunked_prefill_gives_the_statistics_of_one_chunk(model, size):
    settings = dict(sparsity=0.5, sink_beta=0.5, alpha=0.0)
    T = model.prepare(IMAGES, PROMPT)["input_ids"].shape[1]

    # Sink column sums and the saliency's image mass, chunk by chunk.
    whole, whole_cache = prefill(model, steering_for(model, DecodeConfig(**settings)), IMAGES)
    rows = Rows(steering_for(model, DecodeConfig(**settings)))
    chunked, chunked_cache = prefill(model, rows, IMAGES, chunk_size=size)
    assert max(shape[2] for _, _, shape in rows.seen) <= size < T
    valid = model.prepare(IMAGES, PROMPT)["attention_mask"].bool()
    # Rows of padding queries are filler that nobody reads; real rows agree to fp32 rounding.
    close(chunked[valid], whole[valid])
    for name in ("colsum", "v"):
        assert whole_cache.fields[name].any()
        close(chunked_cache.fields[name], whole_cache.fields[name])

    # The KV budget's scores use the last prompt query's logits: the same compacted cache.
    budget = {**settings, "kv_budget": 0.4}
    _, whole_cache = prefill(model, steering_for(model, DecodeConfig(**budget)), IMAGES)
    _, chunked_cache = prefill(model, steering_for(model, DecodeConfig(**budget)), IMAGES, chunk_size=size)
    assert whole_cache.length == chunked_cache.length and whole_cache.bias.any()
    assert torch.equal(whole_cache.valid, chunked_cache.valid)
    for a, b in [(whole_cache.k, chunked_cache.k), (whole_cache.bias, chunked_cache.bias),
                 *((whole_cache.fields[n], chunked_cache.fields[n]) for n in whole_cache.fields)]:  # fmt: skip
        close(b, a)

    # FastV's ranking: attention received, summed over chunks.
    fastv = DecodeConfig(method="fastv")
    whole_fastv, chunked_fastv = steering_for(model, fastv), steering_for(model, fastv)
    whole, _ = prefill(model, whole_fastv, IMAGES)
    chunked, _ = prefill(model, chunked_fastv, IMAGES, chunk_size=size)
    assert whole_fastv.dropped.any() and torch.equal(chunked_fastv.dropped, whole_fastv.dropped)
    close(chunked[valid], whole[valid])

    # Diagnostics read the last prompt query only, whichever chunk holds it.
    diagnostics = [Diagnostics(Steering(), model, DecodeConfig().start_layer) for _ in range(2)]
    for steering, chunk_size in zip(diagnostics, (None, size)):
        prefill(model, steering, IMAGES, chunk_size)
    assert diagnostics[0]._step.keys() == diagnostics[1]._step.keys() >= {"image", "sink", "sink_heads"}
    for name, value in diagnostics[0]._step.items():
        close(diagnostics[1]._step[name], value)

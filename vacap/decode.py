"""Prefill and step loop: vacap's own pure-PyTorch pass over the language model's layers.

One forward reads top to bottom: norm, project, view, rotary, cache write, attention, output
projection, MLP. The attention is written out (scores, softmax, weighted sum) rather than
delegated to SDPA because the decoding methods need the logits before the softmax and the
probabilities after it.

With every mechanism off this is exactly Hugging Face's eager Llama/Mistral/Qwen2 computation,
so `--method greedy` gives the tokens of ``generate(do_sample=False, num_beams=1)``.

``generate`` decodes one static batch; ``generate_stream`` runs the same prefill and step over
a stream of images, a finished row taking the next image (continuous batching).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import torch

from vacap.cache import KVCache
from vacap.model import VisionLanguageModel


@dataclass
class Generated:
    """One row's output: token ids (the stop token included when one was produced)."""

    tokens: list[int]
    stopped_by: str  # "eos" or "length"
    seconds: float = 0.0  # its share of the decode's wall time (``generate_stream`` only)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x # (B, heads, t, D); cos, sin # (B, t, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def attention_logits(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """q # (B, H, t, D), k # (B, Hkv, T, D) -> fp32 logits # (B, H, t, T).

    Query heads are grouped onto their KV head by a view, so keys are never repeated in memory.
    The product runs in the model's dtype, as Hugging Face's eager attention does.
    """
    B, H, t, D = q.shape
    Hkv = k.shape[1]
    grouped = q.reshape(B, Hkv, (H // Hkv) * t, D)
    return (torch.matmul(grouped, k.transpose(2, 3)) * scaling).view(B, H, t, -1).float()


def attention_output(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs # (B, H, t, T) fp32, v # (B, Hkv, T, D) -> # (B, t, H * D)."""
    B, H, t, T = probs.shape
    Hkv, D = v.shape[1], v.shape[3]
    out = torch.matmul(probs.to(v.dtype).reshape(B, Hkv, (H // Hkv) * t, T), v)
    return out.view(B, H, t, D).transpose(1, 2).reshape(B, t, H * D)


class Steering:
    """What a decoding method may change in the loop; this base class changes nothing (greedy).

    The loop calls, in order: ``embed`` (the batch it decodes, which may be larger than the
    caller's: VCD adds noised copies), ``begin`` once the cache exists, ``layer_logits`` and
    ``observe`` around every layer's softmax, ``after_prefill`` once, and ``next_token`` per step.
    Under continuous batching one instance does the prefill of each admitted group, and another,
    given the running cache by ``attach`` instead of ``begin``, does every step; so all per-row
    state lives in the cache (fields), where splicing carries it.
    """

    def embed(self, model: VisionLanguageModel, inputs: dict[str, torch.Tensor]):
        """-> embeds # (B', T, hidden), image_mask # (B', T), valid # (B', T)."""
        embeds, image_mask = model.embed(inputs)
        return embeds, image_mask, inputs["attention_mask"].bool()

    def begin(self, cache: KVCache, image_mask: torch.Tensor) -> None:
        pass

    def attach(self, cache: KVCache) -> None:
        """Decode steps on a cache whose rows other instances prefilled (``generate_stream``)."""

    def layer_logits(self, layer: int, logits: torch.Tensor, cache: KVCache, prefill: bool) -> torch.Tensor:
        """logits # (B, H, t, T) fp32, before any mask; returns the logits the softmax should use."""
        return logits

    def observe(self, layer: int, probs: torch.Tensor, cache: KVCache, query_valid: torch.Tensor) -> None:
        """probs # (B, H, t, T) as used; query_valid # (B, t) marks real (non-padding) queries."""

    def after_prefill(self, cache: KVCache) -> None:
        pass

    def next_token(self, logits: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """logits # (B, V); token_input # (B, hidden) embedding of the token that produced them;
        position # (B, 1) its position. -> chosen tokens # (B,)."""
        return logits.argmax(-1)


def forward(
    model: VisionLanguageModel,
    cache: KVCache,
    x: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    steering: Steering,
    n_layers: int | None = None,
) -> torch.Tensor:
    """Run new tokens through the decoder layers, writing their keys and values to the cache.

    x # (B, t, hidden); positions # (B, t) absolute positions; valid # (B, t) real tokens.
    Returns the hidden states after the first ``n_layers`` layers (all by default), before the
    final norm # (B, t, hidden).
    """
    B, t, _ = x.shape
    prefill = t > 1
    cos, sin = model.rotary_emb(x, positions)
    for index, layer in enumerate(model.layers[:n_layers]):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(B, t, -1, model.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(B, t, -1, model.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(B, t, -1, model.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys, values, slot_valid = cache.append(index, k, v, valid)

        logits = steering.layer_logits(index, attention_logits(q, keys, model.scaling), cache, prefill)
        bias = cache.layer_bias(index)
        if bias is not None:
            logits = logits + bias.repeat_interleave(model.n_heads // model.n_kv_heads, dim=1).unsqueeze(2)
        allowed = slot_valid[:, None, None, :]
        if prefill:
            T = keys.shape[2]
            allowed = allowed & torch.ones(t, T, dtype=torch.bool, device=x.device).tril(T - t)
        # The dtype's minimum rather than -inf: a padding query with no visible key then gets a
        # harmless uniform row instead of NaN, as in Hugging Face's eager masks.
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1)
        steering.observe(index, probs, cache, valid)

        x = x + attn.o_proj(attention_output(probs, values))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x


def _prefill(model: VisionLanguageModel, inputs: dict[str, torch.Tensor], steering: Steering, spare: int):
    """Embed and run a prepared batch through every layer into a new cache with ``spare`` free slots.

    -> cache, the last position's hidden state # (B', hidden), its input embedding # (B', hidden),
    the position of each row's next token # (B', 1); B' may exceed the batch (VCD's copies).
    """
    embeds, image_mask, valid = steering.embed(model, inputs)
    B, T, _ = embeds.shape
    cache = KVCache(
        len(model.layers), B, model.n_kv_heads, model.head_dim, T + spare, dtype=embeds.dtype, device=embeds.device
    )
    steering.begin(cache, image_mask)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    hidden = forward(model, cache, embeds, positions, valid, steering)
    steering.after_prefill(cache)
    return cache, hidden[:, -1], embeds[:, -1], valid.sum(-1, keepdim=True)


def _check_window(model: VisionLanguageModel, prompt: int, max_new: int) -> None:
    if model.sliding_window is not None and prompt + max_new > model.sliding_window:
        raise ValueError(
            f"prompt ({prompt} tokens) plus --max-new-tokens ({max_new}) exceeds the model's sliding "
            f"window ({model.sliding_window}); vacap does not implement sliding-window attention"
        )


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    inputs: dict[str, torch.Tensor],
    steering: Steering,
    max_new_tokens: int,
) -> list[Generated]:
    """Caption a prepared batch (``model.prepare``) under a method's ``steering``
    (``vacap.methods.steering_for``; a plain ``Steering()`` is greedy decoding)."""
    rows = inputs["input_ids"].shape[0]
    max_new = max_new_tokens
    _check_window(model, inputs["input_ids"].shape[1], max_new)
    # One spare slot: the contrast branch writes its token there and rolls back.
    cache, hidden, last_input, next_position = _prefill(model, inputs, steering, max_new + 1)
    B, device = hidden.shape[0], hidden.device

    eos = torch.tensor(model.eos_ids, device=device)
    step_valid = torch.ones(B, 1, dtype=torch.bool, device=device)
    tokens = torch.full((B, max_new), model.pad_id, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new):
        logits = model.lm_head(model.norm(hidden))
        token = steering.next_token(logits, last_input, next_position - 1)
        token = torch.where(finished, model.pad_id, token)
        tokens[:, step] = token
        stop = ~finished & torch.isin(token, eos)
        lengths = torch.where(stop, step + 1, lengths)
        finished |= stop
        if finished.all() or step == max_new - 1:
            break
        last_input = model.embed_tokens(token)
        hidden = forward(model, cache, last_input[:, None], next_position, step_valid, steering)[:, -1]
        next_position = next_position + 1

    return [
        Generated(tokens[b, : lengths[b]].tolist(), "eos" if finished[b] else "length") for b in range(rows)
    ]


def batch_inputs(model: VisionLanguageModel, prepared: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch from single prepared images, as ``model.prepare`` would have made it: token
    rows left padded, anyres tile stacks (pixel_values # (1, tiles, 3, h, w)) padded with zeros."""
    if len(prepared) == 1:  # the usual admission once rows free one at a time: nothing to pad
        return prepared[0]
    out = {}
    for name in prepared[0]:
        parts = [p[name] for p in prepared]
        width = max(x.shape[1] if x.dim() > 1 else 0 for x in parts)
        if name in ("input_ids", "attention_mask"):
            fill = model.pad_id if name == "input_ids" else 0
            parts = [torch.nn.functional.pad(x, (width - x.shape[1], 0), value=fill) for x in parts]
        elif parts[0].dim() > 2:
            parts = [torch.cat([x, x.new_zeros(1, width - x.shape[1], *x.shape[2:])], 1) for x in parts]
        out[name] = torch.cat(parts)
    return out


@torch.no_grad()
def generate_stream(
    model: VisionLanguageModel,
    images: Iterable[tuple[Hashable, dict[str, torch.Tensor]]],
    new_steering: Callable[[], Steering],
    rows: int,
    max_new_tokens: int,
) -> Iterator[tuple[Hashable, Generated]]:
    """Continuous batching: caption a stream of ``(key, model.prepare([image], prompt))`` on
    ``rows`` batch rows, yielding ``(key, Generated)`` as each caption ends (completion order).

    A row that finishes takes the next image at once. The images admitted at one moment are
    prefilled together in a small batch of their own, under a fresh ``new_steering()`` (so the
    method's prefill work, such as KV-budget or FastV compaction, happens there), and spliced
    into the running cache (``KVCache.splice``); the steps run under one more steering attached
    to the running cache. A method's extra rows (VCD's noised copies) keep their pairing: copy c
    of row r is row c * rows + r. ``Generated.seconds`` is the row's share of the wall time: its
    group's prefill divided among the group, each step divided among the rows it ran.
    """
    max_new = max_new_tokens
    pending = iter(images)
    keys: list[Hashable | None] = [None] * rows
    seconds = [0.0] * rows
    running = new_steering()
    cache: KVCache | None = None
    while True:
        free = [r for r in range(rows) if keys[r] is None]
        group = list(itertools.islice(pending, len(free)))
        if group:
            started = time.perf_counter()
            inputs = batch_inputs(model, [prepared for _, prepared in group])
            _check_window(model, inputs["input_ids"].shape[1], max_new)
            small, h, x, p = _prefill(model, inputs, new_steering(), 0)
            copies = small.batch // len(group)
            if cache is None:
                # Room for rows admitted at different times, each right-aligned to the running
                # length: with twice the prompt as slack, trims (KVCache.trim) stay rare.
                cache = KVCache.like(small, copies * rows, 2 * inputs["input_ids"].shape[1] + max_new + 2)
                running.attach(cache)
                device = h.device
                hidden = h.new_zeros(copies * rows, h.shape[1])
                last_input = hidden.clone()
                position = torch.zeros(copies * rows, 1, dtype=torch.long, device=device)
                tokens = torch.full((rows, max_new), model.pad_id, dtype=torch.long, device=device)
                count = torch.zeros(rows, dtype=torch.long, device=device)
                active = torch.zeros(copies * rows, dtype=torch.bool, device=device)
                eos = torch.tensor(model.eos_ids, device=device)
            targets = free[: len(group)]
            into = [c * rows + r for c in range(copies) for r in targets]
            for layer in range(len(cache.length)):
                cache.make_room(layer, max(cache.length[layer], small.length[layer]) + 2)
            cache.splice(small, range(small.batch), into)
            into_t = torch.tensor(into, device=device)
            hidden[into_t], last_input[into_t], position[into_t] = h, x, p
            count[into_t[: len(group)]] = 0
            active[into_t] = True
            share = (time.perf_counter() - started) / len(group)
            for r, (key, _) in zip(targets, group):
                keys[r], seconds[r] = key, share
        busy = [r for r in range(rows) if keys[r] is not None]
        if not busy:
            return
        started = time.perf_counter()
        logits = model.lm_head(model.norm(hidden))
        token = running.next_token(logits, last_input, position - 1)
        tokens.scatter_(1, count.clamp(max=max_new - 1)[:, None], token[:rows, None])
        count = count + 1
        stop = active[:rows] & (torch.isin(token[:rows], eos) | (count == max_new))
        done = stop.nonzero().flatten().tolist()  # the step's one read-back from the device
        finished = []
        if done:
            finished = list(zip(done, token[done].tolist(), count[done].tolist(), tokens[done].tolist()))
            freed = [c * rows + r for c in range(active.shape[0] // rows) for r in done]
            active[freed] = False
            cache.valid[:, freed] = False
        if len(done) < len(busy):
            for layer in range(len(cache.length)):
                cache.make_room(layer, cache.length[layer] + 2)
            last_input = model.embed_tokens(token)
            hidden = forward(model, cache, last_input[:, None], position, active[:, None], running)[:, -1]
            position = position + 1
        share = (time.perf_counter() - started) / len(busy)
        for r in busy:
            seconds[r] += share
        for r, end, n, row in finished:
            yield keys[r], Generated(row[:n], "eos" if end in model.eos_ids else "length", round(seconds[r], 4))
            keys[r] = None

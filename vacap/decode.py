"""Prefill and step loop: vacap's own pure-PyTorch pass over the language model's layers.

One forward reads top to bottom: norm, project, view, rotary, cache write, attention, output
projection, MLP. The attention is written out (scores, softmax, weighted sum) rather than
delegated to SDPA because the decoding methods need the logits before the softmax and the
probabilities after it.

With every mechanism off this is exactly Hugging Face's eager Llama/Mistral/Qwen2 computation,
so `--method greedy` gives the tokens of ``generate(do_sample=False, num_beams=1)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vacap.cache import KVCache
from vacap.model import VisionLanguageModel

log = logging.getLogger("vacap")
# How generate() runs the decode steps: ``forward`` over the live slots ("dynamic", the
# reference), or ``static_step`` over the whole capacity, eager ("static") or torch.compile'd.
STEPS = ("dynamic", "static", "compiled")
# Static steps attend over the capacity rounded up to this many slots, so that prompts of
# different lengths share one compiled graph instead of each costing a compilation.
CAPACITY_QUANTUM = 256


@dataclass
class Generated:
    """One row's output: token ids (the stop token included when one was produced)."""

    tokens: list[int]
    stopped_by: str  # "eos" or "length"


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
    ``observe`` around every layer's softmax, ``after_prefill`` once, then ``head`` and
    ``next_token`` per step.
    """

    # True for a subclass whose ``layer_logits`` and ``observe`` act in the prefill only: its
    # decode steps may then run as ``static_step``, which calls no per-layer hook.
    prefill_only_hooks = False

    def embed(self, model: VisionLanguageModel, inputs: dict[str, torch.Tensor]):
        """-> embeds # (B', T, hidden), image_mask # (B', T), valid # (B', T)."""
        embeds, image_mask = model.embed(inputs)
        return embeds, image_mask, inputs["attention_mask"].bool()

    def begin(self, cache: KVCache, image_mask: torch.Tensor) -> None:
        pass

    def layer_logits(self, layer: int, logits: torch.Tensor, cache: KVCache, prefill: bool) -> torch.Tensor:
        """logits # (B, H, t, T) fp32, before any mask; returns the logits the softmax should use."""
        return logits

    def observe(self, layer: int, probs: torch.Tensor, cache: KVCache, query_valid: torch.Tensor) -> None:
        """probs # (B, H, t, T) as used; query_valid # (B, t) marks real (non-padding) queries."""

    def after_prefill(self, cache: KVCache) -> None:
        pass

    def head(
        self, model: VisionLanguageModel, hidden: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        """hidden # (B, hidden) last layer's output for the step's token, before the final norm
        -> next-token logits # (B, V); token_input and position as in ``next_token``."""
        return model.lm_head(model.norm(hidden))

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


def static_step(
    model: VisionLanguageModel,
    cache: KVCache,
    x: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """One new token per row through every layer, with the same shapes at every step.

    x # (B, 1, hidden); positions # (B, 1) absolute positions; slots # (L,) long, the cache
    slot each layer writes. Positions and slots live on the device and attention runs over the
    cache's whole capacity, its empty slots masked out, so no number the host counts enters
    the computation: compiled once, the step never recompiles (and on a GPU it can be captured
    as a graph). The caller advances ``slots`` and the host's ``cache.length``. Calls no
    steering hook: only for steps that are plain attention (``Steering.prefill_only_hooks``).
    Equals ``forward`` on one token up to the rounding of the attention kernel.
    Returns the hidden states before the final norm # (B, 1, hidden).
    """
    B = x.shape[0]
    Hkv, group, D = model.n_kv_heads, model.n_heads // model.n_kv_heads, model.head_dim
    cos, sin = model.rotary_emb(x, positions)
    for index, layer in enumerate(model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        # One token: its query heads, grouped under their KV head, act as that head's queries,
        # so SDPA shares each key among its group without repeating the keys in memory.
        q = attn.q_proj(h).view(B, Hkv, group, D)
        k = attn.k_proj(h).view(B, Hkv, 1, D)
        v = attn.v_proj(h).view(B, Hkv, 1, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache.write_at(index, slots[index : index + 1], k, v)
        out = F.scaled_dot_product_attention(
            q, cache.k[index], cache.v[index], attn_mask=cache.valid[index][:, None, None], scale=model.scaling
        )  # (B, Hkv, group, D)
        x = x + attn.o_proj(out.reshape(B, 1, Hkv * group * D))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x


def _steps_kind(model: VisionLanguageModel, steering: Steering, steps: str) -> str:
    """The steps generate() runs: ``steps``, or "dynamic" when the steering needs per-layer hooks
    in its steps (said once per loaded model and kind of steering)."""
    if steps not in STEPS:
        raise ValueError(f"steps must be one of {', '.join(STEPS)}, got {steps!r}")
    base = type(steering).layer_logits is Steering.layer_logits and type(steering).observe is Steering.observe
    if steps == "dynamic" or base or steering.prefill_only_hooks:
        return steps
    note = f"dynamic steps for {type(steering).__name__}"
    if note not in model.notes_given:
        model.notes_given.add(note)
        log.warning(
            "%s decoding needs attention inside every step, so it runs the dynamic step; the static "
            "step (--compile) covers greedy, vcd and fastv without --diagnostics",
            type(steering).__name__,
        )
    return "dynamic"


def _static_decoder(model: VisionLanguageModel, cache: KVCache, compiled: bool) -> Callable:
    """``decode(x, positions) -> hidden`` running ``static_step``, torch.compile'd once per model."""
    step = static_step
    if compiled:
        if "static" not in model.compiled:
            model.compiled["static"] = torch.compile(static_step, dynamic=False)
        step = model.compiled["static"]
    slots = torch.tensor(cache.length, device=cache.k.device)

    def decode(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = step(model, cache, x, positions, slots)
        slots.add_(1)
        cache.length = [n + 1 for n in cache.length]
        return hidden

    return decode


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    inputs: dict[str, torch.Tensor],
    steering: Steering,
    max_new_tokens: int,
    *,
    steps: str = "dynamic",
) -> list[Generated]:
    """Caption a prepared batch (``model.prepare``) under a method's ``steering``
    (``vacap.methods.steering_for``; a plain ``Steering()`` is greedy decoding).

    ``steps`` (one of ``STEPS``) picks how decode steps run; "static" and "compiled" apply only
    where the steering allows it (see ``static_step``) and fall back to "dynamic" elsewhere.
    """
    steps = _steps_kind(model, steering, steps)
    rows = inputs["input_ids"].shape[0]
    embeds, image_mask, valid = steering.embed(model, inputs)
    B, T, _ = embeds.shape
    max_new = max_new_tokens
    if model.sliding_window is not None and T + max_new > model.sliding_window:
        raise ValueError(
            f"prompt ({T} tokens) plus --max-new-tokens ({max_new}) exceeds the model's sliding "
            f"window ({model.sliding_window}); vacap does not implement sliding-window attention"
        )
    # One spare slot: the contrast branch writes its token there and rolls back.
    capacity = T + max_new + 1
    if steps != "dynamic":
        capacity = -(-capacity // CAPACITY_QUANTUM) * CAPACITY_QUANTUM
    cache = KVCache(
        len(model.layers), B, model.n_kv_heads, model.head_dim, capacity, dtype=embeds.dtype, device=embeds.device
    )
    steering.begin(cache, image_mask)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    hidden = forward(model, cache, embeds, positions, valid, steering)
    steering.after_prefill(cache)

    eos = torch.tensor(model.eos_ids, device=embeds.device)
    next_position = valid.sum(-1, keepdim=True)
    step_valid = torch.ones(B, 1, dtype=torch.bool, device=embeds.device)
    if steps == "dynamic":
        def decode(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return forward(model, cache, x, positions, step_valid, steering)
    else:
        decode = _static_decoder(model, cache, compiled=steps == "compiled")
    last_input = embeds[:, -1]
    tokens = torch.full((B, max_new), model.pad_id, dtype=torch.long, device=embeds.device)
    lengths = torch.full((B,), max_new, dtype=torch.long, device=embeds.device)
    finished = torch.zeros(B, dtype=torch.bool, device=embeds.device)
    for step in range(max_new):
        logits = steering.head(model, hidden[:, -1], last_input, next_position - 1)
        token = steering.next_token(logits, last_input, next_position - 1)
        token = torch.where(finished, model.pad_id, token)
        tokens[:, step] = token
        stop = ~finished & torch.isin(token, eos)
        lengths = torch.where(stop, step + 1, lengths)
        finished |= stop
        if finished.all() or step == max_new - 1:
            break
        last_input = model.embed_tokens(token)
        hidden = decode(last_input[:, None], next_position)
        next_position = next_position + 1

    return [
        Generated(tokens[b, : lengths[b]].tolist(), "eos" if finished[b] else "length") for b in range(rows)
    ]

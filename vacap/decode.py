"""Prefill and step loop: vacap's own pure-PyTorch pass over the language model's layers.

One forward reads top to bottom: norm, project, view, rotary, cache write, attention, output
projection, MLP. Attention takes one of two paths per layer, chosen by the decoding method
(``Steering.needs_attention``):

- where nobody reads the probabilities, PyTorch's fused ``scaled_dot_product_attention``
  (greedy everywhere, and most layers of the other methods);
- where a method needs the logits before the softmax or the probabilities after it, the attention
  written out (scores, softmax, weighted sum) with the method's hooks around the softmax.

The written-out path runs over chunks of queries (one chunk in a decode step), each against the
cache slots its last query may see, so the prefill never holds a (B, H, T, T) tensor: a chunk's
fp32 logits stay under ``CHUNK_BYTES`` (``GPU_CHUNK_BYTES`` on a GPU), and the hooks accumulate their
statistics chunk by chunk.

With every mechanism off this is Hugging Face's Llama/Mistral/Qwen2 computation with its default
SDPA attention, so `--method greedy` gives the tokens of ``generate(do_sample=False, num_beams=1)``;
Qwen2-VL's too, whose rotary embedding takes the prefill's three M-RoPE position streams (see
``_prefill``) and splits them among the head's frequencies itself.

``generate`` decodes one static batch; ``generate_stream`` runs the same prefill and step over
a stream of images, a finished row taking the next image (continuous batching).

With ``risk`` either one also returns per-token risk signals (vacap/risk_signals.py): each step
records those of the model's distribution on the device (``RiskTape``), and when a caption ends
one batched pass runs the risk branch for all its steps at once (``branch_log_probs``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from vacap import risk_signals as rs
from vacap.cache import KVCache
from vacap.model import VisionLanguageModel
from vacap.risk_signals import RiskSettings
from vacap.sampling import Sampling, choose, row_key
from vacap.vasparse import draw_hidden

log = logging.getLogger("vacap")
# How generate() runs the decode steps: ``forward`` over the live slots ("dynamic", the
# reference), or ``static_step`` over the whole capacity, eager ("static") or torch.compile'd.
STEPS = ("dynamic", "static", "compiled")
# Static steps attend over the capacity rounded up to this many slots, so that prompts of
# different lengths share one compiled graph instead of each costing a compilation.
CAPACITY_QUANTUM = 256


# Written-out attention holds two or three tensors of one chunk's (B, H, chunk, T) size at once
# (the logits, their masked copy, the probabilities; in bf16 also a cast); bounding the fp32
# logits to 16 MiB keeps the prefill's attention temporaries near 50 MiB at any length.
CHUNK_BYTES = 16 * 2**20
# On a CPU also at most this many queries per chunk, so that a chunk's logits, masked copy and
# probabilities stay in the last-level cache: a 607-token prompt's written-out attention at batch 1
# (431 queries a chunk by bytes alone) took twice the time of 128-query chunks (issue 28,
# benchmarks/RESULTS.md). Fewer queries do not help: at 2.9k slots the per-chunk overhead wins.
CPU_CHUNK_QUERIES = 128
# A GPU pays kernel launches per chunk instead, and has memory to spare: by CHUNK_BYTES a batch of
# 8 prompts of 2.9k tokens on a 7B model (32 heads) would run 4 queries a chunk, 730 chunks a layer.
GPU_CHUNK_BYTES = 256 * 2**20
# The cache field of the risk branch's hidden image slots (1 on a hidden slot), per layer and KV
# head so that every compaction (FastV's, the KV budget's per-head one) carries it with its slots.
RISK_FIELD = "risk_hidden"


@dataclass
class Generated:
    """One row's output: token ids (the stop token included when one was produced)."""

    tokens: list[int]
    stopped_by: str  # "eos" or "length"
    seconds: float = 0.0  # its share of the decode's wall time (``generate_stream`` only)
    # With ``risk``: each of ``risk_signals.NAMES`` -> one value per token of ``tokens`` (same
    # order, the stop token included); None without.
    signals: dict[str, list[float]] | None = None


@dataclass(frozen=True)
class Chunk:
    """The queries a block of attention rows belongs to: new tokens ``start:stop`` of the
    ``total`` a forward processes (``total`` is 1 in a decode step). Their rows cover the first
    ``slots`` cache slots of the layer; the slots after those hold these queries' future."""

    start: int
    stop: int
    total: int
    slots: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def prefill(self) -> bool:
        return self.total > 1

    @property
    def last(self) -> bool:
        """Whether the chunk holds the forward's last query (the one that predicts a token)."""
        return self.stop == self.total


def query_chunks(t: int, T: int, batch: int, heads: int, size: int | None = None, gpu: bool = False) -> list[Chunk]:
    """Split t new tokens, the last t of a T-slot cache, into chunks of at most ``size`` queries
    (by default as many as keep one chunk's fp32 logits under ``CHUNK_BYTES``, at most
    ``CPU_CHUNK_QUERIES``; on a GPU under ``GPU_CHUNK_BYTES``) and of nearly equal sizes, so that
    no short last chunk pays a whole chunk's per-call overhead for a few rows."""
    if size is None:
        logits = 4 * batch * heads * T
        size = max(1, GPU_CHUNK_BYTES // logits if gpu else min(CHUNK_BYTES // logits, CPU_CHUNK_QUERIES))
    n = -(-t // size)
    bounds = [t * i // n for i in range(n + 1)]
    return [Chunk(a, b, t, T - t + b) for a, b in zip(bounds, bounds[1:])]


def chunk_mask(visible: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """visible # (B, T) slots any query may see -> # (B, 1, c, slots) bool: what each of the
    chunk's queries may see (a visible slot not after its own)."""
    if chunk.stop - chunk.start == 1:  # one query, the chunk's last slot: nothing after it
        return visible[:, None, None, : chunk.slots]
    own = torch.arange(chunk.slots - (chunk.stop - chunk.start), chunk.slots, device=visible.device)  # (c,)
    causal = torch.arange(chunk.slots, device=visible.device) <= own[:, None]  # (c, slots)
    return visible[:, None, None, : chunk.slots] & causal


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


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    bias: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """SDPA: q # (B, H, t, D), k, v # (B, Hkv, T, D), allowed # (B, 1, t, T) bool, or None for plain
    causal attention over t == T slots; bias # (B, H, 1, T) fp32 or None -> # (B, t, H * D).
    Grouped query heads share their KV head inside the kernel."""
    B, H, t, D = q.shape
    mask = allowed
    if bias is not None:
        # The dtype's minimum, as in the eager path: a query with no visible slot stays finite.
        mask = torch.where(allowed, bias, torch.finfo(torch.float32).min).to(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=H != k.shape[1]
    )
    return out.transpose(1, 2).reshape(B, t, H * D)


class Steering:
    """What a decoding method may change in the loop; this base class changes nothing (greedy).

    The loop calls, in order: ``embed`` (the batch it decodes, which may be larger than the
    caller's: VCD adds noised copies), ``begin`` once the cache exists, then per layer
    ``hidden_slots`` and ``needs_attention``; where the latter says yes, ``layer_logits``,
    ``layer_probs`` and ``observe`` around the softmax of every chunk of queries (in order; see
    ``Chunk``); ``mlp_output`` on every layer's MLP output and ``residual`` on every layer's
    output; ``after_prefill`` once, then ``head`` and ``next_token`` per step (the loop hands the
    latter its rule for choosing a token from final logits: argmax, or a seeded draw). With risk
    signals the loop asks ``shares_branch`` once and, where it says yes, ``branch_logits`` after
    every ``head``. Hooks must also be right where they were not asked for: a wrapper
    (``Diagnostics``) may need the eager path where its inner method does not.
    Under continuous batching one instance does the prefill of each admitted group, and another,
    given the running cache by ``attach`` instead of ``begin``, does every step; so all per-row
    state lives in the cache (per-slot fields, or ``rows``), where splicing carries it.
    """

    # True for a subclass whose per-layer hooks (``layer_logits``, ``layer_probs``, ``observe``,
    # ``mlp_output``, ``residual``) act in the prefill only: its decode steps may then run as
    # ``static_step``, which calls none of them.
    prefill_only_hooks = False

    def embed(self, model: VisionLanguageModel, inputs: dict[str, torch.Tensor]):
        """-> embeds # (B', T, hidden), image_mask # (B', T), valid # (B', T)."""
        embeds, image_mask = model.embed(inputs)
        return embeds, image_mask, inputs["attention_mask"].bool()

    def begin(self, cache: KVCache, image_mask: torch.Tensor) -> None:
        pass

    def attach(self, cache: KVCache) -> None:
        """Decode steps on a cache whose rows other instances prefilled (``generate_stream``)."""

    def needs_attention(self, layer: int, prefill: bool) -> bool:
        """Whether ``layer_logits`` and ``observe`` must run in this layer of the prefill or of a
        step; where no hook needs them the loop takes the fused path and calls neither."""
        return False

    def hidden_slots(self, layer: int, cache: KVCache, prefill: bool) -> torch.Tensor | None:
        """# (B, T) bool: the layer's cache slots that no query may see, besides padding; or None."""
        return None

    def layer_logits(self, layer: int, logits: torch.Tensor, cache: KVCache, chunk: Chunk) -> torch.Tensor:
        """logits # (B, H, c, chunk.slots) fp32, before any mask; returns the logits the softmax should use."""
        return logits

    def layer_probs(self, layer: int, probs: torch.Tensor, cache: KVCache, chunk: Chunk) -> torch.Tensor:
        """probs # (B, H, c, chunk.slots) fp32, the softmax of the masked logits; returns the
        attention weights the layer uses (``observe`` sees these)."""
        return probs

    def observe(
        self, layer: int, probs: torch.Tensor, cache: KVCache, query_valid: torch.Tensor, chunk: Chunk
    ) -> None:
        """probs # (B, H, c, chunk.slots) as used; query_valid # (B, c) marks the chunk's real
        (non-padding) queries."""

    def mlp_output(self, layer: int, m: torch.Tensor, prefill: bool) -> torch.Tensor:
        """m # (B, t, hidden): what layer ``layer``'s MLP adds to the residual stream; returns
        what the layer adds instead."""
        return m

    def residual(self, layer: int, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        """x # (B, t, hidden): the residual stream after layer ``layer`` (its attention and MLP);
        returns the stream the next layer, or the final norm, reads."""
        return x

    def after_prefill(self, cache: KVCache) -> None:
        pass

    def head(
        self, model: VisionLanguageModel, hidden: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        """hidden # (B, hidden) last layer's output for the step's token, before the final norm
        -> next-token logits # (B, V); token_input and position as in ``next_token``."""
        return model.lm_head(model.norm(hidden))

    def next_token(
        self, logits: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor, choose: Callable
    ) -> torch.Tensor:
        """logits # (B, V); token_input # (B, hidden) embedding of the token that produced them;
        position # (B, 1) its position; choose: final logits z # (b, V) of the caller's b rows
        (B minus a method's extra copies) -> their tokens # (b,) (docs/VASPARSE.md: argmax z, or a
        draw from softmax(z)). -> chosen tokens # (B,)."""
        return choose(logits)

    def shares_branch(self, layers: int, mask_rate: float, seed: int) -> bool:
        """Whether every ``head`` computes the contrast branch of docs/VASPARSE.md section 3 with
        these ``contrast_layers``, ``mask_rate`` and seed (hidden slots drawn by
        ``vasparse.draw_hidden``): then the risk signals read its logits (``branch_logits``)
        instead of running the branch again."""
        return False

    def branch_logits(self) -> torch.Tensor:
        """The branch logits z_phi # (B, V) of the last ``head``; only where ``shares_branch``."""
        raise NotImplementedError


def forward(
    model: VisionLanguageModel,
    cache: KVCache,
    x: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    steering: Steering,
    n_layers: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Run new tokens through the decoder layers, writing their keys and values to the cache.

    x # (B, t, hidden); positions # (B, t) absolute positions (a prefill under M-RoPE: # (3, B, t),
    see ``VisionLanguageModel.positions``); valid # (B, t) real tokens.
    ``chunk_size`` caps the queries per chunk of written-out attention (default: ``query_chunks``'s).
    Returns the hidden states after the first ``n_layers`` layers (all by default), before the
    final norm # (B, t, hidden).
    """
    cos, sin = model.rotary_emb(x, positions)
    # A prefill without padding into an empty cache needs no mask: SDPA's causal kernel then skips
    # the blocks above the diagonal (a third of its time at 600 tokens). One host sync per
    # prefill; a decode step never asks.
    causal = x.shape[1] > 1 and cache.length[0] == 0 and bool(valid.all())
    for index, layer in enumerate(model.layers[:n_layers]):
        # A function of its own, so that q, k, v and the attention output are freed before the
        # MLP's large intermediate tensors are made.
        x = x + self_attention(
            model, index, layer.input_layernorm(x), cos, sin, cache, valid, causal, steering, chunk_size
        )
        x = x + steering.mlp_output(index, layer.mlp(layer.post_attention_layernorm(x)), x.shape[1] > 1)
        x = steering.residual(index, x, x.shape[1] > 1)
    return x


def projected(attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """Queries, keys and values of h # (B, t, hidden), the first two rotated:
    # (B, H, t, D), (B, Hkv, t, D), (B, Hkv, t, D)."""
    B, t, _ = h.shape
    q = attn.q_proj(h).view(B, t, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(B, t, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(B, t, -1, head_dim).transpose(1, 2)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def self_attention(
    model: VisionLanguageModel,
    index: int,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache,
    valid: torch.Tensor,
    causal: bool,
    steering: Steering,
    chunk_size: int | None,
) -> torch.Tensor:
    """Layer ``index``'s attention on its normed input h # (B, t, hidden) -> # (B, t, hidden);
    the new tokens' keys and values go to the cache first. ``causal``: every query may see
    every slot up to its own (no padding, no earlier slots)."""
    B, t, _ = h.shape
    H, D = model.n_heads, model.head_dim
    prefill = t > 1
    attn = model.layers[index].self_attn
    q, k, v = projected(attn, h, cos, sin, D)
    keys, values, visible = cache.append(index, k, v, valid)
    del k, v  # the cache holds copies
    hidden = steering.hidden_slots(index, cache, prefill)
    if hidden is not None:
        visible = visible & ~hidden
    bias = cache.layer_bias(index)
    if bias is not None:
        bias = bias.repeat_interleave(H // model.n_kv_heads, dim=1).unsqueeze(2)  # (B, H, 1, T)
    T = keys.shape[2]

    if not steering.needs_attention(index, prefill):
        # One call: the fused kernel never materialises the logits, and its bool mask
        # # (B, 1, t, T) is a quarter of one head's fp32 logits.
        plain = causal and hidden is None and bias is None
        allowed = None if plain else chunk_mask(visible, Chunk(0, t, t, T))
        return attn.o_proj(fused_attention(q, keys, values, allowed, bias, model.scaling))

    out = h.new_empty(B, t, H * D)
    for chunk in query_chunks(t, T, B, H, chunk_size, gpu=h.device.type == "cuda"):
        kc, vc = keys[:, :, : chunk.slots], values[:, :, : chunk.slots]
        logits = attention_logits(q[:, :, chunk.rows], kc, model.scaling)
        logits = steering.layer_logits(index, logits, cache, chunk)
        if bias is not None:
            logits = logits + bias[..., : chunk.slots]
        # The dtype's minimum rather than -inf: a padding query with no visible key then gets a
        # harmless uniform row instead of NaN, as in Hugging Face's eager masks.
        logits = torch.where(chunk_mask(visible, chunk), logits, torch.finfo(logits.dtype).min)
        probs = steering.layer_probs(index, torch.softmax(logits, dim=-1), cache, chunk)
        del logits  # one chunk-sized tensor fewer while the hooks and the product run
        steering.observe(index, probs, cache, valid[:, chunk.rows], chunk)
        out[:, chunk.rows] = attention_output(probs, vc)
    return attn.o_proj(out)


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
    if steps == "dynamic":
        return steps
    hooks = ("layer_logits", "layer_probs", "observe", "mlp_output", "residual")
    base = all(getattr(type(steering), hook) is getattr(Steering, hook) for hook in hooks)
    if base or steering.prefill_only_hooks:
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
            _compile_cache_per_isa()
            model.compiled["static"] = torch.compile(static_step, dynamic=False)
        step = model.compiled["static"]
    slots = torch.tensor(cache.length, device=cache.k.device)

    def decode(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = step(model, cache, x, positions, slots)
        slots.add_(1)
        cache.length = [n + 1 for n in cache.length]
        return hidden

    return decode


def _compile_cache_per_isa() -> None:
    """Give each CPU instruction set its own torch.compile cache, unless the user chose one.

    torch 2.13's FX graph cache leaves the vector ISA (which ``ATEN_CPU_CAPABILITY`` lowers) out
    of its key: a step compiled under AVX512 and served from the cache under
    ``ATEN_CPU_CAPABILITY=avx2`` gave garbage tokens. Importing transformers' models already
    writes inductor's default into the variable, so a default there is not the user's choice.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        isa = torch.backends.cpu.get_cpu_capability().lower()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_{isa}"


def _prefill(
    model: VisionLanguageModel,
    inputs: dict[str, torch.Tensor],
    steering: Steering,
    spare: int,
    quantum: int = 1,
    risk: RiskSettings | None = None,
):
    """Embed and run a prepared batch through every layer into a new cache with ``spare`` free slots
    (its capacity rounded up to a multiple of ``quantum``). With ``risk`` the cache gets the risk
    branch's hidden image slots (``RISK_FIELD``) unless the steering's own branch is that branch.

    -> cache, the last position's hidden state # (B', hidden), its input embedding # (B', hidden),
    the position of each row's next token # (B', 1); B' may exceed the batch (VCD's copies).
    Tokens after the prompt are text: one position for all of M-RoPE's streams, the row's
    count of real tokens plus its delta (``VisionLanguageModel.positions``).
    """
    embeds, image_mask, valid = steering.embed(model, inputs)
    B, T, _ = embeds.shape
    capacity = -(-(T + spare) // quantum) * quantum
    cache = KVCache(
        len(model.layers), B, model.n_kv_heads, model.head_dim, capacity, dtype=embeds.dtype, device=embeds.device
    )
    steering.begin(cache, image_mask)
    if risk is not None and not steering.shares_branch(branch_layers(model, risk), risk.mask_rate, risk.seed):
        rows = inputs["input_ids"].shape[0]  # a method's extra copies (VCD's) need no branch
        hidden = draw_hidden(image_mask[:rows], risk.mask_rate, risk.seed)  # (rows, T)
        cache.add_field(RISK_FIELD, cache.n_kv_heads)[:, :rows, :, :T] = hidden[None, :, None].float()
    positions, deltas = model.positions(inputs, valid)  # (B, T) or M-RoPE's (3, B, T); (B, 1)
    hidden = forward(model, cache, embeds, positions, valid, steering)
    steering.after_prefill(cache)
    return cache, hidden[:, -1], embeds[:, -1], valid.sum(-1, keepdim=True) + deltas


def _check_window(model: VisionLanguageModel, prompt: int, max_new: int) -> None:
    if model.sliding_window is not None and prompt + max_new > model.sliding_window:
        raise ValueError(
            f"prompt ({prompt} tokens) plus --max-new-tokens ({max_new}) exceeds the model's sliding "
            f"window ({model.sliding_window}); vacap does not implement sliding-window attention"
        )


def branch_layers(model: VisionLanguageModel, risk: RiskSettings) -> int:
    """m of the risk branch: ``risk.layers``, at most the model's decoder layers."""
    return min(risk.layers, len(model.layers))


class RiskTape:
    """The risk signals (vacap/risk_signals.py) of a decode's first ``rows`` rows (the caller's;
    not a method's extra copies), kept on the device until their captions end.

    ``record``, once per step, writes each row's entropy, -log p and -margin of the step's raw
    logits, and, where the steering's own contrast branch is the risk branch
    (``Steering.shares_branch``), log p_branch of the chosen token from its logits. Otherwise
    ``finish`` runs the branch for all of a caption's steps at once when it ends
    (``branch_log_probs``). ``read`` brings rows' signals to the host in one transfer.
    """

    def __init__(
        self, model: VisionLanguageModel, risk: RiskSettings, steering: Steering, rows: int, max_new: int, device
    ) -> None:
        self.model, self.rows = model, rows
        self.layers = branch_layers(model, risk)
        self.shared = steering.shares_branch(self.layers, risk.mask_rate, risk.seed)
        # Per row and step: entropy, -log p_full(token), -margin, log p_branch(token).
        self.values = torch.zeros(rows, max_new, len(rs.NAMES), device=device)

    def record(self, at: int | torch.Tensor, logits: torch.Tensor, token: torch.Tensor, steering: Steering) -> None:
        """A step's signals: ``at`` the step (one for all rows) or each row's step # (rows,) long;
        logits # (B, V) the step's raw logits (``Steering.head``); token # (B,) the chosen ones."""
        logits, token = logits[: self.rows], token[: self.rows]
        parts = [rs.step_signals(logits, token)]  # (rows, 3)
        if self.shared:
            parts.append(rs.token_log_prob(steering.branch_logits()[: self.rows], token)[:, None])
        step = torch.cat(parts, -1) if len(parts) > 1 else parts[0]  # (rows, 3 or 4)
        columns = self.values[:, :, : step.shape[1]]
        if isinstance(at, int):
            columns[:, at] = step
        else:
            columns.scatter_(1, at[:, None, None].expand(-1, 1, step.shape[1]), step[:, None])

    def finish(
        self,
        cache: KVCache,
        rows: slice,
        first_input: torch.Tensor,
        first_position: torch.Tensor,
        tokens: torch.Tensor,
        steps: int,
    ) -> None:
        """The branch's log p(token) for the ``steps`` steps of the rows ``rows`` (of the cache
        and of the tape), whose caches end with these steps' tokens but the last (nothing
        after them). first_input # (N, hidden) and first_position # (N, 1): the input embedding
        and position of the prompt's last token; tokens # (N, >= steps) the tokens chosen."""
        if self.shared:
            return
        tokens = tokens[:, :steps]
        x = torch.cat([first_input[:, None], self.model.embed_tokens(tokens[:, :-1])], 1)  # (N, S, hidden)
        positions = first_position + torch.arange(steps, device=tokens.device)  # (N, S)
        self.values[rows, :steps, 3] = branch_log_probs(self.model, cache, rows, x, positions, tokens, self.layers)

    def read(self, rows: Sequence[int], lengths: Sequence[int]) -> list[dict[str, list[float]]]:
        """``Generated.signals`` of the rows ``rows`` for their first ``lengths`` tokens."""
        values = self.values[list(rows)]  # (n, max_new, 4)
        values[..., 3] = rs.log_ratio(values[..., 3], values[..., 1])
        host = values.tolist()  # the caption's one read-back of its signals
        return [
            {name: [step[k] for step in row[:n]] for k, name in enumerate(rs.NAMES)} for row, n in zip(host, lengths)
        ]


def branch_log_probs(
    model: VisionLanguageModel,
    cache: KVCache,
    rows: slice | torch.Tensor,
    x: torch.Tensor,
    positions: torch.Tensor,
    tokens: torch.Tensor,
    layers: int,
    block: int | None = None,
) -> torch.Tensor:
    """log p_branch(token) # (N, S) of S decode steps of the cache rows ``rows``, in one pass
    after the fact: the contrast branch of docs/VASPARSE.md section 3 (identity 9) with
    ``layers`` layers and the hidden image slots of ``RISK_FIELD``.

    x # (N, S, hidden): each step's current token's input embedding (the prompt's last token,
    then every generated token but the last); positions # (N, S) theirs; tokens # (N, S) the
    token each step chose. Step j's current token has its main copy in slot ``length - S + j``
    of every layer (the cache holds these steps' tokens but the last, nothing after them), but
    for step 0, whose copy (the prompt's last token) is the row's last valid slot up to there:
    a compacted layer (FastV, the KV budget) pads a row with fewer kept slots after them.

    At its step the branch ran that token through the first layers against the cache as it was
    then (the slots before that copy), minus the hidden image slots, plus its own key and value
    instead of the main pass's copy. The queries of different steps never see each other, so
    every step runs at once, ``block`` of them at a time (by default as many as keep a block's
    fp32 attention logits and LM-head logits under ``CHUNK_BYTES``): the same arithmetic as a
    branch in every step (in another order of summation), at the cost of one short prefill.
    """
    N, S, _ = x.shape
    widest = model.n_heads * max(cache.length[:layers])
    size = block or max(1, CHUNK_BYTES // (4 * N * max(widest, model.hf.config.text_config.vocab_size)))
    cos, sin = model.rotary_emb(x, positions)
    out = torch.empty(N, S, device=x.device)
    for start in range(0, S, size):
        stop = min(S, start + size)
        h = x[:, start:stop]
        for index, layer in enumerate(model.layers[:layers]):
            chunk = Chunk(start, stop, S, cache.length[index] - S + stop)
            rotary = cos[:, start:stop], sin[:, start:stop]
            h = h + _branch_attention(model, index, layer.input_layernorm(h), *rotary, cache, rows, chunk)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        out[:, start:stop] = rs.token_log_prob(model.lm_head(model.norm(h)), tokens[:, start:stop])
    return out


def _branch_attention(
    model: VisionLanguageModel,
    index: int,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCache,
    rows: slice | torch.Tensor,
    chunk: Chunk,
) -> torch.Tensor:
    """Layer ``index``'s attention of the branch queries of ``chunk`` (see ``branch_log_probs``;
    its last query's main copy is the chunk's last slot), h # (N, c, hidden) normed -> # (N, c,
    hidden). Each query sees the visible slots before its main copy, but the hidden ones, and
    its own key and value as one more slot; it writes nothing to the cache."""
    N, c, _ = h.shape
    H, D = model.n_heads, model.head_dim
    group = H // model.n_kv_heads
    attn = model.layers[index].self_attn
    q, k, v = projected(attn, h, cos, sin, D)  # (N, H, c, D), (N, Hkv, c, D) x2
    T = chunk.slots
    keys, values, valid = cache.view(index)
    keys, values, valid = keys[rows, :, :T], values[rows, :, :T], valid[rows, :T]
    hidden = cache.fields[RISK_FIELD][index, rows, :, :T] > 0.5  # (N, Hkv, T)
    seen = (valid[:, None] & ~hidden).repeat_interleave(group, dim=1)  # (N, H, T)
    slot = torch.arange(T, device=h.device)
    copy = slot[T - c :].expand(valid.shape[0], c)  # (N, c) each query's main copy
    if chunk.start == 0:  # step 0's: the row's last valid slot up to T - c (see branch_log_probs)
        last = torch.where(valid[:, : T - c + 1], slot[: T - c + 1], -1).amax(-1, keepdim=True)  # (N, 1)
        copy = torch.cat([last, copy[:, 1:]], 1)
    before = slot < copy[:, :, None]  # (N, c, T)
    logits = attention_logits(q, keys, model.scaling)  # (N, H, c, T)
    bias = cache.layer_bias(index)
    if bias is not None:
        logits = logits + bias[rows, :, None, :T].repeat_interleave(group, dim=1)
    logits = torch.where(seen[:, :, None] & before[:, None], logits, torch.finfo(logits.dtype).min)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (N, H, c, D)
    own = (q.float() * k.float()).sum(-1, keepdim=True) * model.scaling  # (N, H, c, 1)
    probs = torch.cat([logits, own], -1).softmax(-1)  # (N, H, c, T + 1)
    out = attention_output(probs[..., :T], values)  # (N, c, H * D)
    mine = (probs[..., T:] * v.float()).transpose(1, 2).reshape(N, c, H * D)
    return attn.o_proj(out + mine.to(out.dtype))


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    inputs: dict[str, torch.Tensor],
    steering: Steering,
    max_new_tokens: int,
    *,
    steps: str = "dynamic",
    sampling: Sampling = Sampling(),
    identities: Sequence[str] | None = None,
    risk: RiskSettings | None = None,
) -> list[Generated]:
    """Caption a prepared batch (``model.prepare``) under a method's ``steering``
    (``vacap.methods.steering_for``; a plain ``Steering()`` is greedy decoding).

    ``sampling`` chooses each token from the method's final logits (the default: argmax);
    ``identities`` (one per row, such as the image's sha256) key each row's draws, so that a
    row's tokens do not depend on its batch (without them, every row draws from the seed alone).

    ``steps`` (one of ``STEPS``) picks how decode steps run; "static" and "compiled" apply only
    where the steering allows it (see ``static_step``) and fall back to "dynamic" elsewhere.

    ``risk`` (``RiskSettings.of(config)``) adds each row's per-token risk signals
    (``Generated.signals``); they change no token.
    """
    steps = _steps_kind(model, steering, steps)
    rows = inputs["input_ids"].shape[0]
    max_new = max_new_tokens
    _check_window(model, inputs["input_ids"].shape[1], max_new)
    # One spare slot: the contrast branch writes its token there and rolls back.
    quantum = 1 if steps == "dynamic" else CAPACITY_QUANTUM
    cache, hidden, last_input, next_position = _prefill(model, inputs, steering, max_new + 1, quantum, risk)
    B, device = hidden.shape[0], hidden.device
    tape = RiskTape(model, risk, steering, rows, max_new, device) if risk else None
    first_input, first_position = last_input[:rows], next_position[:rows] - 1

    eos = torch.tensor(model.eos_ids, device=device)
    step_valid = torch.ones(B, 1, dtype=torch.bool, device=device)
    if steps == "dynamic":
        def decode(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return forward(model, cache, x, positions, step_valid, steering)
    else:
        decode = _static_decoder(model, cache, compiled=steps == "compiled")
    tokens = torch.full((B, max_new), model.pad_id, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    keys = torch.tensor([row_key(sampling.seed, i) for i in identities or [""] * rows], device=device)
    for step in range(max_new):
        logits = steering.head(model, hidden, last_input, next_position - 1)
        pick = functools.partial(
            choose, sampling=sampling, keys=keys, position=next_position[:rows] - 1, history=tokens[:rows, :step]
        )
        token = steering.next_token(logits, last_input, next_position - 1, pick)
        if tape:
            tape.record(step, logits, token, steering)
        token = torch.where(finished, model.pad_id, token)
        tokens[:, step] = token
        stop = ~finished & torch.isin(token, eos)
        lengths = torch.where(stop, step + 1, lengths)
        finished |= stop
        if finished.all() or step == max_new - 1:
            break
        last_input = model.embed_tokens(token)
        hidden = decode(last_input[:, None], next_position)[:, -1]
        next_position = next_position + 1

    counts = lengths[:rows].tolist()
    signals: list = [None] * rows
    if tape:
        # Every row ran every step (a stopped one on padding), so one pass serves them all.
        tape.finish(cache, slice(0, rows), first_input, first_position, tokens[:rows], step + 1)
        signals = tape.read(range(rows), counts)
    return [
        Generated(tokens[b, : counts[b]].tolist(), "eos" if finished[b] else "length", signals=signals[b])
        for b in range(rows)
    ]


@torch.no_grad()
def generate_stream(
    model: VisionLanguageModel,
    images: Iterable[tuple[Hashable, dict[str, torch.Tensor]]],
    new_steering: Callable[[], Steering],
    rows: int,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    identity: Callable[[Hashable], str] | None = None,
    risk: RiskSettings | None = None,
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
    ``sampling`` and ``identity(key)`` act as ``generate``'s ``sampling`` and ``identities``: a
    row's draws follow its image and its own step count, not the row it runs in. ``risk`` as in
    ``generate``: a caption's branch pass runs when it ends, before its row takes the next image.
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
            inputs = model.preparer.collate([prepared for _, prepared in group])
            _check_window(model, inputs["input_ids"].shape[1], max_new)
            small, h, x, p = _prefill(model, inputs, new_steering(), 0, risk=risk)
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
                draw_keys = torch.zeros(rows, dtype=torch.long, device=device)
                active = torch.zeros(copies * rows, dtype=torch.bool, device=device)
                eos = torch.tensor(model.eos_ids, device=device)
                tape = RiskTape(model, risk, running, rows, max_new, device) if risk else None
                first_input, first_position = hidden[:rows].clone(), position[:rows].clone()
            targets = free[: len(group)]
            into = [c * rows + r for c in range(copies) for r in targets]
            cache.make_room(2, splicing=small)
            cache.splice(small, range(small.batch), into)
            into_t = torch.tensor(into, device=device)
            hidden[into_t], last_input[into_t], position[into_t] = h, x, p
            # The caller's rows come first in ``into`` (copy 0).
            first_input[into_t[: len(group)]] = x[: len(group)]
            first_position[into_t[: len(group)]] = p[: len(group)] - 1
            count[into_t[: len(group)]] = 0
            names = [identity(key) if identity else "" for key, _ in group]
            draw_keys[into_t[: len(group)]] = torch.tensor([row_key(sampling.seed, n) for n in names], device=device)
            active[into_t] = True
            share = (time.perf_counter() - started) / len(group)
            for r, (key, _) in zip(targets, group):
                keys[r], seconds[r] = key, share
        busy = [r for r in range(rows) if keys[r] is not None]
        if not busy:
            return
        started = time.perf_counter()
        logits = running.head(model, hidden, last_input, position - 1)
        pick = functools.partial(
            choose, sampling=sampling, keys=draw_keys, position=position[:rows] - 1, history=tokens, count=count
        )
        token = running.next_token(logits, last_input, position - 1, pick)
        column = count.clamp(max=max_new - 1)
        tokens.scatter_(1, column[:, None], token[:rows, None])
        if tape:
            tape.record(column, logits, token, running)
        count = count + 1
        stop = active[:rows] & (torch.isin(token[:rows], eos) | (count == max_new))
        done = stop.nonzero().flatten().tolist()  # the step's one read-back from the device
        finished = []
        if done:
            finished = list(zip(done, token[done].tolist(), count[done].tolist(), tokens[done].tolist()))
            signals: list = [None] * len(done)
            if tape:
                # Each ending caption's own pass: rows end at different steps, their steps
                # sit at different slots.
                for r, _, n, _ in finished:
                    one = slice(r, r + 1)
                    tape.finish(cache, one, first_input[one], first_position[one], tokens[one], n)
                signals = tape.read(done, [n for _, _, n, _ in finished])
            finished = [(*row, signal) for row, signal in zip(finished, signals)]
            freed = [c * rows + r for c in range(active.shape[0] // rows) for r in done]
            active[freed] = False
            cache.valid[:, freed] = False
        if len(done) < len(busy):
            cache.make_room(2)
            last_input = model.embed_tokens(token)
            hidden = forward(model, cache, last_input[:, None], position, active[:, None], running)[:, -1]
            position = position + 1
        share = (time.perf_counter() - started) / len(busy)
        for r in busy:
            seconds[r] += share
        for r, end, n, row, signal in finished:
            stop = "eos" if end in model.eos_ids else "length"
            yield keys[r], Generated(row[:n], stop, round(seconds[r], 4), signals=signal)
            keys[r] = None

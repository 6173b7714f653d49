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
fp32 logits stay under ``CHUNK_BYTES``, and the hooks accumulate their statistics chunk by chunk.

With every mechanism off this is Hugging Face's Llama/Mistral/Qwen2 computation with its default
SDPA attention, so `--method greedy` gives the tokens of ``generate(do_sample=False, num_beams=1)``.

``generate`` decodes one static batch; ``generate_stream`` runs the same prefill and step over
a stream of images, a finished row taking the next image (continuous batching).
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

from vacap.cache import KVCache
from vacap.model import VisionLanguageModel
from vacap.sampling import Sampling, choose, row_key

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


@dataclass
class Generated:
    """One row's output: token ids (the stop token included when one was produced)."""

    tokens: list[int]
    stopped_by: str  # "eos" or "length"
    seconds: float = 0.0  # its share of the decode's wall time (``generate_stream`` only)


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


def query_chunks(t: int, T: int, batch: int, heads: int, size: int | None = None) -> list[Chunk]:
    """Split t new tokens, the last t of a T-slot cache, into chunks of at most ``size`` queries
    (by default as many as keep one chunk's fp32 logits under ``CHUNK_BYTES``) and of nearly equal
    sizes, so that no short last chunk pays a whole chunk's per-call overhead for a few rows."""
    if size is None:
        size = max(1, CHUNK_BYTES // (4 * batch * heads * T))
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
    ``hidden_slots`` and ``needs_attention``; where the latter says yes, ``layer_logits`` and
    ``observe`` around the softmax of every chunk of queries (in order; see ``Chunk``);
    ``after_prefill`` once, then ``head`` and ``next_token`` per step (the loop hands the latter
    its rule for choosing a token from final logits: argmax, or a seeded draw). Hooks must also be
    right where they were not asked for: a wrapper (``Diagnostics``) may need the eager path where
    its inner method does not.
    Under continuous batching one instance does the prefill of each admitted group, and another,
    given the running cache by ``attach`` instead of ``begin``, does every step; so all per-row
    state lives in the cache (fields), where splicing carries it.
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

    def observe(
        self, layer: int, probs: torch.Tensor, cache: KVCache, query_valid: torch.Tensor, chunk: Chunk
    ) -> None:
        """probs # (B, H, c, chunk.slots) as used; query_valid # (B, c) marks the chunk's real
        (non-padding) queries."""

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

    x # (B, t, hidden); positions # (B, t) absolute positions; valid # (B, t) real tokens.
    ``chunk_size`` caps the queries per chunk of written-out attention (default: ``CHUNK_BYTES``).
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
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x


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
    q = attn.q_proj(h).view(B, t, -1, D).transpose(1, 2)
    k = attn.k_proj(h).view(B, t, -1, D).transpose(1, 2)
    v = attn.v_proj(h).view(B, t, -1, D).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
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
    for chunk in query_chunks(t, T, B, H, chunk_size):
        kc, vc = keys[:, :, : chunk.slots], values[:, :, : chunk.slots]
        logits = attention_logits(q[:, :, chunk.rows], kc, model.scaling)
        logits = steering.layer_logits(index, logits, cache, chunk)
        if bias is not None:
            logits = logits + bias[..., : chunk.slots]
        # The dtype's minimum rather than -inf: a padding query with no visible key then gets a
        # harmless uniform row instead of NaN, as in Hugging Face's eager masks.
        logits = torch.where(chunk_mask(visible, chunk), logits, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1)
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
    base = type(steering).layer_logits is Steering.layer_logits and type(steering).observe is Steering.observe
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
    model: VisionLanguageModel, inputs: dict[str, torch.Tensor], steering: Steering, spare: int, quantum: int = 1
):
    """Embed and run a prepared batch through every layer into a new cache with ``spare`` free slots
    (its capacity rounded up to a multiple of ``quantum``).

    -> cache, the last position's hidden state # (B', hidden), its input embedding # (B', hidden),
    the position of each row's next token # (B', 1); B' may exceed the batch (VCD's copies).
    """
    embeds, image_mask, valid = steering.embed(model, inputs)
    B, T, _ = embeds.shape
    capacity = -(-(T + spare) // quantum) * quantum
    cache = KVCache(
        len(model.layers), B, model.n_kv_heads, model.head_dim, capacity, dtype=embeds.dtype, device=embeds.device
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
    *,
    steps: str = "dynamic",
    sampling: Sampling = Sampling(),
    identities: Sequence[str] | None = None,
) -> list[Generated]:
    """Caption a prepared batch (``model.prepare``) under a method's ``steering``
    (``vacap.methods.steering_for``; a plain ``Steering()`` is greedy decoding).

    ``sampling`` chooses each token from the method's final logits (the default: argmax);
    ``identities`` (one per row, such as the image's sha256) key each row's draws, so that a
    row's tokens do not depend on its batch (without them, every row draws from the seed alone).

    ``steps`` (one of ``STEPS``) picks how decode steps run; "static" and "compiled" apply only
    where the steering allows it (see ``static_step``) and fall back to "dynamic" elsewhere.
    """
    steps = _steps_kind(model, steering, steps)
    rows = inputs["input_ids"].shape[0]
    max_new = max_new_tokens
    _check_window(model, inputs["input_ids"].shape[1], max_new)
    # One spare slot: the contrast branch writes its token there and rolls back.
    quantum = 1 if steps == "dynamic" else CAPACITY_QUANTUM
    cache, hidden, last_input, next_position = _prefill(model, inputs, steering, max_new + 1, quantum)
    B, device = hidden.shape[0], hidden.device

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

    return [
        Generated(tokens[b, : lengths[b]].tolist(), "eos" if finished[b] else "length") for b in range(rows)
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
    row's draws follow its image and its own step count, not the row it runs in.
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
                draw_keys = torch.zeros(rows, dtype=torch.long, device=device)
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

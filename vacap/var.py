"""VAR, visual attention redistribution (Kang et al., "See What You Are Told: Visual Attention
Sink in Large Multimodal Models", ICLR 2025), as a ``Steering`` of vacap's decode loop.

Sink tokens are the tokens whose residual stream, RMS-normalised, is massive in the model's
sink dimensions; in image-centric attention rows a share 1 - p of the attention paid to sinks
moves to the image's other tokens, in proportion to what they already get. The definition,
with its rule for the sink dimensions and its identities, is docs/VAR.md.
"""

from __future__ import annotations

import logging
import weakref

import torch

from vacap.cache import KVCache
from vacap.config import DEFAULT_PROMPT, DecodeConfig
from vacap.decode import Chunk, Steering, forward
from vacap.model import VisionLanguageModel

log = logging.getLogger("vacap")
# Cache fields (docs/VAR.md, "Where it hooks"): per layer, 1 on a slot whose token is a sink in
# that layer; and 1 on image slots. Fields, so that continuous batching carries them.
SINK_FIELD = "var_sink"
IMAGE_FIELD = "var_image"
# The epsilon inside the RMS, as in LLaMA's RMSNorm and the paper's code.
RMS_EPS = 1e-6
# The least non-sink image mass the budget is divided by (the paper's code's clamp): a row with
# less gets only n / MIN_MASS of its budget, never more than all of it.
MIN_MASS = 1e-6


def sink_scores(x: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """x # (..., hidden) residual stream; dims # (hidden,) bool, the sink dimensions ->
    # (...) fp32: max over the sink dimensions of |x_d| / rms(x) (0 where there are none)."""
    x = x.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return (normed.abs() * dims).amax(-1)


def massive_dims(states: torch.Tensor, tau: float) -> torch.Tensor:
    """states # (n, hidden): one token's residual stream at the input of each layer VAR acts on ->
    # (hidden,) bool: the dimensions where it is massive, |x_d| / rms(x) > tau in some layer."""
    x = states.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return (normed.abs() > tau).any(0)


def redistribute(
    probs: torch.Tensor,
    sink: torch.Tensor,
    image: torch.Tensor,
    eligible: torch.Tensor | None,
    p: float,
    rho: float,
    floor: float,
) -> torch.Tensor:
    """One layer's redistribution (docs/VAR.md, equations 3 to 5).

    probs # (B, H, c, S) fp32 attention rows; sink, image # (B, S) bool slot flags; eligible
    # (B, c) bool the queries VAR may change (None: all). A row (b, h, i) is image-centric when
    its row b has a visual sink, its image mass m = sum_image a is at least ``floor`` and its
    non-sink share n / m (n = sum over image non-sinks) at least ``rho``. There every sink's
    weight becomes p * a_j and each image non-sink's a_j * (1 + (1 - p) * s / n), s the sinks'
    mass; other rows are returned unchanged. -> # (B, H, c, S).
    """
    non_sink = image & ~sink
    masks = torch.stack([image, non_sink, sink], -1).to(probs.dtype)  # (B, S, 3)
    mass = torch.matmul(probs, masks[:, None])  # (B, H, c, 3): image, non-sink image, sink mass
    m, n, s = mass.unbind(-1)
    chosen = (m >= floor) & (n >= rho * m) & (image & sink).any(-1)[:, None, None]
    if eligible is not None:
        chosen = chosen & eligible[:, None]
    gain = torch.where(chosen, (1 - p) * s / n.clamp(min=MIN_MASS), 0.0)  # (B, H, c)
    # One chunk-sized factor, built in place: the prefill's chunks bound its size (CHUNK_BYTES).
    factor = torch.where(chosen[..., None] & sink[:, None, None], p, 1.0)  # (B, H, c, S)
    factor.addcmul_(gain[..., None], non_sink[:, None, None].to(probs.dtype))
    return probs * factor


class _FirstToken(Steering):
    """Records the residual stream at each layer's input (``residual`` of the layer before)."""

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}

    def residual(self, layer: int, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        self.states[layer + 1] = x[0, 0]
        return x


# Sink dimensions found per loaded model (docs/VAR.md, section 2), by (tau, layers VAR acts in).
_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def model_sink_dims(model: VisionLanguageModel, tau: float, layers: range) -> torch.Tensor | None:
    """The model's sink dimensions # (hidden,) bool, or None where it has none: where the first token of vacap's prompt,
    alone at position 0, is massive at the input of a layer of ``layers`` (``massive_dims``).

    A causal model's first token sees only itself, so these are its states in every prompt that
    starts with it. Found once per loaded model: one token through the layers, and one read of
    how many there are (a model with none is told so, once).
    """
    found = _FOUND.setdefault(model.hf, {})
    key = (tau, layers.start, layers.stop)
    if key not in found:
        first = model.tokenizer(model.preparer.prompt_text(DEFAULT_PROMPT))["input_ids"][0]
        device = model.embed_tokens.weight.device
        x = model.embed_tokens(torch.tensor([[first]], device=device))
        cache = KVCache(len(model.layers), 1, model.n_kv_heads, model.head_dim, 1, dtype=x.dtype, device=device)
        record = _FirstToken()
        one = torch.ones(1, 1, dtype=torch.bool, device=device)
        forward(model, cache, x, torch.zeros(1, 1, dtype=torch.long, device=device), one, record)
        dims = massive_dims(torch.stack([record.states[layer] for layer in layers]), tau)
        found[key] = dims if bool(dims.any()) else None
        if found[key] is None:
            log.warning(
                "var: %s has no sink dimension (no hidden dimension where its first token's RMS-normalised "
                "state exceeds --var-tau %g in layers %d-%d), so VAR changes nothing and decodes as greedy; "
                "see docs/VAR.md",
                model.name, tau, layers.start, layers.stop - 1,
            )  # fmt: skip
    return found[key]


class VisualAttentionRedistribution(Steering):
    """VAR: sink flags per layer from the prefill's residual stream, redistribution in every
    attention row of layers ``var_start_layer`` to the one before the last (docs/VAR.md)."""

    def __init__(self, model: VisionLanguageModel, config: DecodeConfig) -> None:
        self.config = config
        n_layers = len(model.layers)
        self.layers = range(config.var_start_layer, n_layers - 1)
        self.active = config.var_p < 1 and len(self.layers) > 0
        hidden = model.embed_tokens.weight.shape[1]
        if config.var_dims:
            if max(config.var_dims) >= hidden:
                raise ValueError(f"var_dims must be below the model's hidden size {hidden}, got {config.var_dims}")
            self.dims = torch.zeros(hidden, dtype=torch.bool, device=model.embed_tokens.weight.device)
            self.dims[list(config.var_dims)] = True
        elif self.active:
            self.dims = model_sink_dims(model, config.var_tau, self.layers)
            # Without sink dimensions nothing can be a sink: the fused path, greedy's tokens exactly.
            self.active = self.dims is not None

    def begin(self, cache: KVCache, image_mask: torch.Tensor) -> None:
        self.cache = cache
        if not self.active:
            return
        T = image_mask.shape[1]
        cache.add_field(SINK_FIELD, 1)
        cache.add_field(IMAGE_FIELD, 1, shared=True)[..., :T] = image_mask[None, :, None].float()
        # The prefill changes only the queries after the image (the paper's code): its last slot.
        slots = torch.arange(T, device=image_mask.device)
        self.last_image = torch.where(image_mask, slots, -1).amax(-1)  # (B,)

    def attach(self, cache: KVCache) -> None:
        self.cache = cache

    def needs_attention(self, layer: int, prefill: bool) -> bool:
        return self.active and layer in self.layers

    def residual(self, layer: int, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        # Layer l's sinks are the tokens massive in its input, the output of layer l - 1; only
        # the prompt's tokens are ever sinks (generated ones are not looked at).
        if self.active and prefill and layer + 1 in self.layers:
            end = self.cache.length[layer]
            start = end - x.shape[1]
            sink = (sink_scores(x, self.dims) > self.config.var_tau) & self.cache.valid[layer, :, start:end]
            self.cache.fields[SINK_FIELD][layer + 1, :, 0, start:end] = sink.float()
        return x

    def layer_probs(self, layer: int, probs: torch.Tensor, cache: KVCache, chunk: Chunk) -> torch.Tensor:
        if not (self.active and layer in self.layers):
            return probs
        S, c = chunk.slots, chunk.stop - chunk.start
        sink = cache.fields[SINK_FIELD][layer, :, 0, :S] > 0.5
        image = cache.fields[IMAGE_FIELD][0, :, 0, :S] > 0.5
        eligible = None
        if chunk.prefill:
            queries = torch.arange(S - c, S, device=probs.device)
            eligible = queries > self.last_image[:, None]  # (B, c)
        cfg = self.config
        return redistribute(probs, sink, image, eligible, cfg.var_p, cfg.var_rho, cfg.var_image_floor)

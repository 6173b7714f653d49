"""VISTA (Li et al., ICML 2025): a visual steering vector and self-logits augmentation.

The definition is docs/VISTA.md. Two mechanisms, each off at 0:

- the visual steering vector (VSV, strength ``vista_lambda``): per row and layer, the residual
  stream at the prompt's last token with the image minus the same without the image tokens,
  both from unsteered prefills; every layer's MLP output is then turned towards it, its norm kept;
- self-logits augmentation (SLA, weight ``vista_gamma``): the next-token logits mixed with the
  logits of a window of late layers (the final norm and LM head applied to their outputs).

Per-row state lives in the cache's ``rows`` (the vector, the window's running sum), so that
continuous batching carries it with its row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vacap.cache import KVCache
from vacap.config import DecodeConfig
from vacap.decode import Steering, forward
from vacap.model import VisionLanguageModel

VECTOR = "vista_vector"
WINDOW = "vista_window"


def window(n_layers: int, start: float, end: float) -> range:
    """The SLA window as 0-based layer indices: the layers l (1-based) with start <= l / L <= end,
    at least one, and not the last layer (whose logits are the final ones) unless it is the only
    one. On 32 layers the defaults 25/32 and 30/32 give layers 25-30 (indices 24-29)."""
    first = math.ceil(start * n_layers - 1e-9)
    last = min(max(math.floor(end * n_layers + 1e-9), first), max(n_layers - 1, 1))
    return range(min(first, last) - 1, last)


def steer(m: torch.Tensor, direction: torch.Tensor, lam: float) -> torch.Tensor:
    """One layer's MLP output m # (B, t, hidden) turned towards its row's unit vector v^ =
    direction # (B, hidden) fp32 (docs/VISTA.md eq. 2): m' = |m| normalize(m^ + lam (1 +
    relu(cos(m, -v))) v^), in m's dtype. A zero direction leaves m as it is (up to rounding)."""
    x = m.float()
    norm = x.norm(dim=-1, keepdim=True)
    unit = x / norm.clamp(min=1e-12)
    v = direction[:, None]  # (B, 1, hidden)
    weight = 1 - (unit * v).sum(-1, keepdim=True).clamp(max=0)  # 1 + relu(cos(m, -v))
    return (F.normalize(unit + lam * weight * v, dim=-1) * norm).to(m.dtype)


def text_only(embeds: torch.Tensor, image_mask: torch.Tensor, valid: torch.Tensor):
    """The prompts without their images: embeds # (B, T, hidden), image_mask and valid # (B, T)
    -> embeds # (B, T', hidden), valid # (B, T'): each row's valid non-image slots in order,
    left padded to the longest such row (one host read of that length)."""
    text = valid & ~image_mask
    width = int(text.sum(-1).max())
    # A stable sort puts each row's text slots last, in order; the slots before them pad it.
    order = text.int().argsort(dim=-1, stable=True)[:, -width:]  # (B, T')
    return embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1])), text.gather(1, order)


def last_states(
    model: VisionLanguageModel, embeds: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The residual stream after every layer at the last position of a left-padded batch, from
    a plain prefill into a cache of its own: embeds # (B, T, hidden), valid # (B, T), positions
    # (B, T) or M-RoPE's (3, B, T) (default: counted over valid slots, a text prompt's) -> # (L,
    B, hidden) fp32."""
    B, T, _ = embeds.shape
    cache = KVCache(
        len(model.layers), B, model.n_kv_heads, model.head_dim, T, dtype=embeds.dtype, device=embeds.device
    )
    recorder = _LastStates()
    if positions is None:
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    forward(model, cache, embeds, positions, valid, recorder)
    return torch.stack(recorder.states)


class _LastStates(Steering):
    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []

    def residual(self, layer: int, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        self.states.append(x[:, -1].float())
        return x


def visual_vector(
    model: VisionLanguageModel, embeds: torch.Tensor, image_mask: torch.Tensor, valid: torch.Tensor,
    positions: torch.Tensor,
):  # fmt: skip
    """The VSV of each row (docs/VISTA.md eq. 1) # (B, L, hidden) fp32: the last token's residual
    stream after each layer with the image (at the prompt's own positions, M-RoPE's on Qwen2-VL)
    minus without it."""
    positive = last_states(model, embeds, valid, positions)
    negative = last_states(model, *text_only(embeds, image_mask, valid))
    return (positive - negative).transpose(0, 1).contiguous()


class VISTA(Steering):
    """The steering vector on every layer's MLP output, SLA on the logits (docs/VISTA.md)."""

    def __init__(self, model: VisionLanguageModel, config: DecodeConfig) -> None:
        self.model = model
        self.lam, self.gamma = config.vista_lambda, config.vista_gamma
        self.window = window(len(model.layers), config.vista_window_start, config.vista_window_end)

    def embed(self, model: VisionLanguageModel, inputs: dict[str, torch.Tensor]):
        embeds, image_mask, valid = super().embed(model, inputs)
        if self.lam:
            self._vector = visual_vector(model, embeds, image_mask, valid, model.positions(inputs, valid)[0])
        return embeds, image_mask, valid

    def begin(self, cache: KVCache, image_mask: torch.Tensor) -> None:
        self.cache = cache
        if self.lam:
            # Eq. 2 reads only v's direction: normalised once here, not in every step.
            cache.rows[VECTOR] = F.normalize(self._vector, dim=-1)
            del self._vector
        if self.gamma:
            width = self.model.embed_tokens.embedding_dim
            cache.rows[WINDOW] = torch.zeros(cache.batch, width, device=cache.k.device)

    def attach(self, cache: KVCache) -> None:
        self.cache = cache

    def mlp_output(self, layer: int, m: torch.Tensor, prefill: bool) -> torch.Tensor:
        if not self.lam:
            return m
        return steer(m, self.cache.rows[VECTOR][:, layer], self.lam)

    def residual(self, layer: int, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        if self.gamma and layer in self.window:
            # Only the position that predicts the next token (the last: batches are left padded).
            h = self.model.norm(x[:, -1]).float()
            total = self.cache.rows[WINDOW]
            if layer == self.window.start:
                total.copy_(h)
            else:
                total.add_(h)
        return x

    def head(
        self, model: VisionLanguageModel, hidden: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        if not self.gamma:
            return super().head(model, hidden, token_input, position)
        # The LM head is linear: the mean of the window's logits is the head of their mean normed
        # state, so the window costs one more row of the head's product, not one per layer.
        mean = (self.cache.rows[WINDOW] / len(self.window)).to(hidden.dtype)
        both = model.lm_head(torch.cat([model.norm(hidden), mean])).float()
        z, z_window = both[: hidden.shape[0]], both[hidden.shape[0] :]
        return (1 - self.gamma) * z + self.gamma * z_window

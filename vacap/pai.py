"""PAI, "Paying More Attention to Image" (Liu, Zheng, Chen, ECCV 2024; arXiv 2407.21771).

Two mechanisms (docs/PAI.md is the contract):

- attention amplification: in every decoder layer from ``pai_start_layer`` on, the attention
  logits that the query predicting the next token gives to image slots become
  ``A + pai_alpha * |A|`` before the softmax;
- image-free guidance: the final logits are contrasted with those of the same prompt without its
  image tokens, ``gamma * log p - (gamma - 1) * log p_text`` on the plausible set, which is
  vacap's contrast ``(1 + alpha) z - alpha z'`` of log-probabilities with ``alpha = gamma - 1``.

The image-free prompt runs as extra batch rows (as VCD's noised copies): the same tokens with the
image slots invalid, so that its positions count its own tokens only, as the shorter prompt's do.
"""

from __future__ import annotations

from typing import Callable

import torch

from vacap import vasparse as vs
from vacap.cache import KVCache
from vacap.config import DecodeConfig
from vacap.decode import Chunk, Steering
from vacap.model import VisionLanguageModel

# The cache field marking image slots (1.0), shared with Diagnostics, which reads the same flags.
IMAGE_FIELD = "image"


def amplify(logits: torch.Tensor, image: torch.Tensor, alpha: float) -> torch.Tensor:
    """PAI's attention intervention on the chunk's last query (the one that predicts a token).

        logits  # (B, H, c, S) fp32 attention logits, before any mask
        image   # (B, 1 or H, S) bool, the image slots
        returns # (B, H, c, S): the last query's logits at image slots A + alpha * |A|, the rest as given
    """
    last = logits[:, :, -1]
    last = torch.where(image, last + alpha * last.abs(), last).unsqueeze(2)
    return last if logits.shape[2] == 1 else torch.cat([logits[:, :, :-1], last], 2)


def image_free(valid: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """valid, image_mask # (B, T) bool -> the valid slots of the prompt without its image # (B, T).

    The loop numbers positions over valid slots, so these rows get the positions of the shorter
    image-free prompt, and no query sees their image slots."""
    return valid & ~image_mask


def guided(z: torch.Tensor, z_text: torch.Tensor, alpha: float, apc_beta: float) -> torch.Tensor:
    """PAI's logit refinement with guidance gamma = 1 + alpha.

        z, z_text  # (B, V) logits with the image and of the image-free prompt
        returns    # (B, V) fp32: (1 + alpha) log p - alpha log p_text on the plausible set of z
                   #   (p >= apc_beta * max p), -inf elsewhere
    """
    plausible = vs.plausible_mask(z, apc_beta)
    return vs.contrast(z.float().log_softmax(-1), z_text.float().log_softmax(-1), alpha, plausible)


class PayAttentionToImage(Steering):
    """PAI as a steering: amplification in ``layer_logits``, guidance in ``next_token``.

    With guidance (``alpha`` > 0) rows ``rows:`` are the image-free copies of rows ``:rows``; they
    cost a second cache and a second forward per step. Without amplification (``pai_alpha`` 0) no
    per-layer hook acts, so the steps may run as ``static_step``.
    """

    def __init__(self, config: DecodeConfig) -> None:
        self.config = config
        self.amplifies = config.pai_alpha > 0
        self.guides = config.alpha > 0
        self.prefill_only_hooks = not self.amplifies

    def embed(self, model: VisionLanguageModel, inputs: dict[str, torch.Tensor]):
        embeds, image_mask, valid = super().embed(model, inputs)
        self.rows = embeds.shape[0]
        if not self.guides:
            return embeds, image_mask, valid
        # The copies hold no image: no image flags, so no amplification there either (as in PAI).
        copies = torch.zeros_like(image_mask)
        return (
            torch.cat([embeds, embeds]),
            torch.cat([image_mask, copies]),
            torch.cat([valid, image_free(valid, image_mask)]),
        )

    def begin(self, cache: KVCache, image_mask: torch.Tensor) -> None:
        if self.amplifies:
            # A field, so that splicing into a running batch carries the flags with their slots.
            cache.add_field(IMAGE_FIELD, 1, shared=True)[..., : image_mask.shape[1]] = image_mask[None, :, None].float()

    def attach(self, cache: KVCache) -> None:
        self.rows = cache.batch // (2 if self.guides else 1)

    def needs_attention(self, layer: int, prefill: bool) -> bool:
        return self.amplifies and layer >= self.config.pai_start_layer

    def layer_logits(self, layer: int, logits: torch.Tensor, cache: KVCache, chunk: Chunk) -> torch.Tensor:
        if not (self.amplifies and layer >= self.config.pai_start_layer and chunk.last):
            return logits
        image = cache.fields[IMAGE_FIELD][0, :, :, : chunk.slots] > 0.5  # (B, 1, S)
        return amplify(logits, image, self.config.pai_alpha)

    def next_token(
        self, logits: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor, choose: Callable
    ) -> torch.Tensor:
        if not self.guides:
            return choose(logits)
        z, z_text = logits[: self.rows], logits[self.rows :]
        return choose(guided(z, z_text, self.config.alpha, self.config.apc_beta)).repeat(2)

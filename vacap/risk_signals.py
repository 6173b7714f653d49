"""Per-token risk signals: how unsure the model was of each token it wrote, and how much the
image mattered to it. Pure tensor functions; the decode loop (vacap/decode.py) calls them.

For every generated token, from the step that produced it:

- ``entropy``: entropy in nats of the model's next-token distribution p_full = softmax of the
  step's raw logits (fp32, temperature 1: before any contrast, penalty or sampling processor;
  for VASparse the logits of the sparse model, z_theta of docs/VASPARSE.md section 3);
- ``neg_logprob``: -log p_full(token);
- ``neg_margin``: -(log p_full of the top-1 token - log p_full of the top-2 token), <= 0;
- ``branch_log_ratio``: log p_branch(token) - log p_full(token), where p_branch is the softmax of
  the contract's contrast branch (section 3, identity 9) with m = min(``RiskSettings.layers``,
  the model's decoder layers) and ``RiskSettings.mask_rate`` of the image slots hidden, drawn
  per row from ``RiskSettings.seed`` (``vasparse.draw_hidden``), whatever the decoding method.
  Strongly positive: the token is likelier when the model sees less of the image. The branch
  sees the cache the method decodes with: after FastV or a KV budget, the compacted layers'
  slots (a cluster hidden where most of its members are), each with its KV bias.

All four are in nats, fp32, one per generated token including a stop token. They never change
a token: the branch has its own generator (a fresh one per row) and writes nothing the method
reads; VASparse's own branch is read, not run again, where it is this branch (contrast_layers
4, mask_rate 0.5, the same seed: ``Steering.shares_branch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vacap.config import DecodeConfig

# The order of the signals in the loop's buffers and the keys of ``Generated.signals``.
NAMES = ("entropy", "neg_logprob", "neg_margin", "branch_log_ratio")


@dataclass(frozen=True)
class RiskSettings:
    """The fixed branch of ``branch_log_ratio``: its decoder layers (capped at the model's),
    the fraction of image slots it hides and the seed of the hidden set."""

    seed: int = 0
    layers: int = 4
    mask_rate: float = 0.5

    @classmethod
    def of(cls, config: DecodeConfig) -> RiskSettings | None:
        """The settings for ``config`` (its seed), or None when it asks for no risk signals."""
        return cls(seed=config.seed) if config.risk else None


def step_signals(logits: Tensor, token: Tensor) -> Tensor:
    """Entropy, -log p and -margin of the chosen tokens under softmax(logits).

        logits    # (B, V) a step's raw next-token logits (any float dtype; computed in fp32)
        token     # (B,) long, the chosen tokens
        returns   # (B, 3) fp32: entropy (nats), -log p(token), -(log p top-1 - log p top-2)
    """
    logp = logits.float().log_softmax(-1)  # (B, V)
    # nansum: a -inf logit has p = 0 and contributes nothing (0 * -inf is NaN).
    entropy = -(logp.exp() * logp).nansum(-1, keepdim=True)  # (B, 1)
    top = logp.topk(2, dim=-1).values  # (B, 2)
    chosen = logp.gather(-1, token[:, None])  # (B, 1)
    return torch.cat([entropy, -chosen, top[:, 1:] - top[:, :1]], -1)


def token_log_prob(logits: Tensor, token: Tensor) -> Tensor:
    """log softmax(logits)[token], from the logsumexp alone (no (.., V) log-probabilities made).

        logits    # (..., V) any float dtype; computed in fp32
        token     # (...) long
        returns   # (...) fp32
    """
    z = logits.float()
    return z.gather(-1, token[..., None]).squeeze(-1) - z.logsumexp(-1)


def log_ratio(branch_log_prob: Tensor, neg_logprob: Tensor) -> Tensor:
    """``branch_log_ratio`` = log p_branch(token) - log p_full(token), from log p_branch(token)
    and ``neg_logprob`` = -log p_full(token) (same shapes, e.g. # (B, S))."""
    return branch_log_prob + neg_logprob

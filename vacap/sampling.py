"""How the next token is chosen from a step's final logits z: argmax, or a seeded draw.

z is what the decoding method ends with (docs/VASPARSE.md: VASparse's and VCD's contrasted
logits on the plausible set, the model's logits otherwise). The processors run in Hugging Face's
order: repetition penalty and n-gram bans (these apply to greedy too), then temperature and
top-p; temperature 0 takes the argmax of what the processors leave.

Both processors look at the tokens generated for the row so far, not at the prompt: Hugging
Face's look at the whole input, but a captioner's prompt is a chat template and hundreds of
image placeholders, and penalising "image" or "describe" because the instruction used them is
not what anyone asking for less repetition means.

A draw must depend only on the image, the settings and the seed, not on the batch it runs in
or on when its row was admitted. So there is no random state to carry: the uniform number of
a step is a hash of the row's key (the seed and the image's sha256, ``row_key``) and the
position of the token that produced z (``uniform``), and the draw inverts the cumulative
distribution in vocabulary order (``draw``). The same numbers come out on any device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vacap.config import DecodeConfig

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of a ``DecodeConfig`` (see there); the defaults are greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    seed: int = 0

    @classmethod
    def of(cls, config: DecodeConfig) -> Sampling:
        return cls(config.temperature, config.top_p, config.repetition_penalty, config.no_repeat_ngram, config.seed)

    @property
    def plain(self) -> bool:
        """The argmax of z untouched: exactly the greedy path, no float conversion on the way."""
        return self.temperature == 0 and self.repetition_penalty == 1 and self.no_repeat_ngram == 0


def row_key(seed: int, identity: str) -> int:
    """A row's 32-bit key for its draws: ``identity`` is what the row is (an image's sha256)."""
    digest = hashlib.sha256(f"{seed}\0{identity}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _mix(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of 32-bit values held in int64 # (B,) -> # (B,) in [0, 2**32).

    The multiplier is below 2**27, so no product leaves int64, and values stay non-negative,
    so ``>>`` is a logical shift: the same bits on every device.
    """
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def uniform(keys: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """keys # (B,) int64 row keys, counter # (B,) int64 (a step's position) -> # (B,) float64 in [0, 1),
    on a grid of 2**-24 (finer than any probability a float32 softmax resolves beside the top one)."""
    h = _mix(keys ^ _mix(counter & _MASK32))
    return (h >> 8).double() / 2**24


def generated_mask(history: torch.Tensor, count: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """history # (B, L) tokens, of which the first count # (B,) per row are real (all if None)
    -> # (B, V) bool: the tokens the row has generated."""
    real = torch.ones_like(history, dtype=torch.float32) if count is None else _real(history, count).float()
    # scatter_add, not scatter: repeated tokens with different flags must not race.
    return history.new_zeros(history.shape[0], vocab, dtype=torch.float32).scatter_add_(1, history, real) > 0


def _real(history: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """# (B, L) bool: which entries of history are generated tokens."""
    return torch.arange(history.shape[1], device=history.device) < count[:, None]


def penalize(z: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: z # (B, V) fp32, generated # (B, V) bool -> # (B, V).
    A generated token's logit is divided by the penalty where positive, multiplied where negative."""
    return torch.where(generated, torch.where(z > 0, z / penalty, z * penalty), z)


def ngram_bans(history: torch.Tensor, count: torch.Tensor | None, n: int, vocab: int) -> torch.Tensor:
    """# (B, V) bool: the tokens that would end an n-gram the row has already generated.

    history # (B, L) tokens, the first count # (B,) per row real (all if None).
    """
    B, L = history.shape
    if L < n:
        return torch.zeros(B, vocab, dtype=torch.bool, device=history.device)
    # Rows past the history's end (free rows of a stream keep counting) read it whole.
    count = torch.full((B,), L, device=history.device) if count is None else count.clamp(max=L)
    windows = history.unfold(1, n, 1)  # (B, L - n + 1, n)
    # The row's last n - 1 tokens; a row with fewer has no complete n-gram yet, so what they
    # are then does not matter.
    tail = history.gather(1, (count[:, None] - n + 1 + torch.arange(n - 1, device=history.device)).clamp(min=0))
    complete = torch.arange(L - n + 1, device=history.device) + n <= count[:, None]  # (B, L - n + 1)
    match = (windows[..., :-1] == tail[:, None]).all(-1) & complete
    banned = history.new_zeros(B, vocab, dtype=torch.float32).scatter_add_(1, windows[..., -1], match.float())
    return banned > 0


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p: probs # (B, V) -> # (B, V), zero outside each row's smallest set of most probable
    tokens whose probability reaches top_p (the most probable token always stays); not renormalised."""
    if top_p >= 1:
        return probs
    ordered, order = probs.sort(dim=-1, descending=True, stable=True)
    before = ordered.cumsum(-1) - ordered  # the mass of the tokens ahead of each
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, before < top_p)
    return probs * keep


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs # (B, V) non-negative, any scale; u # (B,) in [0, 1) -> tokens # (B,): the first token
    whose cumulative mass exceeds u times the row's total, so token j with probability p_j / total."""
    # float64: u * total then stays strictly below the total, so the token found has mass.
    cumulative = probs.double().cumsum(-1)
    target = (u * cumulative[:, -1])[:, None]
    return torch.searchsorted(cumulative, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def process(
    z: torch.Tensor, sampling: Sampling, history: torch.Tensor, count: torch.Tensor | None = None
) -> torch.Tensor:
    """The repetition penalty and n-gram bans on z # (B, V) -> fp32 # (B, V). A ban never takes a
    row's last finite logit (VASparse leaves only its plausible set finite): such a row keeps
    its z unbanned rather than having nothing to choose from."""
    z = z.float()
    V = z.shape[-1]
    if sampling.repetition_penalty != 1:
        z = penalize(z, generated_mask(history, count, V), sampling.repetition_penalty)
    if sampling.no_repeat_ngram:
        banned = z.masked_fill(ngram_bans(history, count, sampling.no_repeat_ngram, V), -torch.inf)
        z = torch.where(torch.isfinite(banned).any(-1, keepdim=True), banned, z)
    return z


def choose(
    z: torch.Tensor,
    sampling: Sampling,
    keys: torch.Tensor,
    position: torch.Tensor,
    history: torch.Tensor,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next tokens # (B,) from final logits z # (B, V).

    keys # (B,) int64 (``row_key``); position # (B, 1) the position of the token that produced z;
    history # (B, L) the tokens generated so far, the first count # (B,) of each row real (all if None).
    No host sync: every step runs the same device ops.
    """
    if sampling.plain:
        return z.argmax(-1)
    z = process(z, sampling, history, count)
    if sampling.temperature == 0:
        return z.argmax(-1)
    probs = nucleus(torch.softmax(z / sampling.temperature, -1), sampling.top_p)
    return draw(probs, uniform(keys, position[:, 0]))

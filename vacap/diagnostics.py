"""What the model looked at while it wrote each token, from attention the loop already computes.

``Diagnostics`` wraps any method's steering and records, for every generated token, the
attention of the query that produced it (the prompt's last token for the first one, then each
generated token in turn), in the layers from ``start_layer`` on, averaged over those layers and
all heads:

- image share: attention mass on image slots;
- sink share: attention mass on the first slot of the cache (usually BOS, the classic sink);
- sink heads: the fraction of heads whose first-slot attention exceeds 0.3, the sink ratio of
  "When Attention Sink Emerges" (Gu et al., 2024);
- kept fraction: the share of cached slots the method let the heads see (1 without selection);
- contrast changed: whether the chosen token differs from the argmax of the normal logits (under
  sampling, a draw other than that argmax counts too);
- its log-probability under the normal logits and, with ``tokens``, its image patch attention.

Patch attention covers the base image (the first grid of image tokens, which for anyres models
is the whole image resized; for Qwen2-VL the image's own grid after the 2 x 2 merge, as many rows
and columns as its size gives) and is recorded only while the cache holds the prompt's tokens in
order: after a KV budget or FastV compaction a slot no longer maps to one patch, so it is null.
"""

from __future__ import annotations

import base64
from typing import Callable, Sequence

import torch

from vacap.cache import KVCache
from vacap.decode import Chunk, Steering
from vacap.model import VisionLanguageModel
from vacap.text import token_texts

SINK_EPSILON = 0.3
MODES = ("none", "summary", "tokens")


def patch_grid_side(model: VisionLanguageModel) -> int | None:
    """The side of the tower's square patch grid; None for Qwen2-VL, whose grid follows each image."""
    if model.mrope:
        return None
    vision = model.hf.config.vision_config
    return vision.image_size // vision.patch_size


def grid_region(model: VisionLanguageModel) -> str:
    """Which part of the picture the base patch grid covers.

    Anyres models (NeXT, OneVision) see the whole image resized; LLaVA-1.5's CLIP processor
    resizes the short side and crops the centre square.
    """
    if getattr(model.hf.config, "image_grid_pinpoints", None):
        return "full"
    return "center" if getattr(model.processor.image_processor, "do_center_crop", False) else "full"


def encode_grid(grid: torch.Tensor) -> str:
    """A (rows, columns) attention map as base64 of uint8, scaled so that its maximum is 255."""
    peak = float(grid.max())
    scaled = (grid / peak * 255).round() if peak > 0 else torch.zeros_like(grid)
    return base64.b64encode(bytes(scaled.to(torch.uint8).flatten().tolist())).decode("ascii")


def decode_grid(text: str, grid: int | Sequence[int]) -> torch.Tensor:
    """Inverse of ``encode_grid`` for a record's ``grid``: a square's side, or [rows, columns]
    -> # (rows, columns) in [0, 1]."""
    rows, columns = (grid, grid) if isinstance(grid, int) else grid
    return torch.tensor(list(base64.b64decode(text)), dtype=torch.float32).view(rows, columns) / 255


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


class Diagnostics(Steering):
    """Records per-token attention statistics around an inner method's steering."""

    def __init__(self, inner: Steering, model: VisionLanguageModel, start_layer: int) -> None:
        self.inner, self.model = inner, model
        self.start_layer = start_layer
        self.n_layers = len(model.layers)
        self.side = patch_grid_side(model)
        self.region = grid_region(model)
        self.steps: list[dict[str, torch.Tensor]] = []
        self._step: dict[str, torch.Tensor] = {}

    # -- the loop's hooks: record, then let the inner method do its work ----------------------

    def embed(self, model, inputs):
        self.rows = inputs["input_ids"].shape[0]
        # Each row's (rows, columns) of patches: the tower's square, or Qwen2-VL's image's own.
        self.grids = model.image_grids(inputs) or [(self.side, self.side)] * self.rows
        return self.inner.embed(model, inputs)

    def begin(self, cache: KVCache, image_mask: torch.Tensor) -> None:
        self.inner.begin(cache, image_mask)
        self.cache = cache
        if "image" not in cache.fields:
            # Per layer, so that compaction (FastV's gather) carries the flags with their slots.
            cache.add_field("image", 1)[..., : image_mask.shape[1]] = image_mask[None, :, None].float()
        self._patch_slots = self._base_image_slots(image_mask[: self.rows])

    def needs_attention(self, layer: int, prefill: bool) -> bool:
        return layer >= self.start_layer or self.inner.needs_attention(layer, prefill)

    def hidden_slots(self, layer: int, cache: KVCache, prefill: bool) -> torch.Tensor | None:
        return self.inner.hidden_slots(layer, cache, prefill)

    def layer_logits(self, layer: int, logits: torch.Tensor, cache: KVCache, chunk: Chunk) -> torch.Tensor:
        out = self.inner.layer_logits(layer, logits, cache, chunk)
        if layer >= self.start_layer and not chunk.prefill:
            valid = cache.valid[layer, : self.rows, : out.shape[-1]]
            seen = (torch.isfinite(out[: self.rows, :, -1]) & valid[:, None]).sum(-1).float()  # (B, H)
            self._add("kept", (seen / valid.sum(-1, keepdim=True)).mean(1))
        return out

    def layer_probs(self, layer: int, probs: torch.Tensor, cache: KVCache, chunk: Chunk) -> torch.Tensor:
        return self.inner.layer_probs(layer, probs, cache, chunk)

    def mlp_output(self, layer: int, m: torch.Tensor, prefill: bool) -> torch.Tensor:
        return self.inner.mlp_output(layer, m, prefill)

    def residual(self, layer: int, x: torch.Tensor, prefill: bool) -> torch.Tensor:
        return self.inner.residual(layer, x, prefill)

    def observe(
        self, layer: int, probs: torch.Tensor, cache: KVCache, query_valid: torch.Tensor, chunk: Chunk
    ) -> None:
        self.inner.observe(layer, probs, cache, query_valid, chunk)
        # Only the query that produces the next token: the prefill's last one, each step's one.
        if layer < self.start_layer or not chunk.last:
            return
        p = probs[: self.rows, :, -1].float()  # (B, H, T): the query that produces the next token
        T = p.shape[-1]
        valid = cache.valid[layer, : self.rows, :T]
        image = self.cache.fields["image"]
        image = image[0 if image.shape[0] == 1 else layer, : self.rows, :, :T] > 0.5  # (B, 1|Hkv, T)
        image = image.repeat_interleave(p.shape[1] // image.shape[1], dim=1)
        first = valid.float().argmax(-1)  # first live slot of each row
        on_first = p.gather(2, first[:, None, None].expand(-1, p.shape[1], 1)).squeeze(2)  # (B, H)
        self._add("image", (p * image).sum(-1).mean(1))
        self._add("sink", on_first.mean(1))
        self._add("sink_heads", (on_first > SINK_EPSILON).float().mean(1))
        if self._patch_slots is not None:
            self._add("patches", p.mean(1).gather(1, self._patch_slots))

    def after_prefill(self, cache: KVCache) -> None:
        self.inner.after_prefill(cache)
        if cache.bias is not None or len(set(cache.length)) > 1:
            self._patch_slots = None  # compacted: slots no longer map to patches

    def head(self, model, hidden: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.inner.head(model, hidden, token_input, position)

    def shares_branch(self, layers: int, mask_rate: float, seed: int) -> bool:
        return self.inner.shares_branch(layers, mask_rate, seed)

    def branch_logits(self) -> torch.Tensor:
        return self.inner.branch_logits()

    def next_token(
        self, logits: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor, choose: Callable
    ) -> torch.Tensor:
        token = self.inner.next_token(logits, token_input, position, choose)
        z = logits[: self.rows].float()
        chosen = token[: self.rows]
        layers = self.n_layers - self.start_layer
        step = {name: value / layers for name, value in self._step.items()}
        step.setdefault("kept", torch.ones(self.rows, device=z.device))
        step["logprob"] = z.log_softmax(-1).gather(1, chosen[:, None]).squeeze(1)
        step["changed"] = (chosen != z.argmax(-1)).float()
        # One transfer per step, not per layer: on a GPU each .cpu() waits for the device.
        self.steps.append({name: value.cpu() for name, value in step.items()})
        self._step = {}
        return token

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._step[name] = self._step.get(name, 0) + value

    def _base_image_slots(self, image_mask: torch.Tensor) -> torch.Tensor | None:
        """Slot of every base-grid patch, row-major # (B, n) for the largest grid's n patches (a
        row with a smaller grid repeats its last slot after its own); None if a row has too few."""
        counts = torch.tensor([h * w for h, w in self.grids], device=image_mask.device)
        per_row = image_mask.sum(-1)
        if bool((per_row < counts).any()):
            return None
        # A CLS feature kept in front of the grid ("full" strategy on CLIP) is skipped.
        offset = 1 if int(per_row.min()) == int(counts.min()) + 1 else 0
        order = torch.arange(image_mask.shape[1], device=image_mask.device).expand_as(image_mask)
        slots = torch.where(image_mask, order, image_mask.shape[1]).sort(-1).values
        own = torch.arange(int(counts.max()), device=image_mask.device).clamp(max=counts[:, None] - 1)  # (B, n)
        return slots.gather(1, own + offset)

    # -- results ------------------------------------------------------------------------------

    def row(self, b: int, tokens: list[int], mode: str) -> dict:
        """Record fields for batch row ``b`` whose generated ids are ``tokens``."""
        steps = self.steps[: len(tokens)]
        image, sink, heads, kept, changed = (
            [float(step[name][b]) for step in steps] for name in ("image", "sink", "sink_heads", "kept", "changed")
        )
        rows, columns = self.grids[b]
        patches = [step["patches"][b][: rows * columns].view(rows, columns) for step in steps if "patches" in step]
        summary = {
            "image_attention": _mean(image),
            "sink_attention": _mean(sink),
            "sink_ratio": _mean(heads),
            "kept_fraction": _mean(kept),
            "contrast_changed": int(sum(changed)),
            # A square's side (LLaVA's records always held one), else [rows, columns].
            "grid": rows if rows == columns and not self.model.mrope else [rows, columns],
            "grid_region": self.region,
            "patch_attention": encode_grid(torch.stack(patches).mean(0))
            if len(patches) == len(steps) and patches
            else None,
        }
        fields = {"diagnostics": summary}
        if mode == "tokens":
            pieces = self.model.tokenizer.convert_ids_to_tokens(tokens)
            texts = token_texts(self.model.tokenizer, tokens)
            details = []
            for i, token in enumerate(tokens):
                grid = patches[i] if len(patches) == len(steps) else None
                top = None
                if grid is not None:
                    best = grid.flatten().topk(min(3, grid.numel())).indices
                    top = [[int(k) // columns, int(k) % columns] for k in best]
                details.append(
                    {
                        "token": texts[i],
                        "piece": pieces[i],
                        "logprob": round(float(steps[i]["logprob"][b]), 4),
                        "image_attention": round(image[i], 4),
                        "sink_attention": round(sink[i], 4),
                        "top_patches": top,
                        "contrast_changed": bool(changed[i]),
                        "patch_attention": None if grid is None else encode_grid(grid),
                    }
                )
            fields["token_diagnostics"] = details
        return fields

"""Decoding methods as ``Steering`` of the one decode loop: VASparse, VCD and FastV (PAI, VISTA, VAR: their own modules).

The formulas live in ``vacap/vasparse.py`` as pure functions; this module keeps their state
(statistics per cache slot, masks, the noised batch) and calls them at the loop's hooks.
The definition is docs/VASPARSE.md; choices it leaves open are noted where they are made.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from vacap import vasparse as vs
from vacap.cache import KVCache
from vacap.config import DecodeConfig
from vacap.decode import RISK_FIELD, Chunk, Steering, forward
from vacap.model import VisionLanguageModel
from vacap.pai import PayAttentionToImage
from vacap.var import VisualAttentionRedistribution
from vacap.vista import VISTA


def steering_for(model: VisionLanguageModel, config: DecodeConfig) -> Steering:
    """Fresh per-batch state for ``config.method`` (its resolved settings)."""
    config = config.resolved()
    if config.method == "vcd":
        return NoisedImageContrast(config)
    if config.method == "fastv":
        return FastV(config)
    if config.method == "vasparse":
        return VASparse(model, config)
    if config.method == "vista":
        return VISTA(model, config)
    if config.method == "var":
        return VisualAttentionRedistribution(model, config)
    if config.method == "pai":
        return PayAttentionToImage(config)
    return Steering()


def _generator(config: DecodeConfig, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(config.seed)


def _per_query_head(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """# (B, 1 or Hkv, T) -> broadcastable to # (B, H, T)."""
    return x if x.shape[1] == 1 else x.repeat_interleave(n_heads // x.shape[1], dim=1)


class VASparse(Steering):
    """Visual-aware token selection, sink penalty, sparse visual contrast and the KV budget.

    Per-slot statistics live in the cache as fields so that compaction carries them: ``image``
    (1 for image slots), ``v`` (image-attention mass the slot's token gave in the last layer, for
    the saliency P) and ``colsum`` (running attention column sums, for the sink penalty, one per
    query head). Without a KV budget every layer holds the same tokens in the same slots, so
    ``image`` and ``v`` are stored once and P is computed once per step, not per layer.
    """

    def __init__(self, model: VisionLanguageModel, config: DecodeConfig) -> None:
        self.model, self.config = model, config
        self.n_layers, self.n_heads = len(model.layers), model.n_heads
        self.select = config.sparsity > 0
        self.sink = config.sink_beta > 0
        self.contrast = config.alpha > 0
        self.budget = config.kv_budget < 1
        self.phi_layers = config.contrast_layers if self.contrast else 0
        self.saliency = (self.select or self.budget) and config.lam > 0
        self._step_phat: torch.Tensor | None = None
        self._prompt_logits: dict[int, torch.Tensor] = {}

    def begin(self, cache: KVCache, image_mask: torch.Tensor) -> None:
        self.cache = cache
        T = image_mask.shape[1]
        if self.saliency or self.phi_layers:
            heads = cache.n_kv_heads if self.budget else 1
            cache.add_field("image", heads, shared=not self.budget)[..., :T] = image_mask[None, :, None].float()
        if self.saliency:
            cache.add_field("v", cache.n_kv_heads if self.budget else 1, shared=not self.budget)
        if self.sink:
            cache.add_field("colsum", self.n_heads)
        if self.phi_layers:
            # A field, not a mask of prompt positions, so that it follows its slots wherever the
            # cache moves them (splicing into a running batch, compaction).
            hidden = cache.add_field("hidden", cache.n_kv_heads if self.budget else 1, shared=not self.budget)
            hidden[..., :T] = self._draw_hidden(image_mask)[None, :, None].float()

    def attach(self, cache: KVCache) -> None:
        self.cache = cache

    def _draw_hidden(self, image_mask: torch.Tensor) -> torch.Tensor:
        """The contrast branch's hidden image slots # (B, T): one set per caption, drawn over the
        row's own image slots from a generator seeded for it alone, so that a caption does not
        depend on the batch it is decoded in (nor on its padding)."""
        return vs.draw_hidden(image_mask, self.config.mask_rate, self.config.seed)

    def _field(self, name: str, layer: int) -> torch.Tensor:
        """A field's live slots for a layer # (B, heads, T)."""
        value = self.cache.fields[name]
        return value[0 if value.shape[0] == 1 else layer, :, :, : self.cache.length[layer]]

    def needs_attention(self, layer: int, prefill: bool) -> bool:
        # P needs the image mass each token paid in the last layer; from start_layer on, the sink
        # needs every row, the budget the prompt's last logits, selection each step's logits.
        if self.saliency and layer == self.n_layers - 1:
            return True
        return layer >= self.config.start_layer and (self.sink or (self.budget if prefill else self.select))

    def layer_logits(self, layer: int, logits: torch.Tensor, cache: KVCache, chunk: Chunk) -> torch.Tensor:
        c = self.config
        if layer < c.start_layer:
            return logits
        if chunk.prefill:
            if self.budget and chunk.last:
                # A copy: a view would keep the chunk's whole logits alive until compaction.
                self._prompt_logits[layer] = logits[:, :, -1].clone()
            return logits
        if not (self.sink or self.select):
            return logits
        s = logits[:, :, 0]  # (B, H, T): one query per decode step
        valid = cache.valid[layer, :, : s.shape[-1]]
        parts, factor = self._step_parts(layer, valid)
        out = vs.penalise(s, factor) if self.sink else s
        if self.select:
            out = torch.where(vs.selection_keep(s, *parts), out, -math.inf)
        return out.unsqueeze(2)

    def _step_parts(self, layer: int, valid: torch.Tensor):
        """-> ``vs.selection_parts`` for this layer (None without selection) and its sink factor
        # (B, H, T) (None without the sink). Without a KV budget every layer of a step holds the
        same slots, and the column sums were written by earlier steps, so both are made once per
        step for every layer, in the step's first one."""
        c = self.config
        if self.budget or layer == c.start_layer:
            parts = None
            if self.select:
                phat = self._phat(layer, valid)
                parts = vs.selection_parts(phat, c.lam, valid, c.sparsity, valid.shape[-1] - 1)
            factor = None
            if self.sink:
                invalid = parts[0] if parts else vs.invalid_bias(valid)
                colsum = self._field("colsum", layer)
                if not self.budget:
                    # Every later layer at once: # (L', B, H, T). Their slot for this step's token
                    # is not written yet; its column sum is 0 until it is, as when they run.
                    colsum = self.cache.fields["colsum"][layer:, :, :, : colsum.shape[-1]]
                factor = vs.sink_factor(vs.step_sink_weights(colsum, invalid), c.sink_beta)
            if self.budget:
                return parts, factor
            self._parts, self._factors = parts, factor
        return self._parts, None if self._factors is None else self._factors[layer - c.start_layer]

    def _phat(self, layer: int, valid: torch.Tensor) -> torch.Tensor:
        """The scaled saliency Phat # (B, 1 or H, T); zeros when lam is 0 (the term then vanishes).

        Without a KV budget every layer holds the same slots, so it is computed once per step.
        """
        if not self.saliency:
            return torch.zeros_like(valid, dtype=torch.float32)[:, None]
        if self.budget:
            P = _per_query_head(vs.saliency(self._field("v", layer), valid), self.n_heads)
            return vs.scaled_saliency(P, valid)
        if layer == self.config.start_layer:
            self._step_phat = vs.scaled_saliency(vs.saliency(self._field("v", layer), valid), valid)
        return self._step_phat

    def observe(
        self, layer: int, probs: torch.Tensor, cache: KVCache, query_valid: torch.Tensor, chunk: Chunk
    ) -> None:
        if self.sink and layer >= self.config.start_layer:
            colsum = self._field("colsum", layer)[..., : chunk.slots]
            if probs.shape[2] == 1:  # a decode step: one pass instead of a product and a sum
                colsum.addcmul_(probs[:, :, 0], query_valid.to(probs.dtype)[:, :, None])
            else:
                colsum.add_(_received(probs, query_valid))
        if self.saliency and layer == self.n_layers - 1:
            image = _per_query_head(self._field("image", layer)[..., : chunk.slots], self.n_heads) > 0.5
            # A padding query's row is filler (which chunk holds it changes it): its v stays 0.
            mass = vs.image_attention_mass(probs, image) * query_valid
            self._record_new(self.cache.fields["v"], mass, chunk)

    def _record_new(self, field: torch.Tensor, value: torch.Tensor, chunk: Chunk) -> None:
        """Write a statistic of the chunk's tokens # (B, c) into their slots in every layer."""
        for layer in range(field.shape[0]):
            end = self.cache.length[layer] - chunk.total + chunk.stop
            field[layer, :, :, end - value.shape[1] : end] = value[:, None]

    def after_prefill(self, cache: KVCache) -> None:
        if self.budget:
            for layer in range(self.config.start_layer, self.n_layers):
                self._compact(layer)
            self._prompt_logits.clear()

    def _compact(self, layer: int) -> None:
        """Keep the top kv_budget of each KV head's slots; merge the rest into DPC-KNN clusters."""
        c, cache = self.config, self.cache
        k, v, valid = cache.view(layer)
        B, Hkv, T, D = k.shape
        group = self.n_heads // Hkv
        delta = vs.scores_with_scaled_saliency(self._prompt_logits[layer], self._phat(layer, valid), c.lam, valid)
        # A slot stays if any query head of its group wants it; NaN (a non-finite s) is wanted least.
        delta = delta.nan_to_num(nan=-math.inf).view(B, Hkv, group, T).amax(2)
        # The last prompt token is the query of the first step; like the current token under
        # selection, it is always kept (VASPARSE.md leaves this open).
        delta[:, :, -1] = math.inf
        rows = [self._compact_row(layer, b, delta[b], valid[b]) for b in range(B)]
        # Rows keep different numbers of slots; pad them to one width, the padding invalid.
        keys, values, bias, fields = zip(*rows)
        width = max(x.shape[1] for x in keys)
        new_valid = torch.stack([torch.arange(width, device=k.device) < x.shape[1] for x in keys])
        cache.rewrite(
            layer,
            _stack_padded(keys, width),
            _stack_padded(values, width),
            new_valid,
            bias=_stack_padded(bias, width),
            fields={name: _stack_padded([f[name] for f in fields], width) for name in cache.fields},
        )

    def _compact_row(self, layer: int, b: int, delta: torch.Tensor, valid: torch.Tensor):
        """One batch row: -> keys, values # (Hkv, T', D), bias # (Hkv, T'), fields {name: # (heads, T')}."""
        c, cache = self.config, self.cache
        slots = valid.nonzero().squeeze(1)  # (n,)
        keep_i, drop_i = vs.budget_split(delta[:, slots], c.kv_budget)
        keep, drop = slots[keep_i], slots[drop_i]  # (Hkv, k), (Hkv, d)
        k, v, _ = cache.view(layer)
        k, v = k[b], v[b]  # (Hkv, T, D)
        n_clusters = math.ceil(c.cluster_ratio * drop.shape[1] - 1e-9) if drop.shape[1] else 0
        fields = {name: self._field(name, layer)[b] for name in cache.fields}
        kept_fields = {name: f.gather(1, _index_for(keep, f.shape[0])) for name, f in fields.items()}
        if n_clusters == 0:
            return _take_slots(k, keep), _take_slots(v, keep), torch.zeros(keep.shape, device=k.device), kept_fields
        dropped_keys = _take_slots(k, drop)
        # One KV head at a time: DPC-KNN holds several (heads, d, d) matrices, and at 2.9k prompt
        # tokens all heads at once would raise the prefill's peak memory by a third. Heads are
        # independent groups, so the result is the same.
        assign = torch.cat([vs.dpc_knn(head[None].float(), n_clusters, c.knn) for head in dropped_keys])  # (Hkv, d)
        keys = vs.cluster_reduce(dropped_keys.float(), assign, n_clusters, "mean").to(k.dtype)
        values = vs.cluster_reduce(_take_slots(v, drop).float(), assign, n_clusters, "mean").to(v.dtype)
        # log(size): a cluster draws the attention its members would have drawn together.
        bias = vs.cluster_sizes(assign, n_clusters).float().log()
        merged = {}
        for name, f in fields.items():
            members = f.gather(1, _index_for(drop, f.shape[0]))
            member_assign = _index_for(assign, f.shape[0])
            reduced = vs.cluster_reduce(members, member_assign, n_clusters, "sum" if name == "colsum" else "mean")
            merged[name] = (reduced > 0.5).float() if name in ("image", "hidden", RISK_FIELD) else reduced
        return (
            torch.cat([_take_slots(k, keep), keys], 1),
            torch.cat([_take_slots(v, keep), values], 1),
            torch.cat([torch.zeros(keep.shape, device=k.device), bias], 1),
            {name: torch.cat([kept_fields[name], merged[name]], 1) for name in fields},
        )

    def head(
        self, model: VisionLanguageModel, hidden: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        if not self.contrast:
            return super().head(model, hidden, token_input, position)
        phi = token_input if not self.phi_layers else self._phi_hidden(token_input, position)
        # z_phi is only read on the plausible set, but gathering those LM-head rows needs the
        # set's size on the host: a sync every step. At decode batch sizes the head's cost is
        # reading its weights, so z_phi's rows ride along in the same product almost for free.
        both = model.lm_head(model.norm(torch.cat([hidden, phi])))
        self._z_phi = both[hidden.shape[0] :]
        return both[: hidden.shape[0]]

    def next_token(
        self, logits: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor, choose: Callable
    ) -> torch.Tensor:
        if not self.contrast:
            return choose(logits)
        plausible = vs.plausible_mask(logits, self.config.apc_beta)
        return choose(vs.contrast(logits, self._z_phi, self.config.alpha, plausible))

    def shares_branch(self, layers: int, mask_rate: float, seed: int) -> bool:
        # The branch of _phi_hidden, its hidden slots drawn by vs.draw_hidden (begin).
        c = self.config
        return self.phi_layers == layers and c.mask_rate == mask_rate and c.seed == seed

    def branch_logits(self) -> torch.Tensor:
        return self._z_phi

    def _phi_hidden(self, token_input: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The current token through the first contrast_layers layers with image slots hidden."""
        B = token_input.shape[0]
        ones = torch.ones(B, 1, dtype=torch.bool, device=token_input.device)
        out = forward(self.model, self.cache, token_input[:, None], position, ones, _Hide(), self.phi_layers)
        self.cache.drop_last(self.phi_layers)
        return out[:, 0]


class _Hide(Steering):
    """The contrast branch's view of the cache: hidden image slots and the step's own main slot."""

    def hidden_slots(self, layer: int, cache: KVCache, prefill: bool) -> torch.Tensor:
        field = cache.fields["hidden"]
        T = cache.length[layer]
        # The branch runs only below start_layer (config), where no compaction reorders slots,
        # so every KV head of a per-head field hides the same slots.
        mask = field[0 if field.shape[0] == 1 else layer, :, 0, :T] > 0.5  # (B, T)
        # Slot T-2 holds the main pass's copy of this very token; the branch has its own at T-1.
        mask[:, T - 2] = True
        return mask


def _received(probs: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """Attention each slot received from the real queries # (B, H, S), summed over them, as one
    product: probs # (B, H, c, S), query_valid # (B, c). Padding rows are not attention anyone paid."""
    return torch.matmul(query_valid.to(probs.dtype)[:, None, None], probs).squeeze(2)


def _take_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x # (Hkv, T, D), index # (Hkv, n) -> # (Hkv, n, D): each head its own slots."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _stack_padded(parts, width: int) -> torch.Tensor:
    """Stack per-row # (heads, n_b, ...) into # (B, heads, width, ...), zero-padding the slot axis."""
    return torch.stack([torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1])) for x in parts])


def _index_for(index: torch.Tensor, heads: int) -> torch.Tensor:
    """Slot index per KV head # (Hkv, n) -> per field head # (heads, n) (1, Hkv or H heads)."""
    if heads == index.shape[0]:
        return index
    if heads == 1:
        return index[:1]
    return index.repeat_interleave(heads // index.shape[0], dim=0)


class NoisedImageContrast(Steering):
    """VCD (Leng et al., CVPR 2024): contrast each row with a copy whose image is diffusion-noised.

    The copies are extra batch rows, so they cost a second cache and a second forward per step.
    """

    def __init__(self, config: DecodeConfig) -> None:
        self.config = config

    def embed(self, model: VisionLanguageModel, inputs: dict[str, torch.Tensor]):
        embeds, image_mask, valid = super().embed(model, inputs)
        pixels = inputs["pixel_values"]
        # Each image its own seeded noise, so that a caption does not depend on its batch.
        noised = torch.cat(
            [
                vs.diffusion_noise(x.float(), self.config.vcd_noise_step, _generator(self.config, pixels.device))
                for x in model.image_pixels(inputs)
            ]
        )
        noised_embeds, _ = model.embed({**inputs, "pixel_values": noised.to(pixels.dtype)})
        self.rows = embeds.shape[0]
        return torch.cat([embeds, noised_embeds]), image_mask.repeat(2, 1), valid.repeat(2, 1)

    def attach(self, cache: KVCache) -> None:
        self.rows = cache.batch // 2

    def next_token(
        self, logits: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor, choose: Callable
    ) -> torch.Tensor:
        z, z_noised = logits[: self.rows].float(), logits[self.rows :].float()
        plausible = vs.plausible_mask(z, self.config.apc_beta)
        return choose(vs.contrast(z, z_noised, self.config.alpha, plausible)).repeat(2)


class FastV(Steering):
    """FastV (Chen et al., ECCV 2024): after layer K, drop the least-attended image tokens.

    The ranking uses the attention of the K-th layer (index K-1), averaged over heads and the
    prompt's queries; layers from index K on never see the dropped slots, in the prefill (masked)
    or after it (compacted away). Outputs equal FastV's pruning of the hidden sequence; the
    prefill still computes the dropped tokens' own rows, which nobody reads.
    """

    # Ranking and masking happen in the prefill; the steps see a compacted cache and plain attention.
    prefill_only_hooks = True

    def __init__(self, config: DecodeConfig) -> None:
        self.config = config
        self.dropped: torch.Tensor | None = None

    def begin(self, cache: KVCache, image_mask: torch.Tensor) -> None:
        self.image_mask = image_mask

    def needs_attention(self, layer: int, prefill: bool) -> bool:
        return prefill and layer == self.config.fastv_layer - 1

    def observe(
        self, layer: int, probs: torch.Tensor, cache: KVCache, query_valid: torch.Tensor, chunk: Chunk
    ) -> None:
        if not (chunk.prefill and layer == self.config.fastv_layer - 1):
            return
        if chunk.start == 0:
            self._received = torch.zeros_like(self.image_mask, dtype=torch.float32)  # (B, T)
        self._received[:, : chunk.slots] += _received(probs, query_valid).mean(1)
        if chunk.last:
            valid = cache.valid[layer, :, : chunk.slots]
            # The prefill's real queries are its valid slots: this is the mean over them.
            mean = self._received / valid.sum(-1, keepdim=True)
            self.dropped = valid & ~vs.fastv_keep(mean, self.image_mask, valid, self.config.fastv_ratio)

    def hidden_slots(self, layer: int, cache: KVCache, prefill: bool) -> torch.Tensor | None:
        if prefill and self.dropped is not None and layer >= self.config.fastv_layer:
            return self.dropped
        return None

    def after_prefill(self, cache: KVCache) -> None:
        if self.dropped is None:
            return
        keep = cache.valid[0, :, : self.dropped.shape[1]] & ~self.dropped  # (B, T)
        width = int(keep.sum(-1).max())
        # Stable sort puts each row's kept slots first, in order; the rest pad the row.
        order = (~keep).float().argsort(dim=-1, stable=True)[:, :width]
        new_valid = keep.gather(1, order)
        index = order[:, None].expand(-1, cache.n_kv_heads, -1)
        for layer in range(self.config.fastv_layer, len(cache.length)):
            cache.gather(layer, index, new_valid)

"""vacap's KV cache: preallocated buffers written in place, one length per layer.

Layers share one buffer but not one length: compaction (the KV budget, FastV) can leave layers
with different numbers of slots. Slot order is causal order, so a new token always goes to slot
``length[l]``; slot index is NOT the token's position (positions are tracked by the decode loop).

Per-slot statistics that must follow their slot through compaction (image flags, saliency,
sink column sums) are registered as named fields and gathered together with keys and values.

Continuous batching splices freshly prefilled rows into a running cache (``splice``): a row's
slots are right-aligned to the layer's length, so every row's newest slot is the same slot and
one write per step serves all rows; the slots before a row's first token are invalid. ``trim``
gives back leading slots that no row uses any more.
"""

from __future__ import annotations

from typing import Sequence

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(n_layers, batch, capacity, dtype=torch.bool, device=device)
        # Additive logit per slot, only for cluster tokens (log of the cluster size); None = all zero.
        self.bias: torch.Tensor | None = None
        self.length = [0] * n_layers
        self.capacity = capacity
        self.fields: dict[str, torch.Tensor] = {}
        # Per-row state that is not per slot (a method's vector per row) # (B, ...): splicing
        # carries it with its row; compaction leaves it alone.
        self.rows: dict[str, torch.Tensor] = {}

    @classmethod
    def like(cls, other: KVCache, batch: int, capacity: int) -> KVCache:
        """An empty cache shaped like ``other`` (layers, heads, dtype, fields, bias) with its own
        number of rows and capacity."""
        L, _, Hkv, _, D = other.k.shape
        cache = cls(L, batch, Hkv, D, capacity, dtype=other.k.dtype, device=other.k.device)
        for name, field in other.fields.items():
            cache.add_field(name, field.shape[2], shared=field.shape[0] < L)
        for name, value in other.rows.items():
            cache.rows[name] = value.new_zeros(batch, *value.shape[1:])
        if other.bias is not None:
            cache._add_bias()
        return cache

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def _add_bias(self) -> None:
        L, B, H, T, _ = self.k.shape
        self.bias = torch.zeros(L, B, H, T, dtype=torch.float32, device=self.k.device)

    def _per_slot(self, layer: int) -> dict[str, tuple[torch.Tensor, int]]:
        """Every per-slot tensor of a layer by name: (tensor # (B, ...), its slot axis).

        Fields are named ``field:NAME`` (a field may be called ``v``). A field shared by all
        layers comes with layer 0 only: sharing requires that every layer holds the same slots,
        so moving it once moves it for all.
        """
        out = {"k": (self.k[layer], 2), "v": (self.v[layer], 2), "valid": (self.valid[layer], 1)}
        if self.bias is not None:
            out["bias"] = (self.bias[layer], 2)
        for name, field in self.fields.items():
            if field.shape[0] > 1 or layer == 0:
                out[f"field:{name}"] = (field[0 if field.shape[0] == 1 else layer], 2)
        return out

    def _move(self, layer: int, source: int, target: int, n: int) -> None:
        """Move the layer's slots [source, source + n) of every row to [target, target + n) and
        clear the slots they leave (zero, invalid)."""
        for tensor, axis in self._per_slot(layer).values():
            moved = tensor.narrow(axis, source, n).clone()
            tensor.narrow(axis, source, n).zero_()
            tensor.narrow(axis, target, n).copy_(moved)

    def trim(self, layer: int) -> int:
        """Drop the layer's leading slots that are invalid in every row; returns how many.

        Reads validity back from the device: call it when a layer nears its capacity, between
        steps, not in every step.
        """
        end = self.length[layer]
        used = self.valid[layer, :, :end].any(0)  # (T,)
        first = int(used.int().argmax()) if bool(used.any()) else end
        if first:
            self._move(layer, first, 0, end - first)
            self.length[layer] = end - first
        return first

    def grow(self, capacity: int) -> None:
        """Reallocate every per-slot buffer with a larger capacity, content kept."""

        def grown(x: torch.Tensor) -> torch.Tensor:
            shape = list(x.shape)
            axis = 3 if x.dim() > 3 else 2  # (L, B, heads, T[, D]) or valid's (L, B, T)
            shape[axis] = capacity - self.capacity
            return torch.cat([x, x.new_zeros(shape)], axis)

        self.k, self.v, self.valid = grown(self.k), grown(self.v), grown(self.valid)
        if self.bias is not None:
            self.bias = grown(self.bias)
        self.fields = {name: grown(field) for name, field in self.fields.items()}
        self.capacity = capacity

    def make_room(self, extra: int, splicing: KVCache | None = None) -> None:
        """Let every layer take ``extra`` more slots, after ``splicing`` is spliced in if given
        (``splice`` makes a layer as long as the longer of the two). When one would not fit,
        every layer is trimmed, then the buffers grow if that is not enough (rare: the scheduler
        gives the cache slack).

        Every layer, never one alone: a field shared by all layers moves with layer 0
        (``_per_slot``), so layer 0 trimmed and the others not would leave them on slots the
        field no longer describes. The need is counted again after trimming: a splice needs
        the source's slots however many trimming gave back.
        """

        def needed() -> int:
            theirs = splicing.length if splicing is not None else self.length
            return max(max(ours, source) for ours, source in zip(self.length, theirs)) + extra

        if needed() > self.capacity:
            for layer in range(len(self.length)):
                self.trim(layer)
        if needed() > self.capacity:
            self.grow(max(needed(), 2 * self.capacity))

    def splice(self, source: KVCache, rows: Sequence[int], into: Sequence[int]) -> None:
        """Copy ``source``'s rows ``rows`` into this cache's rows ``into``, clearing what those
        rows held before.

        Per layer the copied slots end at this layer's length (right-aligned), their earlier
        slots invalid; a longer source layer first shifts this layer's slots right. Keys,
        values, validity, bias and fields move together, and so does the rows' ``rows`` state;
        ``source`` has this cache's fields (``KVCache.like``). Make room first: a layer needs
        max(its length, the source's) slots.
        """
        src = torch.tensor(list(rows), device=self.k.device)
        dst = torch.tensor(list(into), device=self.k.device)
        for name, value in self.rows.items():
            value[dst] = source.rows[name][src] if name in source.rows else 0
        if source.bias is not None and self.bias is None:
            self._add_bias()
        for layer in range(len(self.length)):
            n = source.length[layer]
            if n > self.length[layer]:
                self._move(layer, 0, n - self.length[layer], self.length[layer])
                self.length[layer] = n
            start = self.length[layer] - n
            theirs = source._per_slot(layer)
            for name, (tensor, axis) in self._per_slot(layer).items():
                tensor[dst] = 0
                if name in theirs:
                    slots = (dst,) + (slice(None),) * (axis - 1) + (slice(start, start + n),)
                    tensor[slots] = theirs[name][0][src].narrow(axis, 0, n)

    def add_field(self, name: str, heads: int, *, shared: bool = False) -> torch.Tensor:
        """Register a per-slot fp32 statistic # (L, B, heads, capacity), heads in {1, Hkv, H}.

        ``shared`` stores one copy for all layers # (1, B, heads, capacity): right as long as no
        compaction makes a slot mean different tokens in different layers.
        """
        L, B, _, T, _ = self.k.shape
        self.fields[name] = torch.zeros(1 if shared else L, B, heads, T, device=self.k.device)
        return self.fields[name]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
        """Write new tokens after the layer's last slot.

        k, v: # (B, Hkv, t, D); valid: # (B, t)
        Returns the layer's keys, values # (B, Hkv, T, D) and valid # (B, T), T = new length.
        """
        start = self.length[layer]
        end = start + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} slots needed, {self.capacity} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        self.valid[layer, :, start:end] = valid
        self.length[layer] = end
        return self.view(layer)

    def view(self, layer: int):
        end = self.length[layer]
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], self.valid[layer, :, :end]

    def drop_last(self, n_layers: int) -> None:
        """Forget the newest slot of the first ``n_layers`` layers (a token written to peek, not keep)."""
        for layer in range(n_layers):
            self.length[layer] -= 1

    def layer_bias(self, layer: int) -> torch.Tensor | None:
        """# (B, Hkv, T) or None."""
        if self.bias is None:
            return None
        return self.bias[layer, :, :, : self.length[layer]]

    def rewrite(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        fields: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Replace a layer's whole content, e.g. after compaction.

        k, v: # (B, Hkv, T', D); valid: # (B, T'); bias: # (B, Hkv, T'); fields[name]: # (B, heads, T')
        Every slot from T' on is cleared (keys, values, bias and fields zero, invalid): a token
        appended there later must start from nothing, not from a dropped token's statistics.
        A field left out of ``fields`` is zero in the whole layer.
        """
        end = k.shape[2]
        self.k[layer, :, :, :end] = k
        self.v[layer, :, :, :end] = v
        self.k[layer, :, :, end:] = 0
        self.v[layer, :, :, end:] = 0
        self.valid[layer, :, :end] = valid
        self.valid[layer, :, end:] = False
        if bias is not None and self.bias is None:
            self._add_bias()
        if self.bias is not None:
            self.bias[layer, :, :, :end] = 0 if bias is None else bias
            self.bias[layer, :, :, end:] = 0
        self._check_per_layer_fields()
        for name, field in self.fields.items():
            field[layer] = 0
            if fields and name in fields:
                field[layer, :, :, :end] = fields[name]
        self.length[layer] = end

    def _check_per_layer_fields(self) -> None:
        shared = [name for name, field in self.fields.items() if field.shape[0] == 1 < len(self.length)]
        if shared:
            raise RuntimeError(f"fields shared by all layers cannot follow a per-layer compaction: {shared}")

    def gather(self, layer: int, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep the slots ``index`` # (B, Hkv, T') of a layer, in that order, with validity # (B, T').

        Heads may keep different slots. Fields with one head per query head follow their KV head.
        """
        k, v, _ = self.view(layer)
        D = k.shape[-1]
        bias = self.layer_bias(layer)
        self._check_per_layer_fields()
        fields = {name: _gather_slots(value[layer], index) for name, value in self.fields.items()}
        self.rewrite(
            layer,
            k.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, D)),
            v.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, D)),
            valid,
            bias=None if bias is None else bias.gather(2, index),
            fields=fields,
        )

    def write_at(self, layer: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token per row at a slot held on the device, in place.

        slot: # (1,) long; k, v: # (B, Hkv, 1, D). The host's ``length`` is the caller's to
        advance: the slot never has to be read back, so a compiled step keeps one shape and
        no host-device synchronisation. The write indexes the whole buffer (layer included)
        rather than a layer's view: torch.compile turns a write into a view of its input into
        a copy of the whole buffer, at every layer of every step.
        """
        at = (torch.full_like(slot, layer), slice(None), slice(None), slot)
        self.k[at] = k.permute(2, 0, 1, 3)  # indexed as (1, B, Hkv, D)
        self.v[at] = v.permute(2, 0, 1, 3)
        self.valid[at[0], :, slot] = True


def _gather_slots(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """value # (B, heads, T); index # (B, Hkv, T') -> # (B, heads, T')."""
    heads, kv_heads = value.shape[1], index.shape[1]
    if heads == 1:
        # Only valid when every head keeps the same slots (FastV); a compaction whose heads
        # differ (the KV budget) needs its fields registered per KV head.
        return value.gather(2, index[:, :1])
    return value.gather(2, index.repeat_interleave(heads // kv_heads, dim=1))

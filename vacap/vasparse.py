"""The pure tensor pieces of VASparse decoding, as defined in docs/VASPARSE.md.

Every function here takes tensors and returns tensors: no model, no cache, no state; the decode
loop owns those and calls these. Shapes: B batch rows, H query heads, Hkv KV heads, T cache slots
(always the last axis), V vocabulary, G independent groups (e.g. layer x KV head), N points of a
group; ``valid`` is a bool (B, T) mask of real cache slots (False for left padding and empty slots),
and every statistic (max, softmax, top-k) is taken over the valid slots of its own row, so rows may
hold different numbers of tokens. Statistics are computed in fp32 whatever the input dtype. Where
vacap departs from the paper (Zhuang et al., CVPR 2025): the two terms of the selection score
delta (Eq. 2) are each scaled to [0, 1] over the valid slots of their (row, head), s^2 by its
maximum and P min-max (revision 2 of the contract), so that ``lam`` weighs two numbers spanning
[0, 1] on every model (the paper leaves their scales open); counts such as ceil((1 - sparsity) * n)
are taken with a 1e-9 tolerance so float noise cannot add or drop a slot; DPC-KNN measures
distances divided by sqrt(D), as TCFormer does; and it ranks centres by log(rho) + log(distance),
the same order as rho * distance without the underflow of rho = exp(-large) that would tie every
point at zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Counts like ceil(0.3 * 10) must give 3 although (1 - 0.7) * 10 == 3.0000000000000004 in floats.
_COUNT_TOL = 1e-9


def _rank(key: Tensor, descending: bool) -> Tensor:
    """Position of every entry in a stable sort along the last axis (ties: lower slot first)."""
    return key.argsort(dim=-1, descending=descending, stable=True).argsort(-1)


def _slots(valid: Tensor, ndim: int) -> Tensor:
    """View a (B, T) mask as (B, 1, ..., 1, T) so that it broadcasts against an ndim tensor."""
    return valid.view(valid.shape[0], *([1] * (ndim - 2)), valid.shape[-1])


def _masked_softmax(x: Tensor, valid: Tensor) -> Tensor:
    """fp32 softmax over the valid slots, exactly 0 elsewhere (and 0 for a row with no valid slot)."""
    probs = x.float().masked_fill(~valid, -math.inf).softmax(-1)
    # An all-invalid row is NaN after the softmax; torch.where drops it.
    return torch.where(valid, probs, 0.0)


def _unit_peak(x: Tensor, valid: Tensor) -> Tensor:
    """Non-negative x divided by its max over valid slots; 0 on invalid slots and where the max is 0."""
    x = torch.where(valid, x, 0.0)
    peak = x.amax(-1, keepdim=True)
    return torch.where(peak > 0, x / peak, 0.0)


def _min_max(x: Tensor, valid: Tensor) -> Tensor:
    """(x - min) / (max - min) over valid slots; 0 on invalid slots and where x is constant."""
    low = torch.where(valid, x, math.inf).amin(-1, keepdim=True)
    high = torch.where(valid, x, -math.inf).amax(-1, keepdim=True)
    span = high - low
    return torch.where(valid & (span > 0), (x - low) / span, 0.0)


def scaled_saliency(saliency: Tensor, valid: Tensor) -> Tensor:
    """Phat, the saliency term of delta: P min-max scaled over the valid slots of its row (and head).

        saliency  # (B, T), (B, 1, T) or (B, H, T) visual saliency P
        valid     # (B, T) bool
        returns   # (B, 1 or H, T) fp32 in [0, 1]; 0 on invalid slots and where P is constant
    """
    if saliency.dim() == 2:
        saliency = saliency[:, None]
    return _min_max(saliency.float(), valid[:, None])


def selection_scores(logits: Tensor, saliency: Tensor, lam: float, valid: Tensor) -> Tensor:
    """Selection score delta of every cached slot (Eq. 2 with vacap's per-head scaling).

        logits    # (B, H, T) raw attention logits s = q.K / sqrt(d): no mask, no sink penalty
        saliency  # (B, T), (B, 1, T) or (B, H, T) visual saliency P; with GQA and per-KV-head P,
                  #   repeat it to the query heads first
        valid     # (B, T) bool
        returns   # (B, H, T) fp32: s^2 / max s^2 + lam * Phat, Phat = (P - min P) / (max P - min P),
                  #   extremes over the valid slots of each (row, head); -inf on invalid slots

    A term that cannot be scaled (all s zero, or P constant) contributes 0 rather than 0 / 0.
    """
    return scores_with_scaled_saliency(logits, scaled_saliency(saliency, valid), lam, valid)


def scores_with_scaled_saliency(logits: Tensor, phat: Tensor, lam: float, valid: Tensor) -> Tensor:
    """``selection_scores`` from an already scaled saliency # (B, 1 or H, T) (``scaled_saliency``):
    the decode loop scales P once per step and reuses it in every layer.

    A valid slot whose s is NaN or infinite gets delta NaN, and max s^2 is taken over the finite
    slots only (revision 2.1), so such a slot changes no other slot's delta; ``keep_mask`` ranks
    it below every finite one. A finite s whose square overflows float32 (|s| > 1.8e19) counts
    as infinite.
    """
    valid = valid[:, None]  # (B, 1, T)
    s2 = logits.float().square()
    finite = s2 < math.inf  # False for NaN and inf
    delta = _unit_peak(torch.where(finite, s2, 0.0), valid & finite) + lam * phat
    return delta.masked_fill(~finite, math.nan).masked_fill(~valid, -math.inf)


def keep_mask(delta: Tensor, sparsity: float, valid: Tensor, current: int) -> Tensor:
    """Which slots each head attends to: the top-k of delta, always including ``current``.

        delta     # (B, H, T) selection scores (any float dtype); NaN or infinite where s was
        valid     # (B, T) bool
        current   # slot of the token being processed (the same in every row; must be valid)
        returns   # (B, H, T) bool, exactly k True per (row, head), never on an invalid slot

    k = max(1, ceil((1 - sparsity) * n)) with n the row's number of valid slots, so sparsity 0
    keeps every valid slot. Keeping the k largest delta minimises Eq. 1 (the summed delta of the
    dropped slots) among the size-k sets that contain the current slot. A valid slot whose delta
    is not finite (its s was not: revision 2.1) ranks below every finite one, and such slots
    among themselves by slot, lower first, so they fill k only where the finite slots cannot.
    Exact ties of finite deltas at the k-th place are broken as ``top_k_mask`` breaks them.
    """
    n = valid.sum(-1)  # (B,)
    k = torch.ceil((1 - sparsity) * n.double() - _COUNT_TOL).long().clamp_min(1)
    forced = torch.zeros_like(valid)
    forced[:, current] = True
    valid, forced = valid[:, None], forced[:, None]  # (B, 1, T)
    delta = delta.float()
    finite = delta.abs() < math.inf
    # Sort key: the current slot first, then the finite deltas, then the others one below the
    # lowest finite delta (0 when every finite delta is positive, as scores are) in slot order,
    # the invalid slots last. With scores this is selection_key's key, bit for bit.
    low = torch.where(finite & valid, delta, 0.0).amin(-1, keepdim=True)
    key = torch.where(finite, delta, _bad_order(low, delta.shape[-1]))
    key = torch.where(valid, key, -math.inf).masked_fill(forced & valid, math.inf)
    # k can exceed n only when n == 0 (k >= 1), hence the & valid.
    return top_k_mask(key, k, _k_bound(sparsity, key.shape[-1])) & valid


def _bad_order(low: Tensor, T: int) -> Tensor:
    """The sort keys of valid slots with a non-finite s # (..., T): low - 1 - slot, below any
    finite delta >= low and distinct, so that every top-k, threshold or sorted, keeps the same
    ones (lower slots first)."""
    return low - 1 - torch.arange(T, dtype=torch.float32, device=low.device)


def _k_bound(sparsity: float, T: int) -> int:
    """The k that no row's k exceeds (n <= T), known from the shape alone: no value has to come
    back from the device."""
    return min(T, max(1, math.ceil((1 - sparsity) * T - _COUNT_TOL)))


def top_k_mask(key: Tensor, k: Tensor, k_max: int) -> Tensor:
    """The k_b largest entries of every (row, head) of row b.

        key       # (B, H, T) fp32
        k         # (B,) long, each in [1, k_max]
        k_max     # int <= T, a bound on k known on the host
        returns   # (B, H, T) bool, exactly k_b True in every (b, h)

    Exact ties at the k-th place are broken by the selection algorithm, deterministically for a
    given input and device.
    """
    # The decode step runs this in every selection layer. On a CPU torch.topk costs about as much
    # as sorting each row, and numpy's partition is cheaper still when it returns only the k-th
    # value (see _top_k_threshold). A CPU tensor's values already live on the host: reading them
    # syncs nothing.
    return _top_k_threshold(key, k) if key.device.type == "cpu" else _top_k_sorted(key, k, k_max)


def _top_k_sorted(key: Tensor, k: Tensor, k_max: int) -> Tensor:
    top = key.topk(k_max, dim=-1).indices  # (B, H, k_max), largest first: row b keeps its first k_b
    picked = (torch.arange(k_max, device=key.device) < k[:, None, None]).expand_as(top)
    return torch.zeros_like(key, dtype=torch.bool).scatter_(-1, top, picked)


def _top_k_threshold(key: Tensor, k: Tensor) -> Tensor:
    """CPU top-k: each (row, head) keeps what is >= its k-th largest value (numpy's introselect).

    On 128 rows of 620 slots the values alone took 0.41 ms where the indices (argpartition) and
    writing them into a mask took 1.06 ms.
    """
    values, counts = key.numpy(), k.numpy()
    # The rows of a batch nearly always share one k. In a profile of batch-1 steps, np.unique
    # took half as long as the partition of the 16 rows, in every selection layer.
    if (counts == counts[0]).all():
        return torch.from_numpy(_keep_largest(values, int(counts[0])))
    keep = np.empty(values.shape, dtype=bool)
    for n in np.unique(counts):
        keep[counts == n] = _keep_largest(values[counts == n], int(n))
    return torch.from_numpy(keep)


def _keep_largest(values: np.ndarray, n: int) -> np.ndarray:
    """values # (..., T) float -> # (..., T) bool: the n largest of every row (NaN counts as largest).

    Only a tie at the n-th value, or a NaN, keeps a number other than n by threshold; such rows
    are chosen again by index.
    """
    pivot = values.shape[-1] - n
    ordered = np.partition(values, pivot, axis=-1)
    kth = ordered[..., pivot : pivot + 1]
    chosen = values >= kth
    # The partition leaves only values <= the n-th below it, so the count is wrong exactly where
    # one of them equals it (a tie) or where a NaN, which it sorts last, was dropped. Reading
    # that off the partition is cheaper than counting the chosen slots.
    wrong = np.isnan(ordered[..., -1])
    if pivot > 0:
        wrong |= ordered[..., :pivot].max(-1) == kth[..., 0]
    if wrong.any():
        picks = np.argpartition(values[wrong], pivot, axis=-1)[..., pivot:]
        exact = np.zeros(picks.shape[:-1] + values.shape[-1:], dtype=bool)
        np.put_along_axis(exact, picks, True, axis=-1)
        chosen[wrong] = exact
    return chosen


def invalid_bias(valid: Tensor) -> Tensor:
    """valid # (B, T) bool -> # (B, 1, T) fp32: 0 on valid slots, -inf elsewhere (added, it masks)."""
    return torch.zeros(valid.shape, device=valid.device).masked_fill(~valid, -math.inf)[:, None]


def selection_parts(phat: Tensor, lam: float, valid: Tensor, sparsity: float, current: int):
    """What ``selection_keep`` needs that does not change between the layers of one step.

        phat      # (B, 1 or H, T) scaled saliency (``scaled_saliency``)
        valid     # (B, T) bool; current: the slot that is always kept
        returns   invalid # (B, 1, T) fp32: ``invalid_bias(valid)``
                  prior   # (B, 1 or H, T) fp32: lam * Phat + invalid, +inf on the current slot
                  floor   # (B, 1, T) fp32: the key of a slot whose s is not finite: -1 - slot on
                          #   valid slots (below every delta, which is >= 0 as lam is), -inf on
                          #   invalid ones, +inf on the current slot
                  k       # (B,) long: k_b = max(1, ceil((1 - sparsity) * n_b)) slots to keep
                  k_max   # int: the bound on k (``top_k_mask``)
    """
    invalid = invalid_bias(valid)
    now = torch.tensor([current], device=valid.device)
    prior = (lam * phat + invalid).index_fill(-1, now, math.inf)
    floor = (_bad_order(invalid.new_zeros(()), valid.shape[-1]) + invalid).index_fill(-1, now, math.inf)
    k = torch.ceil((1 - sparsity) * valid.sum(-1).double() - _COUNT_TOL).long().clamp_min(1)
    return invalid, prior, floor, k, _k_bound(sparsity, valid.shape[-1])


def selection_key(logits: Tensor, invalid: Tensor, prior: Tensor, floor: Tensor) -> Tensor:
    """The sort key of ``keep_mask(selection_scores(...))`` in a few passes.

    The decode loop runs this in every selection layer of every step, so the parts that stay
    the same across a step's layers come ready from ``selection_parts``. The key equals
    keep_mask's on every slot: delta on valid slots whose s is finite, bit for bit; ``floor``
    on those whose s is not (NaN, +-inf, or a square that overflows); -inf on invalid slots;
    +inf on the current one.

        logits    # (B, H, T) raw attention logits s
        invalid, prior, floor  from ``selection_parts``
        returns   # (B, H, T) fp32
    """
    s = logits.float()
    # invalid + s * s: adding 0 or -inf rounds nothing, fused multiply-add or not, so this is
    # s.square() + invalid bit for bit in one pass. Where s * s is not finite (and on invalid
    # slots) it becomes -inf, so that only finite slots set the peak.
    s2 = torch.addcmul(invalid, s, s).nan_to_num_(nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    # Clamped, not tested: when every finite s is 0, 0 / tiny is the 0 that _unit_peak gives.
    peak = s2.amax(-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
    # prior + s2 / peak is a delta >= 0 where s is finite and -inf where it is not, which the
    # maximum lifts to the floor; only the current slot can be NaN (inf - inf), and is kept.
    # (torch.fmax would pass over that NaN in one op, but costs twenty times as much on a CPU.)
    key = torch.addcdiv(prior, s2, peak).nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    return torch.maximum(key, floor)


def selection_keep(logits: Tensor, invalid: Tensor, prior: Tensor, floor: Tensor, k: Tensor, k_max: int) -> Tensor:
    """``keep_mask(selection_scores(...))``: the top-k of ``selection_key``.

        logits    # (B, H, T) raw attention logits s
        invalid, prior, floor, k, k_max  from ``selection_parts``
        returns   # (B, H, T) bool: the kept slots
    """
    return top_k_mask(selection_key(logits, invalid, prior, floor), k, k_max)


def sink_weights(colsum: Tensor, valid: Tensor) -> Tensor:
    """Sink weights w = softmax(c) of the running attention column sums (Eq. 5).

        colsum    # (B, H, T) c_i = attention received by slot i from every query so far
        valid     # (B, T) bool
        returns   # (B, H, T) fp32, sums to 1 per (row, head), 0 on invalid slots
    """
    return _masked_softmax(colsum, _slots(valid, colsum.dim()))


def step_sink_weights(colsum: Tensor, invalid: Tensor) -> Tensor:
    """``sink_weights`` where every row holds a valid slot, as a decode step's rows do (the
    current token's), in one pass fewer: no row's softmax can be all -inf, hence NaN.

        colsum    # (B, H, T), or (L, B, H, T) for L layers that hold the same slots
        invalid   # (B, 1, T) ``invalid_bias(valid)``
        returns   # colsum's shape, fp32, equal to sink_weights(colsum, valid) (per layer)
    """
    return (colsum.float() + invalid).softmax(-1)


def sink_factor(weights: Tensor, beta: float) -> Tensor:
    """Eq. 5 with s factored out: s' = (1 + beta) * s - beta * w * s = s * f, f = (1 + beta) - beta * w.

        weights   # (..., T) sink weights w from sink_weights
        returns   # same shape, fp32, in [1, 1 + beta]

    A decode step makes every layer's factor in one call, since they read only column sums that
    earlier steps wrote; each layer then pays one product (``penalise``).
    """
    return torch.rsub(weights.float(), 1 + beta, alpha=beta)


def penalise(logits: Tensor, factor: Tensor) -> Tensor:
    """Penalised logits s' = (1 + beta) * s - beta * w * s (Eq. 5), as s * ``sink_factor``.

        logits    # (B, H, T) or (B, H, Tq, T) attention logits s
        factor    # (B, H, T) from sink_factor
        returns   # same shape and dtype as logits (computed in fp32)

    The factor is at least 1, so masked logits (-inf) stay masked. With beta 0 the result equals
    the input bit for bit, but the caller skips the call altogether.
    """
    if logits.dim() == 4:
        factor = factor[:, :, None]  # (B, H, 1, T): one factor row for every query
    return (logits.float() * factor).to(logits.dtype)


def saliency(v: Tensor, valid: Tensor) -> Tensor:
    """Visual saliency P = softmax(v) over the valid slots (Eq. 3).

        v         # (B, T) or (B, Hkv, T) image-attention mass each cached token gave as a query
        valid     # (B, T) bool
        returns   # same shape as v, fp32, sums to 1 over the valid slots, 0 on invalid slots
    """
    return _masked_softmax(v, _slots(valid, v.dim()))


def image_attention_mass(probs: Tensor, image_slots: Tensor) -> Tensor:
    """Attention mass each query gave to image slots, averaged over heads (v of Eq. 3).

        probs        # (B, H, Tq, T) attention probabilities actually used
        image_slots  # (B, T) or (B, H, T) bool, True on slots holding image tokens
        returns      # (B, Tq) fp32: v_t = mean_h sum_{k image} probs[b, h, t, k]
    """
    image = image_slots if image_slots.dim() == 3 else image_slots[:, None]  # (B, H or 1, T)
    # A product, not a masked copy of probs: this runs on chunks of prefill attention.
    return torch.matmul(probs.float(), image[..., None].float()).squeeze(-1).mean(1)


def plausible_mask(logits: Tensor, apc_beta: float) -> Tensor:
    """Adaptive plausibility set: tokens with p(j) >= apc_beta * max p (softmax in fp32).

        logits    # (B, V) next-token logits z_theta
        returns   # (B, V) bool; never empty, the argmax is always plausible
    """
    probs = logits.float().softmax(-1)
    return probs >= apc_beta * probs.amax(-1, keepdim=True)


def contrast(z_theta: Tensor, z_phi: Tensor, alpha: float, plausible: Tensor) -> Tensor:
    """Contrastive logits (Eq. 4) restricted to the plausible set.

        z_theta    # (B, V) logits of the full (sparse) model
        z_phi      # (B, V) language-prior logits; only read on the plausible set, so it may hold
                   #   -inf, NaN or anything else outside it
        plausible  # (B, V) bool from plausible_mask(z_theta, apc_beta)
        returns    # (B, V) fp32: (1 + alpha) z_theta - alpha z_phi on the plausible set, else -inf
    """
    z = (1 + alpha) * z_theta.float() - alpha * z_phi.float()
    # torch.where selects, so NaN or inf computed outside the plausible set cannot leak.
    return torch.where(plausible, z, -math.inf)


def dpc_knn(x: Tensor, n_clusters: int, k: int) -> Tensor:
    """Density-peak clustering with k-nearest-neighbour density (DPC-KNN), per group.

        x         # (G, N, D) points (e.g. the dropped keys of one layer and KV head per group)
        returns   # (G, N) long cluster id in [0, n_clusters)

    Distances are Euclidean divided by sqrt(D). rho_i = exp(-mean squared distance to the k
    nearest other points) (k clipped to [1, N - 1]); dist_i = distance to the nearest denser point
    (density ties: the lower index is denser), the densest point taking the largest distance
    between any two points of its group (which makes it a centre); the n_clusters points
    with the largest rho * dist are the centres (ties: lower index); cluster c is the c-th centre
    in slot order; every point joins its nearest centre (ties: lower cluster id) and a centre
    always joins its own cluster.
    With N <= n_clusters every point is its own cluster (ids 0..N-1).
    """
    G, N, D = x.shape
    if N <= n_clusters:
        return torch.arange(N, device=x.device).expand(G, N).clone()
    # The exact pairwise form: the matmul shortcut is off by rounding, which can reorder ties.
    x = x.float()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(D)  # (G, N, N)
    self_loop = torch.eye(N, dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(self_loop, math.inf).topk(max(1, min(k, N - 1)), largest=False).values
    # log rho, because key distances are large enough for exp(-d^2) to underflow to 0.
    log_rho = -nearest.square().mean(-1)  # (G, N)
    rank = _rank(log_rho, descending=True)  # 0 = densest; a strict order even with equal rho
    denser = rank[:, None, :] < rank[:, :, None]  # (G, N, N): [g, i, j] = j is denser than i
    peak_dist = torch.where(denser, dist, math.inf).amin(-1)
    peak_dist = torch.where(rank == 0, dist.amax((-2, -1))[:, None], peak_dist)
    log_score = log_rho + peak_dist.log()  # log(rho * dist); -inf for a duplicate point
    centres = log_score.argsort(dim=-1, descending=True, stable=True)[:, :n_clusters].sort(-1).values
    to_centre = dist.gather(-1, centres[:, None, :].expand(G, N, n_clusters))  # (G, N, C)
    assign = to_centre.argmin(-1)
    # A centre that duplicates another (distance 0) would otherwise join the first one's cluster.
    ids = torch.arange(n_clusters, device=x.device).expand(G, n_clusters)
    return assign.scatter(-1, centres, ids)


def cluster_sizes(assign: Tensor, n_clusters: int) -> Tensor:
    """Number of members of every cluster.

        assign    # (G, N) long cluster ids in [0, n_clusters)
        returns   # (G, C) long
    """
    sizes = torch.zeros(assign.shape[0], n_clusters, dtype=torch.long, device=assign.device)
    return sizes.scatter_add_(1, assign, torch.ones_like(assign))


def cluster_reduce(x: Tensor, assign: Tensor, n_clusters: int, reduce: str) -> Tensor:
    """Sum or mean of the members of every cluster (an empty cluster gives 0).

        x         # (G, N, ...) per-point values (keys, values, column sums, image flags as float)
        assign    # (G, N) long cluster ids in [0, n_clusters)
        reduce    # "sum" or "mean"
        returns   # (G, C, ...) accumulated in fp32, returned in x's dtype (fp32 for non-float x)
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    G, N = assign.shape
    rest = x.shape[2:]
    # One index_add over the flattened (group, cluster) axis instead of a loop over groups.
    flat = (assign + n_clusters * torch.arange(G, device=assign.device)[:, None]).reshape(-1)
    total = torch.zeros(G * n_clusters, *rest, dtype=torch.float32, device=x.device)
    total = total.index_add_(0, flat, x.float().reshape(G * N, *rest)).view(G, n_clusters, *rest)
    if reduce == "mean":
        sizes = cluster_sizes(assign, n_clusters).clamp_min(1)
        total = total / sizes.view(G, n_clusters, *([1] * len(rest)))
    return total.to(x.dtype) if x.is_floating_point() else total


def budget_split(delta: Tensor, budget: float) -> tuple[Tensor, Tensor]:
    """Split n slots into the top ceil(budget * n) by delta and the rest (KV budget, section 4).

        delta     # (G, n) selection scores
        returns   # keep_idx (G, ceil(budget * n)) and drop_idx (G, n - that) long, each sorted
                  #   by slot index ascending so the cache keeps its order; ties keep lower slots,
                  #   and NaN (a slot whose s is not finite) ranks last
    """
    n = delta.shape[-1]
    n_keep = math.ceil(budget * n - _COUNT_TOL)
    # A NaN delta (a slot whose s is not finite) ranks below every other, as in keep_mask.
    order = delta.float().nan_to_num(nan=-math.inf).argsort(dim=-1, descending=True, stable=True)
    return order[..., :n_keep].sort(-1).values, order[..., n_keep:].sort(-1).values


def diffusion_noise(pixels: Tensor, step: int, generator: torch.Generator) -> Tensor:
    """VCD's forward diffusion: the image after ``step`` of 1000 noising steps.

        pixels    # (..., ) any shape, e.g. (B, 3, H, W) normalised pixel values
        step      # int in [0, 999]
        generator # torch.Generator on pixels.device; eps = torch.randn(pixels.shape, fp32)
        returns   # same shape and dtype as pixels:
                  #   sqrt(alpha_bar[step]) x + sqrt(1 - alpha_bar[step]) eps

    betas = sigmoid(linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5, alpha_bar = cumprod(1 - betas);
    the schedule is computed in fp64, the noise in fp32.
    """
    if not 0 <= step < 1000:
        raise ValueError(f"step must be in [0, 999], got {step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, 0)[step].item()
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32, device=pixels.device)
    return (math.sqrt(alpha_bar) * pixels.float() + math.sqrt(1 - alpha_bar) * eps).to(pixels.dtype)


def fastv_keep(received: Tensor, image_slots: Tensor, valid: Tensor, ratio: float) -> Tensor:
    """FastV pruning: drop the least-attended fraction of each row's image slots.

        received     # (B, T) average attention each slot received at layer K
        image_slots  # (B, T) bool
        valid        # (B, T) bool
        returns      # (B, T) bool keep mask: valid slots minus the floor(ratio * n_image) image
                     #   slots with the least received attention (ties: the lower slot drops)
    """
    image = image_slots & valid
    n_drop = torch.floor(ratio * image.sum(-1).double() + _COUNT_TOL).long()  # (B,)
    key = torch.where(image, received.float(), math.inf)
    dropped = image & (_rank(key, descending=False) < n_drop[:, None])
    return valid & ~dropped


def mask_image_slots(image_slots: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """Image slots to hide from the contrastive branch, a uniformly random subset per row.

        image_slots  # (B, T) bool
        generator    # torch.Generator on image_slots.device
        returns      # (B, T) bool, round(rate * n_image) True per row (round half to even, like
                     #   Python's round), only on image slots
    """
    n_hide = torch.round(rate * image_slots.sum(-1).double()).long()  # (B,)
    # The n smallest of i.i.d. uniforms are a uniformly random n-subset.
    noise = torch.rand(image_slots.shape, generator=generator, device=image_slots.device)
    key = torch.where(image_slots, noise, math.inf)
    return image_slots & (_rank(key, descending=False) < n_hide[:, None])


def draw_hidden(image_slots: Tensor, rate: float, seed: int) -> Tensor:
    """The contrast branch's hidden image slots, one set per row, each drawn alone.

        image_slots  # (B, T) bool
        returns      # (B, T) bool: ``mask_image_slots`` over the row's own image slots, with a
                     #   generator on image_slots.device seeded with ``seed`` for that row alone,
                     #   so that a row's set depends on neither its batch nor its padding

    Reads each row's image-slot count back from the device (once per row, in the prefill).
    VASparse's branch (contrast_layers > 0) and the risk signals' branch draw their sets here,
    so that the same seed and rate hide the same slots in both.
    """
    hidden = torch.zeros_like(image_slots)
    for b in range(image_slots.shape[0]):
        slots = image_slots[b].nonzero().squeeze(1)
        every = torch.ones(1, slots.shape[0], dtype=torch.bool, device=image_slots.device)
        generator = torch.Generator(device=image_slots.device).manual_seed(seed)
        pick = mask_image_slots(every, rate, generator)
        hidden[b, slots[pick[0]]] = True
    return hidden

"""vacap.vasparse against independent recomputations: hand-worked numbers, plain Python loops,
brute force over subsets and a plain numpy DPC-KNN. No expected value comes from the function
under test."""

from __future__ import annotations

import itertools
import math
from decimal import Decimal
from fractions import Fraction

import pytest
import torch
from helpers import numpy_dpc_knn

from vacap import vasparse as vs

DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.dtype)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected_k(sparsity: float, n: int) -> int:
    # Exact rational arithmetic: the float (1 - 0.7) * 10 is 3.0000000000000004.
    return max(1, math.ceil((1 - Fraction(str(sparsity))) * n))


def random_valid(g: torch.Generator, B: int, T: int, current: int) -> torch.Tensor:
    valid = torch.rand(B, T, generator=g) < 0.7
    valid[:, current] = True
    return valid


def plain_softmax(xs: list[float]) -> list[float]:
    peak = max(xs)
    exps = [math.exp(x - peak) for x in xs]
    return [e / sum(exps) for e in exps]


# 1-2. Selection ----------------------------------------------------------------------------------


def test_selection_scores_hand_worked():
    logits = torch.tensor([[[100.0, 2.0, -1.0, 0.0, 1.0]]])  # slot 0 is padding: its 100 is ignored
    sal = torch.tensor([[[0.9, 0.2, 0.4, 0.1, 0.4]]])
    valid = torch.tensor([[False, True, True, True, True]])
    # s^2 = 4, 1, 0, 1 -> /4 ; P = .2 .4 .1 .4 -> min-max (P - .1) / .3 = 1/3, 1, 0, 1 ; lam = 2
    want = [-math.inf, 1.0 + 2 / 3, 0.25 + 2.0, 0.0 + 0.0, 0.25 + 2.0]
    assert vs.selection_scores(logits, sal, 2.0, valid)[0, 0].tolist() == pytest.approx(want)


def test_selection_scores_all_zero_terms_give_zero_not_nan():
    zeros = torch.zeros(1, 2, 3)
    delta = vs.selection_scores(zeros, zeros, 1.0, torch.tensor([[False, True, True]]))
    assert delta.tolist() == [[[-math.inf, 0.0, 0.0]] * 2]


def test_constant_saliency_adds_nothing_however_large():
    # P = softmax(v) is often nearly flat: min-max scaling must not turn a constant into 1.
    logits = torch.tensor([[[3.0, -1.0, 2.0]]])
    flat = torch.full((1, 3), 0.3)
    delta = vs.selection_scores(logits, flat, 5.0, torch.ones(1, 3, dtype=torch.bool))
    assert delta[0, 0].tolist() == pytest.approx([1.0, 1 / 9, 4 / 9])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sal_shape", ["B,T", "B,1,T", "B,H,T"])
def test_selection_scores_scale_per_row_and_head(dtype, sal_shape):
    g = gen(1)
    B, H, T, lam = 3, 4, 7, 0.7
    logits = (3 * torch.randn(B, H, T, generator=g)).to(dtype)
    sal = torch.rand(B, H if sal_shape == "B,H,T" else 1, T, generator=g).to(dtype)
    if sal_shape == "B,T":
        sal = sal[:, 0]
    valid = torch.arange(T) >= torch.tensor([[0], [2], [5]])  # left padding, 7, 5 and 2 slots
    delta = vs.selection_scores(logits, sal, lam, valid)
    assert delta.dtype == torch.float32
    for b in range(B):
        idx = [i for i in range(T) if valid[b, i]]
        for h in range(H):
            s = [float(logits[b, h, i]) for i in range(T)]
            row = sal[b] if sal.dim() == 2 else sal[b, min(h, sal.shape[1] - 1)]
            p = [float(row[i]) for i in range(T)]
            ms = max(s[i] ** 2 for i in idx)
            low, high = min(p[i] for i in idx), max(p[i] for i in idx)
            want = [s[i] ** 2 / ms + lam * (p[i] - low) / (high - low) if i in idx else -math.inf for i in range(T)]
            assert delta[b, h].tolist() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsity_zero_keeps_every_valid_slot_like_no_selection(dtype):
    g = gen(2)
    B, H, T = 3, 4, 9
    logits = torch.randn(B, H, T, generator=g).to(dtype)
    valid = torch.arange(T) >= torch.tensor([[0], [4], [8]])
    delta = vs.selection_scores(logits, torch.rand(B, 1, T, generator=g), 1.0, valid)
    keep = vs.keep_mask(delta, 0.0, valid, current=T - 1)
    assert torch.equal(keep, valid[:, None].expand(B, H, T))
    # Attention over the kept set is then bitwise the plain padded attention.
    selected = logits.float().masked_fill(~keep, -math.inf).softmax(-1)
    plain = logits.float().masked_fill(~valid[:, None], -math.inf).softmax(-1)
    assert torch.equal(selected, plain)


def eq1_brute_force(s, p, lam, idx, current, k):
    """The kept set minimising Eq. 1: the summed scaled cost of the dropped slots."""
    ms, low, high = max(s[i] ** 2 for i in idx), min(p[i] for i in idx), max(p[i] for i in idx)
    cost = {i: s[i] ** 2 / ms + lam * (p[i] - low) / (high - low) for i in idx}
    candidates = [set(S) for S in itertools.combinations(idx, k) if current in S]
    return min(candidates, key=lambda S: sum(cost[i] for i in idx if i not in S))


CASES = [  # seed, lam, sparsity, current
    (0, 0.0, 0.5, 9),
    (1, 0.0, 0.7, 4),
    (2, 1.0, 0.5, 9),
    (3, 1.0, 0.3, 0),
    (4, 3.0, 0.6, 6),
    (5, 0.5, 0.9, 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed, lam, sparsity, current", CASES)
def test_keep_mask_is_brute_force_minimiser_of_eq1(dtype, seed, lam, sparsity, current):
    g = gen(seed)
    B, H, T = 3, 2, 10
    logits = torch.randn(B, H, T, generator=g).to(dtype)
    sal = torch.rand(B, 1, T, generator=g)
    valid = random_valid(g, B, T, current)
    valid[0] = True  # one full row of n = 10
    keep = vs.keep_mask(vs.selection_scores(logits, sal, lam, valid), sparsity, valid, current)
    for b in range(B):
        idx = [i for i in range(T) if valid[b, i]]
        k = expected_k(sparsity, len(idx))
        for h in range(H):
            want = eq1_brute_force(logits[b, h].float().tolist(), sal[b, 0].tolist(), lam, idx, current, k)
            assert {i for i in range(T) if keep[b, h, i]} == want


def test_current_slot_kept_even_with_smallest_delta():
    logits = torch.tensor([[[5.0, 4.0, 0.0, 3.0, 2.0, 1.0]]])  # slot 2 (current) has s = 0
    sal = torch.tensor([[[0.3, 0.2, 0.0, 0.2, 0.2, 0.1]]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    keep = vs.keep_mask(vs.selection_scores(logits, sal, 1.0, valid), 0.5, valid, current=2)
    # k = 3 counts the current slot: it takes the place of the third best (slot 3)
    assert keep[0, 0].tolist() == [True, True, True, False, False, False]
    # the largest sparsity keeps the current slot alone
    keep = vs.keep_mask(vs.selection_scores(logits, sal, 1.0, valid), 0.99, valid, current=2)
    assert keep[0, 0].tolist() == [False, False, True, False, False, False]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.9])
def test_each_head_keeps_exactly_k_and_no_invalid_slot(sparsity):
    g = gen(3)
    B, H, T = 5, 4, 12
    counts = [1, 3, 7, 10, 12]
    valid = torch.arange(T) >= torch.tensor([[T - n] for n in counts])
    delta = torch.randn(B, H, T, generator=g)
    delta[~valid[:, None].expand(B, H, T)] = 50.0  # a large delta on padding must not attract it
    keep = vs.keep_mask(delta, sparsity, valid, current=T - 1)
    for b, n in enumerate(counts):
        assert keep[b].sum(-1).tolist() == [expected_k(sparsity, n)] * H
    assert not (keep & ~valid[:, None]).any()
    assert keep[:, :, T - 1].all()


def test_keep_mask_ranks_nonfinite_delta_below_every_finite_one():
    delta = torch.tensor([[[-math.inf, math.nan, 1.0, math.inf, 0.5]]])
    valid = torch.tensor([[True, True, True, True, False]])
    # k = 2: current (slot 0, whatever its delta) first, then the one finite delta (slot 2); the
    # padded slot 4 never, however large its delta
    assert vs.keep_mask(delta, 0.5, valid, current=0)[0, 0].tolist() == [True, False, True, False, False]
    # k = 3: the non-finite slots fill what is left, the lower slot first
    assert vs.keep_mask(delta, 0.25, valid, current=0)[0, 0].tolist() == [True, True, True, False, False]


# Revision 2.1: a slot whose logit s is NaN or infinite ranks below every finite slot, and max s^2
# is taken over the finite slots only.

BAD = [math.nan, math.inf, -math.inf]


def keep_with_bad_slots(s: list[float], phat: list[float], lam: float, idx: list[int], current: int, k: int):
    """The contract's selection, written out: the current slot, then the finite slots by
    s^2 / max finite s^2 + lam * Phat, then the non-finite ones in slot order (the tie rule that
    makes every top-k keep the same set)."""
    finite = [i for i in idx if math.isfinite(s[i])]
    peak = max(s[i] ** 2 for i in finite) if finite else 0.0
    delta = {i: (s[i] ** 2 / peak if peak > 0 else 0.0) + lam * phat[i] for i in finite}
    ranked = sorted((i for i in finite if i != current), key=lambda i: -delta[i])
    ranked += [i for i in idx if i not in finite and i != current]
    return {current, *ranked[: k - 1]}


def with_bad_slots(seed: int):
    """Rows with different numbers of non-finite logits (none; one; some per head, the current
    slot's among them in one head; all but two slots) and different padding, so different k."""
    g = gen(seed)
    B, H, T = 4, 3, 17
    logits = torch.randn(B, H, T, generator=g) * 3
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :4] = False
    valid[3, :6] = False
    logits[1, :, 9] = BAD[seed % 3]
    for h in range(H):
        slots = torch.randperm(T - 1, generator=g)[: 2 + 2 * h]
        for j, i in enumerate(slots.tolist()):
            logits[2, h, i] = BAD[(j + h) % 3]
    logits[2, 1, T - 1] = math.nan  # the current slot: kept all the same
    logits[3, :, 6 : T - 2] = torch.tensor(BAD).repeat(4)[: T - 8]
    return logits, valid


def three_selections(logits, phat, lam, valid, sparsity):
    """The reference (scores, keep_mask), the loop's fused key on the CPU's threshold top-k, and
    the same key on the sorted top-k that devices run (it runs on a CPU too)."""
    T = logits.shape[-1]
    parts = vs.selection_parts(phat, lam, valid, sparsity, current=T - 1)
    return {
        "reference": vs.keep_mask(vs.scores_with_scaled_saliency(logits, phat, lam, valid), sparsity, valid, T - 1),
        "fused": vs.selection_keep(logits, *parts),
        "sorted": vs._top_k_sorted(vs.selection_key(logits, *parts[:3]), *parts[3:]),
    }


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_non_finite_logits_rank_below_every_finite_slot_in_every_selection(seed, sparsity):
    logits, valid = with_bad_slots(seed)
    B, H, T = logits.shape
    lam = [0.0, 1.0, 2.5][seed % 3]
    phat = vs.scaled_saliency(torch.rand(B, H if seed % 2 else 1, T, generator=gen(100 + seed)), valid)
    for name, keep in three_selections(logits, phat, lam, valid, sparsity).items():
        for b in range(B):
            idx = [i for i in range(T) if valid[b, i]]
            k = expected_k(sparsity, len(idx))
            for h in range(H):
                s = logits[b, h].tolist()
                want = keep_with_bad_slots(s, phat[b, h % phat.shape[1]].tolist(), lam, idx, T - 1, k)
                assert {i for i in range(T) if keep[b, h, i]} == want, (name, b, h)


@pytest.mark.parametrize("seed", range(3))
def test_a_non_finite_logit_changes_no_finite_slots_choice(seed):
    """The same cache with and without its bad slots: with them, the finite slots keep exactly
    what they keep without them (here: the bad slots made finite but lowest-ranked, s = 0 and
    Phat = 0), whatever non-finite value the bad slots hold."""
    logits, valid = with_bad_slots(seed)
    B, H, T = logits.shape
    phat = vs.scaled_saliency(torch.rand(B, 1, T, generator=gen(200 + seed)), valid)
    bad = ~logits.isfinite()
    bad[:, :, T - 1] = False  # the current slot is kept either way
    assert bad[2].sum() > bad[1].sum() > bad[0].sum() == 0
    tame = logits.masked_fill(bad, 0.0)
    tame_phat = phat.expand(B, H, T).masked_fill(bad, 0.0)
    # lam 0: with Phat free, a tamed slot would not rank last; with s = 0 it does
    absent = three_selections(tame, tame_phat, 0.0, valid, 0.5)["reference"]
    for value in BAD:
        present = three_selections(logits.masked_fill(bad, value), phat, 0.0, valid, 0.5)
        for keep in present.values():
            assert torch.equal(keep & ~bad, absent & ~bad)
            assert torch.equal(keep.sum(-1), absent.sum(-1))


# 1e20 is finite, but its square overflows fp32: vacap counts it as non-finite (docs/methods.md).
@pytest.mark.parametrize("bad", [*BAD, 1e20])
@pytest.mark.parametrize("top_k", ["threshold", "sorted"])
def test_identity_2_holds_in_both_selections_with_a_non_finite_logit(bad, top_k, monkeypatch):
    """Identity 2 stated directly, with NaN, +inf or -inf in valid slots (the current slot's own
    among them): keep_mask and the loop's selection_keep each keep the current slot and exactly
    k slots per head, never a padding slot, and the same ones. Before revision 2.1 a head's bad
    slot made max s^2, and so every key of the fused form, NaN or inf: selection_keep then kept
    padding and dropped the current slot, where keep_mask did neither."""
    if top_k == "sorted":  # the top-k that devices run, on the CPU
        monkeypatch.setattr(vs, "_top_k_threshold", lambda key, k: vs._top_k_sorted(key, k, key.shape[-1]))
    g = gen(21)
    B, H, T = 3, 4, 12
    logits = torch.randn(B, H, T, generator=g) * 3
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    valid[2, 5:8] = False  # a compacted row's padding, between its prompt slots and new tokens
    logits.masked_fill_(~valid[:, None], 1e3)  # the largest logits, on padding: never kept all the same
    logits[:, 0, 6] = bad  # one bad slot (padding in row 2)
    logits[:, 1, 2:10] = bad  # most of them
    logits[:, 2, T - 1] = bad  # the current slot's own
    logits[:, 3, [0, 4, T - 1]] = bad
    phat = vs.scaled_saliency(torch.rand(B, 1, T, generator=g), valid)
    n = valid.sum(-1).tolist()
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        reference = vs.keep_mask(vs.scores_with_scaled_saliency(logits, phat, 1.0, valid), sparsity, valid, T - 1)
        fused = vs.selection_keep(logits, *vs.selection_parts(phat, 1.0, valid, sparsity, current=T - 1))
        for name, keep in [("reference", reference), ("fused", fused)]:
            assert keep[:, :, T - 1].all(), (name, sparsity, "the current slot was dropped")
            assert not (keep & ~valid[:, None]).any(), (name, sparsity, "a padding slot was kept")
            assert keep.sum(-1).tolist() == [[expected_k(sparsity, n_b)] * H for n_b in n], (name, sparsity)
        assert torch.equal(fused, reference), sparsity


def test_budget_split_ranks_nan_last_in_slot_order():
    delta = torch.tensor([[0.5, math.nan, 2.0, math.nan, 1.0, math.nan]])
    keep, drop = vs.budget_split(delta, 0.7)  # keeps 5: the three finite, then slots 1 and 3
    assert keep.tolist() == [[0, 1, 2, 3, 4]] and drop.tolist() == [[5]]


def test_heads_can_keep_different_slots():
    logits = torch.tensor([[[9.0, 1.0, 2.0, 3.0], [1.0, 9.0, 2.0, 3.0]]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    delta = vs.selection_scores(logits, torch.zeros(1, 1, 4), 1.0, valid)
    keep = vs.keep_mask(delta, 0.5, valid, current=3)
    assert keep[0].tolist() == [[True, False, False, True], [False, True, False, True]]


# 3-4. Sink ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_sink_weights_softmax_over_valid(dtype):
    g = gen(4)
    B, H, T = 3, 2, 6
    colsum = (4 * torch.rand(B, H, T, generator=g)).to(dtype)
    valid = torch.arange(T) >= torch.tensor([[0], [3], [5]])
    w = vs.sink_weights(colsum, valid)
    assert w.dtype == torch.float32
    assert torch.allclose(w.sum(-1), torch.ones(B, H))
    for b in range(B):
        idx = [i for i in range(T) if valid[b, i]]
        for h in range(H):
            soft = dict(zip(idx, plain_softmax([float(colsum[b, h, i]) for i in idx])))
            assert w[b, h].tolist() == pytest.approx([soft.get(i, 0.0) for i in range(T)], rel=1e-5)


def test_step_sink_weights_equal_sink_weights_when_every_row_has_a_valid_slot():
    g = gen(9)
    B, H, T = 3, 4, 11
    valid = torch.arange(T) >= torch.tensor([[0], [4], [T - 1]])  # left padding; one slot only
    colsum = torch.rand(B, H, T, generator=g) * 6
    colsum[1, :, :4] = 50.0  # large statistics on padding must not leak into the weights
    step = vs.step_sink_weights(colsum, vs.invalid_bias(valid))
    assert torch.equal(step, vs.sink_weights(colsum, valid))
    assert (step[2, :, -1] == 1).all()
    # Several layers' sums at once, as a decode step makes them: each layer as if alone.
    layers = torch.rand(3, B, H, T, generator=g) * 6
    together = vs.step_sink_weights(layers, vs.invalid_bias(valid))
    for layer in range(3):
        assert torch.equal(together[layer], vs.step_sink_weights(layers[layer], vs.invalid_bias(valid)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("query_axis", [False, True])
def test_sink_factor_penalty_matches_formula(dtype, query_axis):
    g = gen(5)
    B, H, T, beta = 2, 3, 5, 0.3
    logits = torch.randn(B, H, T, generator=g).to(dtype)
    w = torch.rand(B, H, T, generator=g).softmax(-1)
    out = vs.penalise(logits[:, :, None] if query_axis else logits, vs.sink_factor(w, beta))
    assert out.dtype == dtype
    out = out[:, :, 0] if query_axis else out
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for b, h, i in itertools.product(range(B), range(H), range(T)):
        s, wi = float(logits[b, h, i]), float(w[b, h, i])
        assert float(out[b, h, i]) == pytest.approx((1 + beta) * s - beta * wi * s, rel=tol, abs=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sink_factor_penalty_beta_zero_is_bitwise_identity(dtype):
    logits = torch.randn(2, 3, 7, generator=gen(6)).to(dtype)
    w = torch.rand(2, 3, 7, generator=gen(7))
    assert torch.equal(vs.penalise(logits, vs.sink_factor(w, 0.0)), logits)


def test_penalty_then_mask_then_softmax_has_no_nan():
    g = gen(8)
    B, H, T = 3, 4, 8
    valid = torch.arange(T) >= torch.tensor([[0], [3], [6]])
    logits = torch.randn(B, H, T, generator=g)
    w = vs.sink_weights(torch.rand(B, H, T, generator=g), valid)
    delta = vs.selection_scores(logits, torch.rand(B, T, generator=g), 1.0, valid)
    keep = vs.keep_mask(delta, 0.5, valid, T - 1)
    probs = vs.penalise(logits, vs.sink_factor(w, 0.5)).masked_fill(~keep, -math.inf).softmax(-1)
    assert not probs.isnan().any()
    assert torch.allclose(probs.sum(-1), torch.ones(B, H))
    assert (probs[~keep] == 0).all()


# 5-6. Saliency -----------------------------------------------------------------------------------


def test_saliency_hand_worked():
    v = torch.tensor([[0.0, math.log(2), math.log(3)], [5.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [False, True, True]])
    P = vs.saliency(v, valid).tolist()
    assert P == [pytest.approx([1 / 6, 2 / 6, 3 / 6]), pytest.approx([0, 0.5, 0.5])]


@pytest.mark.parametrize("dtype", DTYPES)
def test_saliency_per_kv_head_matches_loop_softmax(dtype):
    g = gen(9)
    B, Hkv, T = 2, 3, 6
    v = torch.rand(B, Hkv, T, generator=g).to(dtype)
    valid = torch.arange(T) >= torch.tensor([[1], [4]])
    P = vs.saliency(v, valid)
    assert P.dtype == torch.float32
    for b, h in itertools.product(range(B), range(Hkv)):
        idx = [i for i in range(T) if valid[b, i]]
        soft = dict(zip(idx, plain_softmax([float(v[b, h, i]) for i in idx])))
        assert P[b, h].tolist() == pytest.approx([soft.get(i, 0.0) for i in range(T)], rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_head", [False, True])
def test_image_attention_mass_matches_loops(dtype, per_head):
    g = gen(10)
    B, H, Tq, T = 2, 3, 4, 6
    probs = torch.rand(B, H, Tq, T, generator=g).softmax(-1).to(dtype)
    image = torch.rand(B, H, T, generator=g) < 0.5 if per_head else torch.rand(B, T, generator=g) < 0.5
    mass = vs.image_attention_mass(probs, image)
    assert mass.shape == (B, Tq)
    for b, t in itertools.product(range(B), range(Tq)):
        total = 0.0
        for h in range(H):
            flags = image[b, h] if per_head else image[b]
            total += sum(float(probs[b, h, t, k]) for k in range(T) if flags[k])
        assert float(mass[b, t]) == pytest.approx(total / H, rel=1e-5)


# 7-8. Contrastive decoding -----------------------------------------------------------------------


def test_plausible_mask_hand_worked():
    # p is proportional to 1, 0.5, 0.05, 0.2, 0.11: the cut at 0.1 * max keeps ratios >= 0.1
    logits = torch.tensor([[0.0, math.log(0.5), math.log(0.05), math.log(0.2), math.log(0.11)]])
    assert vs.plausible_mask(logits, 0.1).tolist() == [[True, True, False, True, True]]
    assert vs.plausible_mask(logits, 0.0).all()
    assert vs.plausible_mask(logits, 1.0).tolist() == [[True, False, False, False, False]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed, alpha", [(11, 0.1), (12, 1.0), (13, 3.0)])
def test_contrast_argmax_matches_plain_python(dtype, seed, alpha):
    g = gen(seed)
    B, V, apc = 4, 50, 0.1
    z_theta = (3 * torch.randn(B, V, generator=g)).to(dtype)
    z_phi = (3 * torch.randn(B, V, generator=g)).to(dtype)
    z = vs.contrast(z_theta, z_phi, alpha, vs.plausible_mask(z_theta, apc))
    for b in range(B):
        zt, zp = [float(x) for x in z_theta[b]], [float(x) for x in z_phi[b]]
        p = plain_softmax(zt)
        plausible = [j for j in range(V) if p[j] >= apc * max(p)]
        want = max(plausible, key=lambda j: (1 + alpha) * zt[j] - alpha * zp[j])
        assert int(z[b].argmax()) == want
        assert all(z[b, j] == -math.inf for j in range(V) if j not in plausible)


def test_contrast_ignores_garbage_outside_plausible():
    g = gen(14)
    z_theta, z_phi = 3 * torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    plausible = vs.plausible_mask(z_theta, 0.1)
    garbage = z_phi.clone()
    outside = (~plausible).nonzero()
    fill = torch.tensor([math.nan, math.inf, -math.inf, 1e30])
    garbage[outside[:, 0], outside[:, 1]] = fill[torch.arange(len(outside)) % 4]
    clean = vs.contrast(z_theta, z_phi, 0.5, plausible)
    assert torch.equal(vs.contrast(z_theta, garbage, 0.5, plausible), clean)
    assert not clean.isnan().any()


def test_contrast_alpha_zero_is_z_theta_on_plausible():
    z_theta = torch.randn(2, 30, generator=gen(15))
    plausible = vs.plausible_mask(z_theta, 0.1)
    z = vs.contrast(z_theta, torch.full_like(z_theta, math.nan).where(~plausible, 7.0), 0.0, plausible)
    assert torch.equal(z, z_theta.masked_fill(~plausible, -math.inf))


# 9. DPC-KNN --------------------------------------------------------------------------------------


def blobs(seed: int) -> tuple[torch.Tensor, list[int]]:
    g = gen(seed)
    means = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [0.0, 10.0, 10.0, 0.0]])
    labels = torch.arange(3).repeat_interleave(torch.tensor([9, 7, 8]))
    perm = torch.randperm(len(labels), generator=g)
    labels = labels[perm]
    x = means[labels] + 0.3 * torch.randn(len(labels), 4, generator=g)
    return x, labels.tolist()


def test_dpc_knn_recovers_well_separated_blobs():
    x0, labels0 = blobs(16)
    x1, labels1 = blobs(17)
    assign = vs.dpc_knn(torch.stack([x0, x1]), n_clusters=3, k=4)
    for row, labels in zip(assign.tolist(), [labels0, labels1]):
        pairs = {(a, lab) for a, lab in zip(row, labels)}
        assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3  # a bijection blob <-> cluster


@pytest.mark.parametrize("seed, G, N, D, C, k, scale", [
    (20, 3, 7, 5, 2, 1, 1.0),
    (21, 3, 7, 5, 3, 3, 1.0),
    (22, 2, 20, 5, 5, 4, 1.0),
    (23, 2, 20, 3, 4, 50, 1.0),  # k clipped to N - 1
    (24, 1, 31, 8, 6, 5, 1.0),
    (25, 2, 20, 8, 4, 3, 30.0),  # key-like distances: exp(-d^2) is 0 even in float64
])
def test_dpc_knn_matches_numpy_reference(seed, G, N, D, C, k, scale):
    x = scale * torch.randn(G, N, D, generator=gen(seed))
    assign = vs.dpc_knn(x, C, k)
    assert assign.dtype == torch.long and assign.shape == (G, N)
    for g in range(G):
        want, centres = numpy_dpc_knn(x[g].double().numpy(), C, k)
        assert assign[g].tolist() == want
        assert [int(assign[g, c]) for c in centres] == list(range(C))  # each centre in its own cluster
        assert sorted(set(want)) == list(range(C))  # a partition using every id


def test_dpc_knn_duplicate_centre_keeps_its_own_cluster():
    # Slots 0 and 1 coincide, as do 3 and 4: slots 1 and 4 have dist 0, so score 0. With 4 clusters
    # for 3 distinct places, slot 1 must be a centre while sitting on top of centre 0.
    pts = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.0, 7.0], [0.0, 7.0]])
    assign = vs.dpc_knn(pts[None], n_clusters=4, k=2)
    want, centres = numpy_dpc_knn(pts.double().numpy(), 4, 2)
    assert centres == [0, 1, 2, 3]
    assert assign[0].tolist() == want == [0, 1, 2, 3, 3]


def test_dpc_knn_few_points():
    x = torch.randn(2, 3, 4, generator=gen(25))
    assert vs.dpc_knn(x, 3, 5).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert vs.dpc_knn(x, 8, 5).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert vs.dpc_knn(x[:, :1], 1, 5).tolist() == [[0], [0]]
    assert vs.dpc_knn(x, 1, 5).tolist() == [[0, 0, 0], [0, 0, 0]]


@pytest.mark.dtype
def test_dpc_knn_bf16_clusters_the_rounded_points():
    x = torch.randn(2, 15, 6, generator=gen(26)).to(torch.bfloat16)
    assign = vs.dpc_knn(x, 4, 3)
    for g in range(2):
        assert assign[g].tolist() == numpy_dpc_knn(x[g].double().numpy(), 4, 3)[0]


def test_dpc_knn_gives_separated_blobs_in_high_dimension_their_own_clusters():
    # Revision 2's case: 10 blobs in D = 128. Unscaled distances made log rho span hundreds, so
    # the centres piled onto a few blobs (here none of the 10 got a cluster of its own).
    g = gen(27)
    means = 4.0 * torch.randn(10, 128, generator=g)
    labels = torch.arange(10).repeat_interleave(8)
    x = means[labels] + torch.randn(80, 128, generator=g)
    assign = vs.dpc_knn(x[None], n_clusters=10, k=5)[0]
    clusters = {blob: set(assign[labels == blob].tolist()) for blob in range(10)}
    assert all(len(ids) == 1 for ids in clusters.values())
    assert len(set.union(*clusters.values())) == 10  # one cluster per blob, none shared


# 10. Cluster reduction ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("trailing", [(), (3,), (2, 3)])
def test_cluster_reduce_matches_loops(dtype, reduce, trailing):
    g = gen(27)
    G, N, C = 3, 8, 4
    x = torch.randn(G, N, *trailing, generator=g).to(dtype)
    assign = torch.randint(0, C - 1, (G, N), generator=g)  # cluster C - 1 stays empty
    out = vs.cluster_reduce(x, assign, C, reduce)
    assert out.shape == (G, C, *trailing) and out.dtype == dtype
    for gi, c in itertools.product(range(G), range(C)):
        members = [x[gi, i].float() for i in range(N) if assign[gi, i] == c]
        want = torch.zeros(trailing) if not members else sum(members)
        if reduce == "mean" and members:
            want = want / len(members)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert torch.allclose(out[gi, c].float(), want, rtol=tol, atol=tol)


def test_cluster_reduce_of_flags_is_fraction_in_fp32():
    flags = torch.tensor([[True, True, False, False, True]])
    assign = torch.tensor([[0, 0, 0, 1, 1]])
    frac = vs.cluster_reduce(flags, assign, 2, "mean")
    assert frac.dtype == torch.float32
    assert frac.tolist() == [pytest.approx([2 / 3, 1 / 2])]


def test_cluster_sizes_and_unknown_reduce():
    assign = torch.tensor([[0, 2, 2, 0, 2], [1, 1, 1, 1, 1]])
    assert vs.cluster_sizes(assign, 3).tolist() == [[2, 0, 3], [0, 5, 0]]
    with pytest.raises(ValueError, match="reduce"):
        vs.cluster_reduce(torch.ones(2, 5), assign, 3, "max")


# 11. KV budget split -----------------------------------------------------------------------------


def test_budget_split_hand_worked():
    delta = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7], [0.5, 0.4, 0.3, 0.2, 0.1]])
    keep, drop = vs.budget_split(delta, 0.5)  # ceil(2.5) = 3
    assert keep.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert drop.tolist() == [[0, 3], [3, 4]]


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.5, 0.7, 1.0])
def test_budget_split_sizes_order_and_top(budget):
    G, n = 4, 20
    delta = torch.randn(G, n, generator=gen(28)).to(torch.bfloat16)
    keep, drop = vs.budget_split(delta, budget)
    m = math.ceil(Fraction(str(budget)) * n)
    assert keep.shape == (G, m) and drop.shape == (G, n - m)
    for g in range(G):
        kept, dropped = keep[g].tolist(), drop[g].tolist()
        assert kept == sorted(kept) and dropped == sorted(dropped)
        assert sorted(kept + dropped) == list(range(n))
        if dropped:
            assert min(float(delta[g, i]) for i in kept) >= max(float(delta[g, i]) for i in dropped)


# 12. VCD diffusion noise -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [0, 500, 999])
def test_diffusion_noise_closed_form(dtype, step):
    pixels = torch.randn(2, 3, 4, 4, generator=gen(29)).to(dtype)
    noised = vs.diffusion_noise(pixels, step, gen(30))
    alpha_bar = 1.0
    for i in range(step + 1):
        t = -6 + 12 * i / 999
        alpha_bar *= 1 - ((0.5e-2 - 1e-5) / (1 + math.exp(-t)) + 1e-5)
    eps = torch.randn(pixels.shape, generator=gen(30))
    want = math.sqrt(alpha_bar) * pixels.float() + math.sqrt(1 - alpha_bar) * eps
    assert noised.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(noised.float(), want, rtol=tol, atol=tol)


def test_diffusion_noise_rejects_steps_outside_schedule():
    for step in (-1, 1000):
        with pytest.raises(ValueError, match="step"):
            vs.diffusion_noise(torch.zeros(3), step, gen(0))


# 13-14. FastV and image masking ------------------------------------------------------------------


def test_fastv_keep_drops_least_attended_image_slots():
    received = torch.tensor([
        [0.0, 0.0, 0.5, 0.1, 0.4, 0.2, 0.3, 0.05, 0.9],
        [9.0, 0.6, 0.3, 0.8, 0.1, 0.2, 0.7, 0.0, 0.9],
    ])
    image = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    keep = vs.fastv_keep(received, image, valid, 0.5)
    # row 0: 6 image slots, drop 3: the 0.05, 0.1, 0.2 ones (slots 7, 3, 5)
    # row 1: slot 0 is padding, so 5 image slots, drop floor(2.5) = 2: 0.1, 0.2 (slots 4, 5)
    assert keep.int().tolist() == [[0, 1, 1, 0, 1, 0, 1, 0, 1], [0, 1, 1, 1, 0, 0, 1, 1, 1]]


def test_fastv_keep_matches_loop_reference():
    g = gen(31)
    B, T, ratio = 4, 30, 0.3
    received = torch.rand(B, T, generator=g)
    image = torch.rand(B, T, generator=g) < 0.6
    valid = torch.arange(T) >= torch.tensor([[0], [5], [10], [29]])
    keep = vs.fastv_keep(received, image, valid, ratio)
    for b in range(B):
        img = [i for i in range(T) if image[b, i] and valid[b, i]]
        n_drop = math.floor(Fraction(str(ratio)) * len(img))
        drop = set(sorted(img, key=lambda i: float(received[b, i]))[:n_drop])
        assert keep[b].tolist() == [bool(valid[b, i]) and i not in drop for i in range(T)]


def test_mask_image_slots_counts_and_only_image_slots():
    image = torch.tensor([
        [0, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 1, 0, 0],
    ], dtype=torch.bool)
    hide = vs.mask_image_slots(image, 0.5, gen(32))
    # round(2.5) = 2 (half to even), round(4) = 4, round(0) = 0, round(1) = 1
    assert hide.sum(-1).tolist() == [2, 4, 0, 1]
    assert not (hide & ~image).any()
    assert torch.equal(vs.mask_image_slots(image, 0.5, gen(32)), hide)
    assert vs.mask_image_slots(image, 1.0, gen(33)).equal(image)
    assert not vs.mask_image_slots(image, 0.0, gen(33)).any()


def test_mask_image_slots_is_uniform_over_image_slots():
    image = torch.zeros(4000, 12, dtype=torch.bool)
    image[:, 2:10] = True
    hide = vs.mask_image_slots(image, 0.25, gen(34))
    assert (hide.sum(-1) == 2).all()
    freq = hide.float().mean(0)
    # every image slot is hidden a quarter of the time (std 0.007 over 4000 rows)
    assert torch.allclose(freq[2:10], torch.full((8,), 0.25), atol=0.04)
    assert (freq[:2] == 0).all() and (freq[10:] == 0).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_selection_keep_keeps_what_keep_mask_keeps(seed, sparsity):
    """The loop's fused form equals the reference composition, padding and per-head saliency included."""
    g = torch.Generator().manual_seed(seed)
    B, H, T = 3, 4, 23
    logits = torch.randn(B, H, T, generator=g) * 3
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    valid[2, :19] = False  # a row with only four slots
    lam = [0.0, 1.0, 2.5][seed % 3]
    saliency = torch.rand(B, H if seed % 2 else 1, T, generator=g)
    if seed == 5:
        logits[0] = 0.0  # every s zero: the logit term must vanish, not divide by zero
    phat = vs.scaled_saliency(saliency, valid)
    want = vs.keep_mask(vs.scores_with_scaled_saliency(logits, phat, lam, valid), sparsity, valid, current=T - 1)
    keep = vs.selection_keep(logits, *vs.selection_parts(phat, lam, valid, sparsity, current=T - 1))
    assert torch.equal(keep, want)


@pytest.mark.parametrize("seed", range(4))
def test_both_top_k_paths_keep_the_k_largest(seed):
    """The CPU's threshold path and the device path (sorted top-k) each keep exactly k_b entries of
    every (row, head), none smaller than one they drop; without ties they keep the same ones."""
    g = torch.Generator().manual_seed(seed)
    B, H, T = 4, 3, 37
    key = torch.randn(B, H, T, generator=g)
    key[0, 0, 5] = math.inf
    key[1, :, :9] = -math.inf  # a padded row's invalid slots
    k = torch.tensor([1, 20, 37, 11])
    masks = [vs._top_k_threshold(key, k), vs._top_k_sorted(key, k, 37)]
    for keep in masks:
        assert torch.equal(keep.sum(-1), k[:, None].expand(B, H))
        lowest_kept = torch.where(keep, key, math.inf).amin(-1)
        highest_dropped = torch.where(keep, -math.inf, key).amax(-1)
        assert (lowest_kept >= highest_dropped).all()
    assert torch.equal(masks[0], masks[1])
    # Exact ties at the k-th place: either path keeps k of them.
    tied = torch.zeros(1, 2, 8)
    for keep in (vs._top_k_threshold(tied, torch.tensor([3])), vs._top_k_sorted(tied, torch.tensor([3]), 8)):
        assert torch.equal(keep.sum(-1), torch.tensor([[3, 3]]))
    # Ties in some heads only, rows with different k: the tied heads are chosen again by index,
    # the others keep their threshold choice.
    key = torch.randn(3, 2, 9, generator=g)
    key[0, 1] = torch.tensor([5.0, 2.0, 4.0, 2.0, 1.0, 2.0, 0.0, -1.0, 0.5])
    k = torch.tensor([3, 3, 5])
    keep = vs._top_k_threshold(key, k)
    assert torch.equal(keep.sum(-1), k[:, None].expand(3, 2))
    assert keep[0, 1, [0, 2]].all() and keep[0, 1, [1, 3, 5]].sum() == 1
    assert torch.equal(keep[1:], vs._top_k_sorted(key, k, 5)[1:])
    # A NaN (a broken model's logit) still leaves exactly k per head, whatever k is.
    key = torch.randn(2, 3, 10, generator=g)
    key[0, 0, 4] = key[1, 2, :3] = math.nan
    for n in (1, 2, 5, 10):
        assert (vs._top_k_threshold(key, torch.tensor([n, n])).sum(-1) == n).all()

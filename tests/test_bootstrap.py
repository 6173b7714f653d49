"""Paired bootstrap intervals of CHAIR differences, against hand-worked and textbook cases."""

from __future__ import annotations

import random
import statistics

import pytest

from vacap.evaluate.bootstrap import paired_difference


def score(hallucinated: int, mentions: int) -> dict:
    return {"hallucinated": hallucinated, "mentions": mentions}


def test_identical_settings_differ_by_exactly_zero():
    scores = [score(i % 3 == 0, 2) for i in range(50)]
    assert paired_difference(scores, scores, resamples=500) == {"CHAIR_s": (0.0, 0.0, 0.0), "CHAIR_i": (0.0, 0.0, 0.0)}


def test_point_estimates_are_the_figures_themselves():
    a = [score(1, 2), score(0, 3), score(2, 2), score(0, 1)]  # CHAIR_s 2/4, CHAIR_i 3/8
    b = [score(0, 2), score(0, 3), score(1, 4), score(0, 1)]  # CHAIR_s 1/4, CHAIR_i 1/10
    result = paired_difference(a, b, resamples=200)
    assert result["CHAIR_s"][0] == pytest.approx(0.25)
    assert result["CHAIR_i"][0] == pytest.approx(3 / 8 - 1 / 10)
    for difference, low, high in result.values():
        assert low <= difference <= high


def test_pairing_removes_the_variation_between_scenes():
    # Scene difficulty varies a lot, but b always hallucinates on exactly the scenes a does plus
    # every tenth one: the paired interval for CHAIR_s is tight around 0.1 and excludes 0, while
    # unpaired resampling (shuffling b's scenes) would be wide.
    rng = random.Random(3)
    hard = [rng.random() < 0.4 for _ in range(1000)]
    a = [score(h, 2) for h in hard]
    b = [score(h or i % 10 == 0, 2) for i, h in enumerate(hard)]
    difference, low, high = paired_difference(b, a, resamples=2000)["CHAIR_s"]
    assert difference == pytest.approx(sum(not h and i % 10 == 0 for i, h in enumerate(hard)) / 1000)
    assert 0 < low < difference < high < 0.1


def test_interval_width_matches_the_normal_approximation():
    # For a paired difference of independent coin flips the standard error is known in closed
    # form; the 95% percentile interval should span about 2 x 1.96 of it.
    rng = random.Random(5)
    n = 800
    a = [score(rng.random() < 0.3, 1) for _ in range(n)]
    b = [score(rng.random() < 0.3, 1) for _ in range(n)]
    d = [x["hallucinated"] - y["hallucinated"] for x, y in zip(a, b)]
    se = statistics.pstdev(d) / n**0.5
    _, low, high = paired_difference(a, b, resamples=4000, seed=1)["CHAIR_s"]
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_unpaired_input_is_refused():
    with pytest.raises(ValueError, match="same, non-zero number of scenes"):
        paired_difference([score(0, 1)], [])


def test_cause_split_and_recall_get_intervals_too():
    def full(prior: int, perceptual: int, mentions: int, recalled: int, objects: int) -> dict:
        return {
            "hallucinated": prior + perceptual, "hallucinated_prior": prior, "hallucinated_perceptual": perceptual,
            "mentions": mentions, "recalled": recalled, "objects": objects,
        }  # fmt: skip

    a = [full(2, 0, 4, 2, 4), full(0, 1, 3, 2, 3), full(1, 1, 5, 3, 5)]  # prior 3/12, perc. 2/12, recall 7/12
    b = [full(0, 0, 4, 4, 4), full(1, 0, 3, 2, 3), full(0, 1, 5, 4, 5)]  # prior 1/12, perc. 1/12, recall 10/12
    result = paired_difference(a, b, resamples=300)
    assert list(result) == ["CHAIR_s", "CHAIR_i", "CHAIR_i_prior", "CHAIR_i_perceptual", "recall"]
    assert result["CHAIR_i"][0] == pytest.approx(5 / 12 - 2 / 12)
    assert result["CHAIR_i_prior"][0] == pytest.approx(3 / 12 - 1 / 12)
    assert result["CHAIR_i_perceptual"][0] == pytest.approx(2 / 12 - 1 / 12)
    assert result["recall"][0] == pytest.approx(7 / 12 - 10 / 12)
    for difference, low, high in result.values():
        assert low <= difference <= high


def test_prior_driven_hallucinations_beyond_chance_get_intervals():
    def full(prior: int, perceptual: int, chance: float, mentions: int) -> dict:
        return {
            "hallucinated": prior + perceptual, "hallucinated_prior": prior, "hallucinated_perceptual": perceptual,
            "hallucinated_prior_excess": prior - chance, "mentions": mentions, "recalled": 0, "objects": 1,
        }  # fmt: skip

    a = [full(2, 0, 0.5, 4), full(0, 1, 0.25, 3), full(1, 1, 0.5, 5)]  # excess 1.75 of 12 mentions, of 5 errors
    b = [full(0, 0, 0.0, 4), full(1, 0, 0.5, 3), full(0, 1, 0.125, 5)]  # excess 0.375 of 12 mentions, of 2 errors
    result = paired_difference(a, b, resamples=300)
    assert result["CHAIR_i_prior_excess"][0] == pytest.approx(1.75 / 12 - 0.375 / 12)
    assert result["prior_share_excess"][0] == pytest.approx(1.75 / 5 - 0.375 / 2)
    for difference, low, high in result.values():
        assert low <= difference <= high

"""Paired bootstrap intervals for the difference of CHAIR figures between two decode settings.

Both settings caption the same scenes, so their per-scene scores are paired: a resample draws
scenes with replacement and takes the same scenes for both settings. That removes the variation
between scenes, which is most of it, and lets a small real difference show (Efron & Tibshirani,
"An Introduction to the Bootstrap", percentile intervals).
"""

from __future__ import annotations

from typing import Sequence

import torch

_CHUNK = 1000  # resamples drawn at once: bounds memory at _CHUNK x scenes indices
# figure -> (numerator, denominator): score_caption counts summed over the scenes.
RATIOS = {
    "CHAIR_i": ("hallucinated", "mentions"),
    "CHAIR_i_prior": ("hallucinated_prior", "mentions"),
    "CHAIR_i_perceptual": ("hallucinated_perceptual", "mentions"),
    # Prior-driven hallucinations beyond what chance gives (vacap.evaluate.shapes.prior_chance).
    "CHAIR_i_prior_excess": ("hallucinated_prior_excess", "mentions"),
    "prior_share_excess": ("hallucinated_prior_excess", "hallucinated"),
    "recall": ("recalled", "objects"),
}


def paired_difference(
    a: Sequence[dict],
    b: Sequence[dict],
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """The figures of :data:`RATIOS` and CHAIR_s of ``a`` minus those of ``b``, with a
    percentile bootstrap interval.

        a, b      # score_caption dicts (vacap.evaluate.shapes) of the same scenes, same order
        returns   # {"CHAIR_s": (difference, low, high), "CHAIR_i": (...), ...}, as fractions

    CHAIR_s is the share of captions with a hallucinated mention; the others are ratios of
    sums (CHAIR_i: hallucinated mentions over all mentions), recomputed in every resample, 0
    when the denominator is; a ratio whose counts the score dicts lack is left out. The
    interval holds the central ``level`` of the resampled differences.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same, non-zero number of scenes, got {len(a)} and {len(b)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    ratios = {name: pair for name, pair in RATIOS.items() if all(key in a[0] and key in b[0] for key in pair)}
    keys = list(dict.fromkeys(key for pair in ratios.values() for key in pair))
    counts = {
        name: torch.tensor([[s[key] for s in scores] for key in keys], dtype=torch.float64)
        for name, scores in (("a", a), ("b", b))
    }  # (K, n): each count of ``keys`` per scene

    def figures(index: torch.Tensor) -> torch.Tensor:
        """-> (1 + len(ratios), R) differences for index # (R, n) resampled scenes."""
        out = []
        for name in ("a", "b"):
            sums = counts[name][:, index].sum(-1)  # (K, R)
            hallucinated = counts[name][keys.index("hallucinated")][index]  # (R, n)
            rows = [(hallucinated > 0).double().mean(-1)]
            for numerator, denominator in ratios.values():
                total = sums[keys.index(denominator)]
                rows.append(torch.where(total > 0, sums[keys.index(numerator)] / total.clamp_min(1), 0.0))
            out.append(torch.stack(rows))
        return out[0] - out[1]

    n = len(a)
    point = figures(torch.arange(n)[None])[:, 0]
    generator = torch.Generator().manual_seed(seed)
    draws = [
        figures(torch.randint(0, n, (min(_CHUNK, resamples - done), n), generator=generator))
        for done in range(0, resamples, _CHUNK)
    ]
    tail = (1 - level) / 2
    low, high = torch.quantile(torch.cat(draws, 1), torch.tensor([tail, 1 - tail], dtype=torch.float64), dim=1)
    return {name: (float(point[i]), float(low[i]), float(high[i])) for i, name in enumerate(("CHAIR_s", *ratios))}

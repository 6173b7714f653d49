"""Fit the risk score's coefficients (vacap/risk_coefficients.json) on the priors world's train split.

    python -m vacap.evaluate.fit_risk [--scenes 1000] [--seed 0] [--batch-size 8] [--out FILE]

`demo-priors` captions freshly drawn ``train`` scenes greedily with ``--risk``; every object word
is labelled by the scene's truth (hallucinated or not, and why: :func:`vacap.evaluate.shapes.mention_labels`)
and a logistic regression on the four signals at its first token (:func:`vacap.risk.fit`) gives
the coefficients. The two causes of hallucination weigh the same in the fit: in the train split
the priors hold, so prior-driven errors are rare there (about a quarter of them), yet the score
must find them wherever the priors fail. Test scenes are never seen: ``vacap eval shapes --risk`` measures the score on
them. The same arguments give the same coefficients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from vacap import risk
from vacap.evaluate.shapes import run_benchmark


def fit_on_train(scenes: int, seed: int, batch_size: int) -> dict:
    """The coefficients fitted on ``scenes`` train scenes of the priors world drawn from ``seed``."""
    rows = run_benchmark(
        "demo-priors", {"greedy": {"method": "greedy", "risk": True}}, n=scenes, seed=seed, batch_size=batch_size,
        world="priors", split="train", device="cpu",
    )  # fmt: skip
    mentions = [m for m in rows[0]["mentions"] if all(m["signals"].get(name) is not None for name in risk.SIGNALS)]
    fitted_on = (
        f"priors world, train split: {scenes} scenes (seed {seed}) captioned greedily by demo-priors, "
        f"{len(mentions)} object mentions of which {sum(m['hallucinated'] for m in mentions)} hallucinated"
    )
    causes = Counter(m["cause"] for m in mentions if m["hallucinated"])
    # Each cause's mentions together weigh half of all the hallucinated ones.
    weights = [sum(causes.values()) / (2 * causes[m["cause"]]) if m["hallucinated"] else 1.0 for m in mentions]
    fitted_on += f" ({causes['prior']} prior-driven, {causes['perceptual']} perceptual, weighted to count alike)"
    coefficients = risk.fit(
        [m["signals"] for m in mentions], [m["hallucinated"] for m in mentions], fitted_on=fitted_on,
        sample_weights=weights,
    )  # fmt: skip
    scores = [risk.score(m["signals"], coefficients) for m in mentions]
    coefficients["train_auroc"] = round(risk.auroc(scores, [m["hallucinated"] for m in mentions]), 4)
    return coefficients


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=risk.COEFFICIENTS_FILE)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    coefficients = fit_on_train(args.scenes, args.seed, args.batch_size)
    args.out.write_text(json.dumps(coefficients, indent=2) + "\n", encoding="utf-8")
    print(f"{args.out}: {coefficients['fitted_on']}; AUROC on them {coefficients['train_auroc']}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""What the per-token risk signals cost: tokens/s with and without ``risk``, side by side.

    OMP_NUM_THREADS=1 python benchmarks/risk_cost.py                  # demo, short, mid; batch 1 and 8
    OMP_NUM_THREADS=1 python benchmarks/risk_cost.py --sizes wide --batch 1 --rounds 2
    OMP_NUM_THREADS=1 python benchmarks/risk_cost.py --sizes demo --settings greedy,vasparse,contrast-4

``demo`` is the model shipped in vacap (4 layers, hidden 128, 61-token vocabulary) on its own
sample scenes; the other sizes are the random llava-llama checkpoints of ``vacap.tiny_models``
built offline: ``short`` (the ~310M, 24-layer text model with 16 image tokens: decode steps take
the time, as on a GPU), ``mid`` (the same model with 576 image tokens, LLaVA-1.5's cache) and
``wide`` (6 layers of LLaVA-1.5-7B's width, 576 image tokens). ``contrast-4`` is VASparse with
contrast_layers 4, whose own branch the risk signals share instead of running theirs.

EOS never ends a call early (vacap's stop set is emptied), so every row makes the same N tokens
and the two calls of a pair do the same work but for the signals. Each round runs every setting
without and with risk, in alternating order, so that the machine's load hits both alike; the
figures are medians over the rounds. Every pair is checked to give the same tokens.

Columns: tokens/s of whole calls (batch x N over the call's seconds) without and with risk, and
their ratio; then the decode part alone (the call less its prefill, timed inside the same call):
ms per generated token without and with risk, and how much slower it is with risk (the
per-step signals plus the branch pass at the caption's end), as the median of the rounds' own
pairs with their quartiles (a pair's two calls run back to back, so load that changes between
rounds cancels out). The prefill gains nothing but the
drawing of the hidden image slots, so on prefill-heavy CPU calls the whole-call ratio hides the
cost that a GPU, where decode steps dominate, would see; the decode column shows it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import vacap.decode as decode
from vacap.config import DecodeConfig
from vacap.methods import steering_for
from vacap.model import VisionLanguageModel, load_model
from vacap.risk_signals import RiskSettings
from vacap.tiny_models import SIZES, build_tiny_model

from speed import choices

SETTINGS = {
    "greedy": dict(method="greedy"),
    "vasparse": dict(method="vasparse"),
    "contrast-4": dict(method="vasparse", contrast_layers=4),
}
SIZE_CHOICES = ("demo", *SIZES)
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
PROMPT = "Please describe this image in detail."


def sized_model(size: str, folder: Path) -> VisionLanguageModel:
    """The model of a ``SIZE_CHOICES`` size, fp32 on the CPU (a random one built under
    ``folder``), with no stop token, so that every call makes all the tokens it is asked for."""
    if size == "demo":
        model = load_model("demo", dtype="fp32", device="cpu")
    else:
        model = load_model(str(build_tiny_model("llava-llama", folder / size, size=size)), dtype="fp32", device="cpu")
    model.eos_ids = ()
    return model


def prepare(model: VisionLanguageModel, batch: int, demo: bool) -> dict[str, torch.Tensor]:
    """``batch`` sample images (the demo's scenes for the demo model), repeated as needed."""
    paths = sorted(p for p in SAMPLES.iterdir() if p.name.startswith("scene_") or not demo)
    images = [Image.open(paths[i % len(paths)]).convert("RGB") for i in range(batch)]
    return model.prepare(images, "Describe the scene." if demo else PROMPT)


class PrefillClock:
    """Times ``vacap.decode._prefill`` inside each call, so a call's decode part is known."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._prefill = decode._prefill

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = self._prefill(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out

        decode._prefill = timed


def call(model, inputs, name: str, risk: bool, max_new: int, clock: PrefillClock):
    """One call -> (seconds, prefill seconds, tokens)."""
    config = DecodeConfig(max_new_tokens=max_new, risk=risk, **SETTINGS[name])
    clock.seconds = 0.0
    start = time.perf_counter()
    out = decode.generate(model, inputs, steering_for(model, config), max_new, risk=RiskSettings.of(config))
    seconds = time.perf_counter() - start
    tokens = [g.tokens for g in out]
    if any(len(t) != max_new for t in tokens):
        raise RuntimeError(f"{name} made {[len(t) for t in tokens]} tokens per row, not {max_new}")
    return seconds, clock.seconds, tokens


def measure(model, inputs, names: list[str], rounds: int, max_new: int, clock: PrefillClock) -> dict:
    """-> {(setting, risk): [(seconds, decode seconds) per round]}."""
    for name in names:  # warm-up
        for risk in (False, True):
            call(model, inputs, name, risk, 2, clock)
    times: dict = {(name, risk): [] for name in names for risk in (False, True)}
    for r in range(rounds):
        for name in names:
            order = (False, True) if r % 2 == 0 else (True, False)
            got = {}
            for risk in order:
                seconds, prefill, got[risk] = call(model, inputs, name, risk, max_new, clock)
                times[name, risk].append((seconds, seconds - prefill))
            if got[False] != got[True]:
                raise RuntimeError(f"risk changed {name}'s tokens")
    return times


def table(title: str, figures: dict, names: list[str], batch: int, max_new: int) -> list[str]:
    lines = [
        f"\n### {title}\n",
        "| setting | tokens/s | with risk | ratio | decode ms/token | with risk | decode slower by | quartiles |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    made = batch * max_new

    def median(values, part: int) -> float:
        return statistics.median(v[part] for v in values)

    for name in names:
        plain, risky = figures[name, False], figures[name, True]
        slower = sorted((r[1] / p[1] - 1) * 100 for p, r in zip(plain, risky))
        quartiles = statistics.quantiles(slower, n=4) if len(slower) > 1 else slower * 3
        lines.append(
            f"| {name} | {made / median(plain, 0):.1f} | {made / median(risky, 0):.1f} "
            f"| {median(plain, 0) / median(risky, 0):.3f} | {median(plain, 1) / made * 1000:.2f} "
            f"| {median(risky, 1) / made * 1000:.2f} | {statistics.median(slower):+.1f} % "
            f"| {quartiles[0]:+.1f}, {quartiles[2]:+.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="demo,short,mid", help=f"comma-separated, from {','.join(SIZE_CHOICES)}")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--settings", default="greedy,vasparse", help=f"from {','.join(SETTINGS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    sizes = choices(args.sizes, SIZE_CHOICES, "--sizes", parser)
    names = choices(args.settings, SETTINGS, "--settings", parser)
    batches = [int(b) for b in args.batch.split(",")]
    clock = PrefillClock()
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            model = sized_model(size, Path(tmp))
            params = sum(p.numel() for p in model.hf.parameters()) / 1e6
            for batch in batches:
                inputs = prepare(model, batch, size == "demo")
                figures = measure(model, inputs, names, args.rounds, args.max_new_tokens, clock)
                title = (
                    f"{size}: {params:.1f}M parameters, {len(model.layers)} layers, fp32, batch {batch}, prompt "
                    f"{inputs['input_ids'].shape[1]} tokens, {args.max_new_tokens} new tokens, median of "
                    f"{args.rounds} rounds, {torch.get_num_threads()} threads"
                )
                print("\n".join(table(title, figures, names, batch, args.max_new_tokens)), flush=True)


if __name__ == "__main__":
    main()

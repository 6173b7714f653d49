"""What VISTA costs beside greedy: tokens/s, prefill and decode step, side by side.

    OMP_NUM_THREADS=1 python benchmarks/vista_cost.py                  # demo, short, mid; batch 1 and 8
    OMP_NUM_THREADS=1 python benchmarks/vista_cost.py --sizes demo --batch 1 --rounds 3

Sizes as in benchmarks/risk_cost.py (the demo model, and the random llava-llama checkpoints of
``vacap.tiny_models``: ``short`` is the ~310M, 24-layer text model with 16 image tokens, ``mid``
the same with 576). EOS never ends a call early, so every setting makes the same N tokens per
row. Each round runs every setting once, in rotating order; figures are medians over rounds.

Columns: tokens/s of whole calls (batch x N over the call's seconds) and its ratio to greedy's;
the prefill's seconds (VISTA's vector adds two plain prefills, one of them without the image
tokens) and ratio; decode ms per token (the call less its prefill) and ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from risk_cost import SIZE_CHOICES, PrefillClock, prepare, sized_model
from speed import choices

import vacap.decode as decode
from vacap.config import DecodeConfig
from vacap.methods import steering_for

SETTINGS = {
    "greedy": dict(method="greedy"),
    "vista": dict(method="vista"),
    "vsv-only": dict(method="vista", vista_gamma=0.0),
    "sla-only": dict(method="vista", vista_lambda=0.0),
}


def call(model, inputs, name: str, max_new: int, clock: PrefillClock) -> tuple[float, float]:
    """One call -> (seconds, prefill seconds)."""
    config = DecodeConfig(max_new_tokens=max_new, **SETTINGS[name])
    clock.seconds = 0.0
    start = time.perf_counter()
    out = decode.generate(model, inputs, steering_for(model, config), max_new)
    seconds = time.perf_counter() - start
    if any(len(g.tokens) != max_new for g in out):
        raise RuntimeError(f"{name} made {[len(g.tokens) for g in out]} tokens per row, not {max_new}")
    return seconds, clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="demo,short,mid", help=f"comma-separated, from {','.join(SIZE_CHOICES)}")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"from {','.join(SETTINGS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    sizes = choices(args.sizes, SIZE_CHOICES, "--sizes", parser)
    names = choices(args.settings, SETTINGS, "--settings", parser)
    if "greedy" not in names:
        names.insert(0, "greedy")
    clock, made = PrefillClock(), args.max_new_tokens
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            model = sized_model(size, Path(tmp))
            for batch in [int(b) for b in args.batch.split(",")]:
                inputs = prepare(model, batch, size == "demo")
                for name in names:  # warm-up
                    call(model, inputs, name, 2, clock)
                times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
                for r in range(args.rounds):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        times[name].append(call(model, inputs, name, made, clock))
                whole = {name: statistics.median(t for t, _ in times[name]) for name in names}
                prefill = {name: statistics.median(p for _, p in times[name]) for name in names}
                step = {name: statistics.median((t - p) / made for t, p in times[name]) for name in names}
                print(
                    f"\n### {size}: {len(model.layers)} layers, fp32, batch {batch}, prompt "
                    f"{inputs['input_ids'].shape[1]} tokens, {made} new tokens, median of {args.rounds} rounds, "
                    f"{torch.get_num_threads()} threads\n\n"
                    "| setting | tokens/s | vs greedy | prefill s | vs greedy | decode ms/token | vs greedy |\n"
                    "|---|---:|---:|---:|---:|---:|---:|"
                )
                for name in names:
                    print(
                        f"| {name} | {batch * made / whole[name]:.1f} | {whole['greedy'] / whole[name]:.2f} "
                        f"| {prefill[name]:.3f} | {prefill[name] / prefill['greedy']:.2f} "
                        f"| {step[name] * 1000:.2f} | {step[name] / step['greedy']:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()

"""The decode step of each setting against greedy's, timed inside the call, side by side.

    python benchmarks/steps.py                                # mid model, batch 8, 32 steps, 3 pairs
    python benchmarks/steps.py --batch 1 --settings vasparse,selection-only --pairs 5

``speed.py`` derives ms per step from two whole calls (N tokens minus one token), so a second
of noise in either prefill moves a step by tens of ms at batch 8. Here the clock starts when the
prefill ends (the steering's ``after_prefill`` hook) and stops when the call returns: the
figure is the steps alone, stop checks included. Greedy and each setting take turns, one call
each per pair, so machine load hits them alike; the table gives the median ms per step and the
median of the per-pair ratios (greedy's ms over the setting's: above 1 is faster than greedy).
Same random checkpoints, inputs and dtype as ``speed.py``; EOS never ends a call early.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from speed import SETTINGS, load, prepare

from vacap.config import DecodeConfig
from vacap.decode import generate
from vacap.methods import steering_for
from vacap.tiny_models import build_tiny_model


def step_ms(model, inputs: dict, settings: dict, steps: int) -> float:
    steering = steering_for(model, DecodeConfig(max_new_tokens=steps, **settings))
    after_prefill = steering.after_prefill
    started = {}

    def clocked(cache) -> None:
        after_prefill(cache)
        started["at"] = time.perf_counter()

    steering.after_prefill = clocked
    outputs = generate(model, inputs, steering, steps)
    seconds = time.perf_counter() - started["at"]
    if any(len(out.tokens) != steps for out in outputs):
        raise SystemExit("a row stopped early")
    return 1000 * seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mid")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--settings", default="vasparse")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        model = load(build_tiny_model("llava-llama", Path(folder), size=args.size), args.dtype)
        inputs = prepare(model, args.batch)
        names = ["greedy", *args.settings.split(",")]
        step_ms(model, inputs, SETTINGS["greedy"], 2)  # first use of each shape prepares kernels
        times = {name: [] for name in names}
        for _ in range(args.pairs):
            for name in names:
                times[name].append(step_ms(model, inputs, SETTINGS[name], args.steps))
    prompt = inputs["input_ids"].shape[1]
    print(f"{args.size}, {args.dtype}, batch {args.batch}, prompt {prompt} tokens, {args.steps} steps per call, "
          f"median of {args.pairs} pairs, {torch.get_num_threads()} threads\n")  # fmt: skip
    print("| setting | ms/step | step speed vs greedy | per pair |")
    print("|---|---:|---:|---|")
    for name in names:
        ratios = [g / s for g, s in zip(times["greedy"], times[name])]
        print(
            f"| vacap {name} | {statistics.median(times[name]):.1f} | {statistics.median(ratios):.2f} | "
            f"{', '.join(f'{r:.2f}' for r in ratios)} |"
        )


if __name__ == "__main__":
    main()

"""Decode speed of every method against greedy, measured side by side in one run.

    python benchmarks/speed.py                      # tiny and mid-size random LLaVA, bf16
    python benchmarks/speed.py --sizes mid --rounds 5 --max-new-tokens 64

Builds random llava-llama checkpoints offline (``vacap.tiny_models``; the mid-size one has
~310M parameters and 576 image tokens per image, like LLaVA-1.5's cache), then times each
setting on the same images, the settings interleaved round by round so that machine load hits
them alike. EOS is switched off for timing, so every setting decodes the same number of steps
(otherwise a method that ends its captions sooner would look slower per token, its prefill
spread over fewer tokens). Prints a Markdown table: prefill seconds, milliseconds per decode
step, tokens/s over the whole call, and the ratios to greedy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vacap.config import DecodeConfig
from vacap.decode import generate
from vacap.diagnostics import Diagnostics
from vacap.methods import steering_for
from vacap.model import load_model
from vacap.tiny_models import build_tiny_model

SETTINGS = {
    "greedy": dict(method="greedy"),
    "vasparse (defaults)": dict(method="vasparse"),
    "vasparse selection only": dict(method="vasparse", alpha=0.0, sink_beta=0.0),
    "vasparse sink only": dict(method="vasparse", sparsity=0.0, alpha=0.0),
    "vasparse contrast only": dict(method="vasparse", sparsity=0.0, sink_beta=0.0),
    "vasparse + kv-budget 0.5": dict(method="vasparse", kv_budget=0.5),
    "vcd": dict(method="vcd"),
    "fastv": dict(method="fastv"),
    "vasparse + diagnostics tokens": dict(method="vasparse", diagnostics="tokens"),
}
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def timed(model, inputs, settings: dict, max_new: int) -> float:
    config = DecodeConfig(max_new_tokens=max_new, **settings)
    start = time.perf_counter()
    steering = steering_for(model, config)
    if config.diagnostics != "none":
        steering = Diagnostics(steering, model, config.start_layer)
    outputs = generate(model, inputs, steering, max_new)
    if config.diagnostics != "none":  # turning the statistics into record fields is part of the cost
        [steering.row(b, out.tokens, config.diagnostics) for b, out in enumerate(outputs)]
    return time.perf_counter() - start


def measure(size: str, rounds: int, max_new: int, batch: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model("llava-llama", Path(tmp) / size, size=size)
        model = load_model(str(path), dtype="bf16", device="cpu")
    model.eos_ids = ()
    images = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.iterdir())[:batch]]
    inputs = model.prepare(images, "Please describe this image in detail.")
    params = sum(p.numel() for p in model.hf.parameters()) / 1e6
    prompt_len = inputs["input_ids"].shape[1]

    for settings in SETTINGS.values():  # warm-up: allocator, kernels, lazy imports
        timed(model, inputs, settings, 2)
    prefills = {name: [] for name in SETTINGS}
    totals = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, settings in SETTINGS.items():
            prefills[name].append(timed(model, inputs, settings, 1))
            totals[name].append(timed(model, inputs, settings, max_new))

    def row(name):
        prefill, total = statistics.median(prefills[name]), statistics.median(totals[name])
        return prefill, (total - prefill) / (max_new - 1) * 1000, batch * max_new / total

    base = row("greedy")
    lines = [
        f"\n### {size}: {params:.1f}M parameters, bf16, batch {batch}, prompt {prompt_len} tokens, "
        f"{max_new} new tokens, median of {rounds} rounds, {torch.get_num_threads()} threads\n",
        "| setting | prefill s | vs greedy | ms/step | vs greedy | tokens/s | vs greedy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in SETTINGS:
        prefill, step, rate = row(name)
        lines.append(
            f"| {name} | {prefill:.3f} | {prefill / base[0]:.2f} | {step:.1f} | {step / base[1]:.2f} "
            f"| {rate:.1f} | {rate / base[2]:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    for size in args.sizes.split(","):
        print("\n".join(measure(size, args.rounds, args.max_new_tokens, args.batch)), flush=True)


if __name__ == "__main__":
    main()

"""Each decoding method's tokens/s against greedy's, side by side on the same batch.

    OMP_NUM_THREADS=1 python benchmarks/method_speed.py --sizes short,wide --batch 1,8
    OMP_NUM_THREADS=1 python benchmarks/method_speed.py --methods vasparse,vcd,vasparse+contrast_layers=4

A method is a name of ``vacap.config.METHODS`` at its defaults, or a name followed by
``+setting=value`` pairs (``vasparse+contrast_layers=4+alpha=1``; a list as ``var_dims=22/100``). Sizes as in
``risk_cost.py``: ``demo`` (vacap's shipped model on its scenes) and the random llava-llama
checkpoints of ``vacap.tiny_models`` (``short``: the ~310M, 24-layer text model with 16 image
tokens, where decode steps take the time, as on a GPU; ``wide``: 6 layers of LLaVA-1.5-7B's
width, 576 image tokens).

EOS never ends a call early (vacap's stop set is emptied), so every call makes the same
tokens per row and does the same work but for the method. Each round runs greedy and every
method in an order that rotates, so the machine's load hits them alike; a method's figure is
the median over rounds of its tokens/s over greedy's in the same round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vacap.decode as decode
from vacap.config import METHODS, DecodeConfig
from vacap.methods import steering_for

from risk_cost import SIZE_CHOICES, prepare, sized_model
from speed import choices


def parse_method(text: str) -> dict:
    """'vasparse+contrast_layers=4+alpha=1' -> DecodeConfig keywords; ValueError when it names no
    method or a setting DecodeConfig refuses."""
    method, *pairs = text.split("+")
    if method not in METHODS:
        raise ValueError(f"{text}: the method must be one of {', '.join(METHODS)}")
    settings: dict = dict(method=method)
    for pair in pairs:
        name, _, value = pair.partition("=")
        field = DecodeConfig.__dataclass_fields__.get(name)
        if field is None or not value:
            raise ValueError(f"{text}: {pair!r} is not setting=value of a DecodeConfig field")
        kind = type(field.default) if field.default is not None else float
        # A tuple (var_dims) is written with "/" between its whole numbers: var_dims=22/100.
        settings[name] = tuple(int(item) for item in value.split("/")) if kind is tuple else kind(value)
    DecodeConfig(**settings)
    return settings


def tokens_per_second(model, inputs, settings: dict, max_new: int) -> float:
    config = DecodeConfig(max_new_tokens=max_new, **settings)
    start = time.perf_counter()
    out = decode.generate(model, inputs, steering_for(model, config), max_new)
    seconds = time.perf_counter() - start
    if any(len(g.tokens) != max_new for g in out):
        raise RuntimeError(f"{settings} made {[len(g.tokens) for g in out]} tokens per row, not {max_new}")
    return len(out) * max_new / seconds


def measure(model, inputs, methods: dict[str, dict], rounds: int, max_new: int) -> dict[str, list[float]]:
    """-> {label: [tokens/s per round]}, greedy first."""
    runs = {"greedy": dict(method="greedy"), **methods}
    for settings in runs.values():  # warm-up
        tokens_per_second(model, inputs, settings, 2)
    speeds: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            speeds[label].append(tokens_per_second(model, inputs, runs[label], max_new))
    return speeds


def table(title: str, speeds: dict[str, list[float]]) -> list[str]:
    lines = [f"\n### {title}\n", "| method | tokens/s | against greedy | range over rounds |", "|---|---:|---:|---|"]
    greedy = speeds["greedy"]
    for label, values in speeds.items():
        ratios = [v / g for v, g in zip(values, greedy)]
        lines.append(
            f"| {label} | {statistics.median(values):.1f} | {statistics.median(ratios):.3f} "
            f"| {min(ratios):.3f} to {max(ratios):.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="short", help=f"comma-separated, from {','.join(SIZE_CHOICES)}")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument(
        "--methods", default=",".join(m for m in METHODS if m != "greedy"),
        help="comma-separated methods, each optionally with +setting=value pairs",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    sizes = choices(args.sizes, SIZE_CHOICES, "--sizes", parser)
    try:
        methods = {text: parse_method(text) for text in args.methods.split(",") if text}
    except ValueError as exc:
        parser.error(str(exc))
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            model = sized_model(size, Path(tmp))
            params = sum(p.numel() for p in model.hf.parameters()) / 1e6
            for batch in (int(b) for b in args.batch.split(",")):
                inputs = prepare(model, batch, size == "demo")
                speeds = measure(model, inputs, methods, args.rounds, args.max_new_tokens)
                title = (
                    f"{size}: {params:.1f}M parameters, {len(model.layers)} layers, fp32, batch {batch}, prompt "
                    f"{inputs['input_ids'].shape[1]} tokens, {args.max_new_tokens} new tokens, median of "
                    f"{args.rounds} rounds, {torch.get_num_threads()} threads"
                )
                print("\n".join(table(title, speeds)), flush=True)


if __name__ == "__main__":
    main()

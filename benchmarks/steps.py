"""The decode step of each setting against greedy's, timed inside the call, side by side.

    python benchmarks/steps.py                                # mid model, batch 8, 32 steps, 3 pairs
    python benchmarks/steps.py --batch 1 --settings vasparse,selection-only --pairs 5
    python benchmarks/steps.py --turns step --steps 40            # settings alternate every step
    python benchmarks/steps.py --size wide --turns step --steps 30  # 6 layers of a 7B model's width

``speed.py`` derives ms per step from two whole calls (N tokens minus one token), so a second
of noise in either prefill moves a step by tens of ms at batch 8. Here the clock starts when the
prefill ends (the steering's ``after_prefill`` hook) and stops when the call returns: the
figure is the steps alone, stop checks included. Greedy and each setting take turns, one call
each per pair, so machine load hits them alike; the table gives the median ms per step and the
median of the per-pair ratios (greedy's ms over the setting's: above 1 is faster than greedy).
Same random checkpoints, inputs and dtype as ``speed.py``; EOS never ends a call early.

On a shared machine a 7-second call still meets load that its partner missed (single pairs at
batch 8 ranged from 0.63 to 1.11). ``--turns step`` narrows that: each setting prefills its own
cache once, then the settings take turns one decode step at a time (the step of ``generate``:
head, token choice, every layer, one stop check), and each step's ratio is taken against the
greedy step just before it. The table then adds the quartiles of those per-step ratios.
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
from vacap.decode import _prefill, forward, generate
from vacap.methods import steering_for
from vacap.tiny_models import SIZES, build_tiny_model


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


def stepper(model, inputs: dict, settings: dict, steps: int):
    """Prefill, then yield after each decode step: ``generate``'s step with argmax choices and its
    one read-back (the stop check), without its bookkeeping of tokens and lengths."""
    steering = steering_for(model, DecodeConfig(max_new_tokens=steps, **settings))
    cache, hidden, last_input, position = _prefill(model, inputs, steering, steps + 1)
    valid = torch.ones(hidden.shape[0], 1, dtype=torch.bool)
    eos = torch.tensor(model.eos_ids)
    for _ in range(steps):
        logits = steering.head(model, hidden, last_input, position - 1)
        token = steering.next_token(logits, last_input, position - 1, lambda z: z.argmax(-1))
        bool(torch.isin(token, eos).all())  # generate's stop check: its one read-back per step
        last_input = model.embed_tokens(token)
        hidden = forward(model, cache, last_input[:, None], position, valid, steering)[:, -1]
        position = position + 1
        yield


def step_turns(model, inputs: dict, names: list[str], steps: int) -> dict[str, list[float]]:
    """-> {setting: ms of each step}, the settings' steps interleaved one by one."""
    runs = {name: stepper(model, inputs, SETTINGS[name], steps + 1) for name in names}
    for run in runs.values():
        next(run)  # the first step after the prefill warms that batch's shapes
    times = {name: [] for name in names}
    for _ in range(steps):
        for name, run in runs.items():
            started = time.perf_counter()
            next(run)
            times[name].append(1000 * (time.perf_counter() - started))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mid", choices=SIZES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--settings", default="vasparse")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--turns", choices=["call", "step"], default="call", help="what greedy and a setting alternate (step: --pairs is unused)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        model = load(build_tiny_model("llava-llama", Path(folder), size=args.size), args.dtype)
        inputs = prepare(model, args.batch)
        names = ["greedy", *args.settings.split(",")]
        if args.turns == "step":
            times = step_turns(model, inputs, names, args.steps)
        else:
            step_ms(model, inputs, SETTINGS["greedy"], 2)  # first use of each shape prepares kernels
            times = {name: [] for name in names}
            for _ in range(args.pairs):
                for name in names:
                    times[name].append(step_ms(model, inputs, SETTINGS[name], args.steps))
    prompt = inputs["input_ids"].shape[1]
    turns = f"{args.steps} steps, taking turns step by step" if args.turns == "step" else (
        f"{args.steps} steps per call, median of {args.pairs} pairs")
    print(f"{args.size}, {args.dtype}, batch {args.batch}, prompt {prompt} tokens, {turns}, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    last = "quartiles of the per-step ratios" if args.turns == "step" else "per pair"
    print(f"| setting | ms/step | step speed vs greedy | {last} |")
    print("|---|---:|---:|---|")
    for name in names:
        ratios = [g / s for g, s in zip(times["greedy"], times[name])]
        spread = statistics.quantiles(ratios, n=4) if args.turns == "step" else ratios
        print(
            f"| vacap {name} | {statistics.median(times[name]):.1f} | {statistics.median(ratios):.2f} | "
            f"{', '.join(f'{r:.2f}' for r in spread)} |"
        )


if __name__ == "__main__":
    main()

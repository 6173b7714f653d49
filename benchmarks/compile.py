"""Greedy decode steps three ways, side by side in one run: vacap's dynamic step (``forward``
over the live slots, the default), the static-shape step run eagerly, and the static step
torch.compile'd (``--compile``).

    python benchmarks/compile.py                              # mid-size random LLaVA, fp32, batch 1 and 8
    python benchmarks/compile.py --batch 1 --rounds 2 --max-new-tokens 16

Builds the random llava-llama checkpoint of ``vacap.tiny_models`` offline (``--size mid``: ~310M
parameters, 576 image tokens per image, a 607-token prompt). EOS is taken out of the stop set so
that every call makes exactly N tokens per row.

Time: the three take turns round by round in one process, so that machine load hits them alike.
ms per step is the median, over the rounds, of the mean time between two successive next-token
choices within a call (a step: the layers, final norm and LM head; the prefill is not in it);
tokens/s is batch x N over the median whole call, prefill included. Compile s is the first
compiled call at a batch size (a new shape compiles again) minus the median compiled call.
The tokens of the three must agree; the script says whether they did.

Prints one Markdown table per batch size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from vacap.decode import Steering, generate
from vacap.model import DTYPES, VisionLanguageModel, load_model
from vacap.tiny_models import SIZES, build_tiny_model

KINDS = ("dynamic", "static", "compiled")
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
PROMPT = "Please describe this image in detail."


class Clock(Steering):
    """Greedy, noting when each next token is chosen (its hooks stay the base ones, so the
    static step is allowed)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def next_token(
        self, logits: torch.Tensor, token_input: torch.Tensor, position: torch.Tensor, choose: Callable
    ) -> torch.Tensor:
        token = choose(logits)
        self.times.append(time.perf_counter())
        return token


def call(model: VisionLanguageModel, inputs, kind: str, max_new: int) -> tuple[float, float, list[list[int]]]:
    """-> (seconds of the call, mean seconds per step, tokens)."""
    clock = Clock()
    start = time.perf_counter()
    outputs = generate(model, inputs, clock, max_new, steps=kind)
    total = time.perf_counter() - start
    made = [len(out.tokens) for out in outputs]
    if made != [max_new] * len(made):
        raise RuntimeError(f"{kind} made {made} new tokens per row, not {max_new}")
    step = (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)
    return total, step, [out.tokens for out in outputs]


def measure(model, inputs, rounds: int, max_new: int) -> tuple[dict[str, tuple[float, float]], float, bool]:
    """-> ({kind: (median call s, median step s)}, compile s, whether all kinds gave the same tokens)."""
    first = {kind: call(model, inputs, kind, max_new) for kind in KINDS}
    totals = {kind: [] for kind in KINDS}
    steps = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind in KINDS:
            total, step, _ = call(model, inputs, kind, max_new)
            totals[kind].append(total)
            steps[kind].append(step)
    medians = {kind: (statistics.median(totals[kind]), statistics.median(steps[kind])) for kind in KINDS}
    compile_s = first["compiled"][0] - medians["compiled"][0]
    same = first["dynamic"][2] == first["static"][2] == first["compiled"][2]
    return medians, compile_s, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="mid", choices=SIZES)
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.max_new_tokens < 2:
        parser.error("--max-new-tokens must be at least 2: a step needs two tokens around it")

    with tempfile.TemporaryDirectory() as folder:
        model_dir = build_tiny_model("llava-llama", Path(folder), size=args.size)
        model = load_model(str(model_dir), dtype=args.dtype, device="cpu")
        model.eos_ids = ()
        paths = sorted(SAMPLES.iterdir())
        n_params = sum(p.numel() for p in model.hf.parameters()) / 1e6
        for batch in (int(b) for b in args.batch.split(",")):
            images = [Image.open(paths[i % len(paths)]).convert("RGB") for i in range(batch)]
            inputs = model.prepare(images, PROMPT)
            figures, compile_s, same = measure(model, inputs, args.rounds, args.max_new_tokens)
            base_total, base_step = figures["dynamic"]
            print(
                f"\n### {args.size}: {n_params:.1f}M parameters, {args.dtype}, batch {batch}, prompt "
                f"{inputs['input_ids'].shape[1]} tokens, {args.max_new_tokens} new tokens, median of "
                f"{args.rounds} rounds, {torch.get_num_threads()} threads\n"
            )
            print("| step | ms/step | vs dynamic | tokens/s | vs dynamic |")
            print("|---|---:|---:|---:|---:|")
            for kind, (total, step) in figures.items():
                rate = batch * args.max_new_tokens / total
                base_rate = batch * args.max_new_tokens / base_total
                print(f"| {kind} | {step * 1000:.1f} | {step / base_step:.2f} | {rate:.1f} | {rate / base_rate:.2f} |")
            print(f"\ncompile: {compile_s:.1f} s (first compiled call at this batch size, less a later one); "
                  f"tokens {'identical' if same else 'DIFFER'} across the three")  # fmt: skip


if __name__ == "__main__":
    main()

"""Speed and peak memory of every vacap setting beside Hugging Face ``generate``, in one run.

    python benchmarks/speed.py                                  # tiny and mid-size random LLaVA, fp32, batch 1
    python benchmarks/speed.py --sizes mid --batch 1,8 --rounds 5
    python benchmarks/speed.py --settings greedy,vasparse --dtype bf16 --max-new-tokens 32
    python benchmarks/speed.py --arch qwen2.5-vl --sizes mid --batch 1,8     # the Qwen2-VL family

Builds random llava-llama checkpoints offline (``vacap.tiny_models``; the mid-size one has
~310M parameters and 576 image tokens per image, like LLaVA-1.5's cache), or of ``--arch``
(qwen2-vl, qwen2.5-vl: the mid-size text model with Qwen's M-RoPE and q/k/v biases, and each
sample image at its own resolution, up to 640 image tokens). The reference row is
what a user would run instead of vacap: the same loaded checkpoint's own
``generate(do_sample=False, num_beams=1)`` with transformers' default attention (SDPA), on the
same prepared inputs (``model.prepare``), in the same dtype. Every ratio in the tables is to it.

EOS never ends a call early, so every row of every setting makes the same N new tokens
(otherwise a setting that ends its captions sooner would look slower per token, its prefill
spread over fewer tokens): vacap's stop set is emptied and ``generate`` gets
``min_new_tokens=N``; each call is checked to have made N tokens per row.

Time: the settings take turns round by round in one process, so that machine load hits them
alike. Prefill seconds is the median time of a call that makes one token; ms per decode step is
(median N-token call - median one-token call) / (N - 1); tokens/s is batch x N over the median
N-token call.

Memory: each (setting, batch) also runs once in a fresh child process, which loads the
checkpoint, reads every weight (safetensors files are memory-mapped, so the weights must be
resident before the starting point), notes its resident memory, makes the N tokens and reports
how far its peak resident memory (``ru_maxrss``) rose above that point: the call's own working
memory, prefill included.

Prints one Markdown table per (size, batch), ready for benchmarks/RESULTS.md. "step speed vs greedy" is
vacap greedy's ms per decode step over the setting's: the speed of a setting's step relative to
greedy's (1.00 for greedy itself; above 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vacap.config import DecodeConfig
from vacap.decode import generate
from vacap.diagnostics import Diagnostics
from vacap.methods import steering_for
from vacap.model import DTYPES, VisionLanguageModel, load_model
from vacap.tiny_models import ARCHITECTURES, SIZES, build_tiny_model

HF = "hf"  # Hugging Face generate; always measured, as every ratio is to it
SETTINGS = {
    "greedy": dict(method="greedy"),
    "vasparse": dict(method="vasparse"),
    "selection-only": dict(method="vasparse", alpha=0.0, sink_beta=0.0),
    "sink-only": dict(method="vasparse", sparsity=0.0, alpha=0.0),
    "contrast-only": dict(method="vasparse", sparsity=0.0, sink_beta=0.0),
    # The setting issue 13 proposes for language-prior hallucinations (benchmarks/RESULTS.md).
    "contrast-4": dict(method="vasparse", contrast_layers=4, mask_rate=0.5, alpha=1.0),
    "kv-budget-0.5": dict(method="vasparse", kv_budget=0.5),
    "vcd": dict(method="vcd"),
    "fastv": dict(method="fastv"),
    # Random checkpoints have no sink dimension of their own (docs/VAR.md, section 2), so one is
    # given: VAR then runs in full; what it costs does not depend on how many tokens are sinks.
    "var": dict(method="var", var_dims=(0,)),
    # PAI (docs/PAI.md) and each of its mechanisms alone.
    "pai": dict(method="pai"),
    "pai-attention-only": dict(method="pai", alpha=0.0),
    "pai-guidance-only": dict(method="pai", pai_alpha=0.0),
    "diagnostics-tokens": dict(method="vasparse", diagnostics="tokens"),
}
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
PROMPT = "Please describe this image in detail."


def load(model_dir: Path, dtype: str) -> VisionLanguageModel:
    model = load_model(str(model_dir), dtype=dtype, device="cpu")
    model.eos_ids = ()
    return model


def prepare(model: VisionLanguageModel, batch: int) -> dict[str, torch.Tensor]:
    """The first ``batch`` sample images (repeated when there are fewer), one prompt for all."""
    paths = sorted(SAMPLES.iterdir())
    images = [Image.open(paths[i % len(paths)]).convert("RGB") for i in range(batch)]
    return model.prepare(images, PROMPT)


def run(model: VisionLanguageModel, inputs: dict[str, torch.Tensor], name: str, max_new: int) -> None:
    """One call of one setting on a prepared batch; fails unless every row made ``max_new`` tokens."""
    if name == HF:
        out = model.hf.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=max_new, min_new_tokens=max_new,
            pad_token_id=model.pad_id,
        )  # fmt: skip
        # Rows are padded only after they stop, and min_new_tokens forbids stopping before max_new.
        made = [out.shape[1] - inputs["input_ids"].shape[1]] * out.shape[0]
    else:
        config = DecodeConfig(max_new_tokens=max_new, **SETTINGS[name])
        steering = steering_for(model, config)
        if config.diagnostics != "none":
            steering = Diagnostics(steering, model, config.start_layer)
        outputs = generate(model, inputs, steering, max_new)
        if config.diagnostics != "none":  # turning the statistics into record fields is part of the cost
            for b, out in enumerate(outputs):
                steering.row(b, out.tokens, config.diagnostics)
        made = [len(out.tokens) for out in outputs]
    if made != [max_new] * len(made):
        raise RuntimeError(f"{name} made {made} new tokens per row, not {max_new}")


def timed(model, inputs, name: str, max_new: int) -> float:
    start = time.perf_counter()
    run(model, inputs, name, max_new)
    return time.perf_counter() - start


def time_settings(model, inputs, names: list[str], rounds: int, max_new: int) -> dict[str, tuple[float, float]]:
    """-> {setting: (median one-token call s, median max_new-token call s)}, settings interleaved."""
    for name in names:  # warm-up: allocator, kernels, lazy imports
        run(model, inputs, name, 2)
    prefills = {name: [] for name in names}
    totals = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            prefills[name].append(timed(model, inputs, name, 1))
            totals[name].append(timed(model, inputs, name, max_new))
    return {name: (statistics.median(prefills[name]), statistics.median(totals[name])) for name in names}


def resident_kb() -> int:
    status = Path("/proc/self/status").read_text(encoding="ascii")
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def peak_rise_mb(model_dir: Path, name: str, batch: int, dtype: str, max_new: int) -> float:
    """Runs in a fresh child process: how far one call raises the peak resident memory, in MB."""
    model = load(model_dir, dtype)
    inputs = prepare(model, batch)
    for parameter in model.hf.parameters():
        parameter.sum()
    start = resident_kb()
    run(model, inputs, name, max_new)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024


def measure_memory(model_dir: Path, name: str, batch: int, dtype: str, max_new: int) -> float:
    command = [sys.executable, __file__, "--child", str(model_dir), "--settings", name, "--batch", str(batch),
               "--dtype", dtype, "--max-new-tokens", str(max_new)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"the memory run of {name} at batch {batch} failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def measure(model, model_dir: Path, inputs, names: list[str], args) -> dict[str, tuple[float, ...]]:
    """-> {setting: (prefill s, ms per decode step, tokens/s, peak MB)} for one prepared batch."""
    batch, n = inputs["input_ids"].shape[0], args.max_new_tokens
    peaks = {name: measure_memory(model_dir, name, batch, args.dtype, n) for name in names}
    times = time_settings(model, inputs, names, args.rounds, n)
    figures = {}
    for name in names:
        prefill, total = times[name]
        figures[name] = (prefill, (total - prefill) / (n - 1) * 1000, batch * n / total, peaks[name])
    return figures


def table(title: str, figures: dict[str, tuple[float, ...]], hf_label: str) -> list[str]:
    def ratio(value: float, base: float) -> str:
        return f"{value / base:.2f}" if base > 0 else "n/a"

    base = figures[HF]
    # Issue 10's goal 2 compares a method's decode step with vacap greedy's, not with HF's.
    greedy_step = figures["greedy"][1] if "greedy" in figures else 0.0
    lines = [
        f"\n### {title}\n",
        "| setting | prefill s | vs HF | ms/step | vs HF | step speed vs greedy | tokens/s | vs HF | peak MB | vs HF |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (prefill, step, rate, peak) in figures.items():
        label = hf_label if name == HF else f"vacap {name}"
        lines.append(
            f"| {label} | {prefill:.3f} | {ratio(prefill, base[0])} | {step:.1f} | {ratio(step, base[1])} "
            f"| {ratio(greedy_step, step)} | {rate:.1f} | {ratio(rate, base[2])} | {peak:.0f} | {ratio(peak, base[3])} |"
        )
    return lines


def choices(text: str, allowed, what: str, parser) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        parser.error(f"{what} {','.join(unknown) or '(empty)'}: choose from {','.join(allowed)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llava-llama", choices=ARCHITECTURES)
    parser.add_argument("--sizes", default="tiny,mid", help=f"comma-separated, from {','.join(SIZES)}")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated vacap settings (HF generate is always measured): "
                             f"{','.join(SETTINGS)}")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rise = peak_rise_mb(Path(args.child), args.settings, int(args.batch), args.dtype, args.max_new_tokens)
        print(json.dumps(rise))
        return

    sizes = choices(args.sizes, SIZES, "--sizes", parser)
    names = [HF] + [name for name in choices(args.settings, [HF, *SETTINGS], "--settings", parser) if name != HF]
    if not all(b.strip().isdigit() and int(b) > 0 for b in args.batch.split(",")):
        parser.error(f"--batch {args.batch}: give positive whole numbers separated by commas, e.g. 1,8")
    batches = [int(b) for b in args.batch.split(",")]
    if args.rounds < 1 or args.max_new_tokens < 2:
        parser.error("--rounds must be at least 1 and --max-new-tokens at least 2 (a decode step after the prefill)")

    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = build_tiny_model(args.arch, Path(tmp) / size, size=size)
            model = load(model_dir, args.dtype)
            params = sum(p.numel() for p in model.hf.parameters()) / 1e6
            hf_label = f"HF generate ({model.hf.config._attn_implementation})"
            for batch in batches:
                inputs = prepare(model, batch)
                title = (
                    f"{args.arch} {size}: {params:.1f}M parameters, {args.dtype}, batch {batch}, prompt "
                    f"{inputs['input_ids'].shape[1]} tokens, {args.max_new_tokens} new tokens, "
                    f"median of {args.rounds} rounds, {torch.get_num_threads()} threads"
                )
                figures = measure(model, model_dir, inputs, names, args)
                print("\n".join(table(title, figures, hf_label)), flush=True)

if __name__ == "__main__":
    main()

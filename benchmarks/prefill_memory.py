"""Peak memory of one prefill, per setting, each in a fresh process so high-water marks are clean.

    python benchmarks/prefill_memory.py                       # mid-size random LLaVA, fp32, batch 1
    python benchmarks/prefill_memory.py --batch 4 --settings greedy,kv-budget-0.5

Builds the ~310M-parameter random llava-llama checkpoint (576 image tokens per image, the cache
length of LLaVA-1.5) once, then for each setting starts a child process that loads it, prepares
the batch, reads every weight (so that the memory-mapped checkpoint is resident), notes its
resident memory, runs the prefill and the first token (``max_new_tokens``
1), and reports how far the process's peak resident memory rose above that starting point.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "greedy": dict(method="greedy"),
    "vasparse": dict(method="vasparse"),
    "kv-budget-0.5": dict(method="vasparse", kv_budget=0.5),
}
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def _resident_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def child(model_dir: str, settings: dict, batch: int, dtype: str) -> dict:
    from PIL import Image

    from vacap.config import DecodeConfig
    from vacap.decode import generate
    from vacap.methods import steering_for
    from vacap.model import load_model

    model = load_model(model_dir, dtype=dtype, device="cpu")
    images = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.iterdir())[:batch]]
    inputs = model.prepare(images, "Please describe this image in detail.")
    config = DecodeConfig(max_new_tokens=1, **settings)
    # safetensors weights are memory-mapped: read them once so that they are resident before
    # the starting point, and the rise is the prefill's own working memory.
    for parameter in model.hf.parameters():
        parameter.sum()
    before = _resident_mb()
    generate(model, inputs, steering_for(model, config), 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": int(inputs["input_ids"].shape[1]), "start_mb": before, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_dir, name = args.child.split("::")
        print(json.dumps(child(model_dir, SETTINGS[name], args.batch, args.dtype)))
        return

    from vacap.tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model("llava-llama", Path(tmp) / "mid", size="mid")
        print("| setting | batch | prompt tokens | prefill peak above start, MB |")
        print("|---|---:|---:|---:|")
        for name in args.settings.split(","):
            command = [sys.executable, __file__, "--child", f"{model_dir}::{name}", "--batch", str(args.batch),
                       "--dtype", args.dtype]  # fmt: skip
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            rise = result["peak_mb"] - result["start_mb"]
            print(f"| {name} | {args.batch} | {result['tokens']} | {rise:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Peak memory of one prefill, vacap's settings beside Hugging Face generate, each in a fresh process.

    python benchmarks/prefill_memory.py                                  # mid and long, batch 1 and 4, fp32
    python benchmarks/prefill_memory.py --models long --batch 4 --settings greedy,kv-budget-0.5

Models (random weights, built offline by ``vacap.tiny_models``):

- ``mid``: the ~310M-parameter llava-llama, 576 image tokens per image (LLaVA-1.5's cache,
  about 600 prompt tokens);
- ``long``: the ~27M-parameter llava-next of size "long", whose anyres grid gives 2928 image
  tokens per square image of 384 px or more (LLaVA-NeXT's cache, about 2.9k prompt tokens); its
  text model is narrower than mid's so that 2 CPU cores prefill a batch of 4 in seconds;
- ``qwen-mid`` (not run by default): mid's text model as Qwen2.5-VL's (M-RoPE, q/k/v biases,
  grouped-query attention) with Qwen2.5-VL's vision tower, about 500 image tokens per image.

The images are the first sample images, each resized to 384 x 384 so that every one fills the
anyres grid. For each (model, batch, setting) a child process loads the checkpoint, prepares the
batch, reads every weight (safetensors files are memory-mapped, so the weights must be resident
before the starting point), resets its resident high-water mark (``/proc/self/clear_refs``, Linux),
notes its resident memory, runs the prefill and the first token (``max_new_tokens`` 1) and
reports how far the high-water mark (``VmHWM``) rose above that point: the prefill's own working
memory, KV cache included. The allocator makes that figure vary from process to process (by up
to a quarter on our machine), so each setting runs in ``--repeats`` fresh processes, taken in
turns, and the table gives the median and the range.
``hf`` is the same checkpoint's ``generate(do_sample=False, num_beams=1)`` with transformers'
default attention (SDPA), on the same prepared inputs; every ratio is to its median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HF = "hf"
SETTINGS = {
    "greedy": dict(method="greedy"),
    "vasparse": dict(method="vasparse"),
    "kv-budget-0.5": dict(method="vasparse", kv_budget=0.5),
}
MODELS = {"mid": ("llava-llama", "mid"), "long": ("llava-next", "long"), "qwen-mid": ("qwen2.5-vl", "mid")}
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
SIDE = 384


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child(model_dir: str, name: str, batch: int, dtype: str) -> dict:
    from PIL import Image

    from vacap.config import DecodeConfig
    from vacap.decode import generate
    from vacap.methods import steering_for
    from vacap.model import load_model

    model = load_model(model_dir, dtype=dtype, device="cpu")
    paths = sorted(SAMPLES.iterdir())
    images = [Image.open(paths[i % len(paths)]).convert("RGB").resize((SIDE, SIDE)) for i in range(batch)]
    inputs = model.prepare(images, "Please describe this image in detail.")
    for parameter in model.hf.parameters():
        parameter.sum()
    # Reset the process's high-water mark to its resident memory now. ru_maxrss would not do:
    # it also counts loading, and the parent's peak that a child inherits at exec.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    before = _status_mb("VmRSS")
    if name == HF:
        model.hf.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=1, pad_token_id=model.pad_id)
    else:
        generate(model, inputs, steering_for(model, DecodeConfig(max_new_tokens=1, **SETTINGS[name])), 1)
    return {"tokens": int(inputs["input_ids"].shape[1]), "rise_mb": _status_mb("VmHWM") - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mid,long", help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"from {','.join(SETTINGS)} (hf always runs)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per setting; the median is shown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_dir, name = args.child.split("::")
        print(json.dumps(child(model_dir, name, int(args.batch), args.dtype)))
        return
    models = [m for m in args.models.split(",") if m]
    names = [HF] + [n for n in args.settings.split(",") if n and n != HF]
    unknown = [m for m in models if m not in MODELS] + [n for n in names if n != HF and n not in SETTINGS]
    if unknown:
        parser.error(f"unknown model or setting: {', '.join(unknown)}")

    from vacap.tiny_models import build_tiny_model

    for size in models:
        with tempfile.TemporaryDirectory() as tmp:
            arch, model_size = MODELS[size]
            model_dir = build_tiny_model(arch, Path(tmp) / size, size=model_size)
            for batch in (int(b) for b in args.batch.split(",")):
                rises, tokens = {name: [] for name in names}, None
                for _ in range(args.repeats):
                    for name in names:
                        command = [sys.executable, __file__, "--child", f"{model_dir}::{name}", "--batch", str(batch),
                                   "--dtype", args.dtype]  # fmt: skip
                        done = subprocess.run(command, capture_output=True, text=True)
                        if done.returncode != 0:
                            sys.exit(f"the run of {name} on {size} at batch {batch} failed:\n{done.stderr}")
                        result = json.loads(done.stdout.splitlines()[-1])
                        rises[name].append(result["rise_mb"])
                        tokens = result["tokens"]
                print(f"\n### {size} ({arch}, size {model_size}), {args.dtype}, batch {batch}, {tokens} prompt tokens, "
                      f"median of {args.repeats} processes\n")  # fmt: skip
                print("| setting | prefill peak above start, MB | range | vs HF |")
                print("|---|---:|---:|---:|")
                base = statistics.median(rises[HF])
                for name in names:
                    label = "HF generate (sdpa)" if name == HF else f"vacap {name}"
                    mid = statistics.median(rises[name])
                    span = f"{min(rises[name]):.0f}-{max(rises[name]):.0f}"
                    print(f"| {label} | {mid:.0f} | {span} | {mid / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()

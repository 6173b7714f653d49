"""Continuous batching against static batches, side by side in one run.

    python benchmarks/continuous.py                       # demo model, 64 shapes scenes, batch 8
    python benchmarks/continuous.py --model short --max-new-tokens 64 --rounds 2
    python benchmarks/continuous.py --images 64 --batch 8 --rounds 3 --methods vasparse

Two models:

- ``demo``: the shipped demo model on scenes of its shapes world (``vacap.demo.shapes``, test
  split), whose captions vary in length with the number of shapes (7 to 20 tokens). The model is
  so small that a step costs little more than Python's dispatch of its operations, and
  preparing images, prefills and bookkeeping take most of the time: the case where batching
  strategy matters least.
- ``short``: a random llava-llama built offline with the mid-size text model (~310M, 24 layers)
  on 32-px images (``vacap.tiny_models``, size ``short``: 47 prompt tokens), captioning random
  noise images. Its captions end where its scaled-up EOS logit wins, from 1 token to the cap, and
  its decode steps, not its prefills, take the time: the balance of a 7B model on a GPU, where a
  600-token prefill costs a few decode steps and a caption has a hundred.

Both ways caption the same files with the same loaded model, fp32 by default:

- static: what vacap did before continuous batching. Batches of ``--batch`` images in input
  order; each batch is read, decoded and preprocessed on the main thread, then captioned by
  ``generate``, and every row waits for the batch's longest caption.
- continuous: ``Captioner.records``: a background thread reads and preprocesses images ahead of
  the model, and a row that finishes takes the next image (``generate_stream``).

After one untimed round of each (first use of a shape costs kernel preparation), the two take
turns round by round, so machine load hits them alike; the table gives the median
images/s of each, the ratio, and for continuous the share of its wall time the decoding spent
waiting for images. Every round checks that both made the same captions.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vacap.captioner import Captioner
from vacap.decode import generate
from vacap.demo.worlds import scenes
from vacap.images import load_image
from vacap.methods import steering_for
from vacap.tiny_models import build_tiny_model


def static(captioner: Captioner, paths: list[str]) -> dict[str, tuple[str, int]]:
    """-> {path: (caption, tokens generated, the stop token included)}."""
    model, config = captioner.model, captioner.config
    eos = set(model.eos_ids)
    captions = {}
    for start in range(0, len(paths), captioner.batch_size):
        batch = paths[start : start + captioner.batch_size]
        images = [load_image(Path(path)).image for path in batch]
        inputs = model.prepare(images, config.prompt)
        outputs = generate(model, inputs, steering_for(model, config), config.max_new_tokens)
        for path, out in zip(batch, outputs):
            captions[path] = (model.decode([t for t in out.tokens if t not in eos]), len(out.tokens))
    return captions


def continuous(captioner: Captioner, paths: list[str]) -> dict[str, str]:
    return {record["path"]: record["caption"] for record in captioner.records(paths)}


def steps(lengths: list[int], rows: int) -> tuple[int, int]:
    """Decode steps static batches take (each batch as long as its longest caption) and the
    fewest continuous batching can take (every row busy until the images run out)."""
    batches = [lengths[i : i + rows] for i in range(0, len(lengths), rows)]
    return sum(map(max, batches)), -(-sum(lengths) // rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="vasparse,greedy")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=("demo", "short"), default="demo")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        paths = [str(Path(folder) / f"image_{i:03d}.png") for i in range(args.images)]
        if args.model == "demo":
            for path, scene in zip(paths, scenes(args.images, args.seed, "test")):
                scene.image.save(path)
            model = "demo"
        else:
            rng = np.random.default_rng(args.seed)
            for path in paths:
                Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
            model = str(build_tiny_model("llava-llama", Path(folder) / "model", size="short"))
        base = Captioner(model, dtype=args.dtype, device="cpu", batch_size=args.batch)
        base = base.with_settings(max_new_tokens=args.max_new_tokens)
        print(f"{args.model} model, {args.images} images, batch {args.batch}, {args.dtype}, "
              f"at most {args.max_new_tokens} new tokens, median of {args.rounds} rounds, "
              f"{torch.get_num_threads()} threads\n")  # fmt: skip
        print(
            "| method | static img/s | continuous img/s | ratio | waiting for images | tokens per caption "
            "| steps static / continuous |"
        )
        print("|---|---:|---:|---:|---:|---|---|")
        for method in args.methods.split(","):
            captioner = base.with_settings(method=method)
            # A whole untimed round first: CPU kernels are prepared per shape on first use, and
            # the two ways meet different shapes (continuous prefills groups of 1 to N images).
            static(captioner, paths)
            continuous(captioner, paths)
            times = {"static": [], "continuous": []}
            waits = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                expected = static(captioner, paths)
                times["static"].append(time.perf_counter() - started)
                started = time.perf_counter()
                got = continuous(captioner, paths)
                times["continuous"].append(time.perf_counter() - started)
                waited, wall = captioner.image_wait
                waits.append(waited / wall)
                if got != {path: caption for path, (caption, _) in expected.items()}:
                    raise SystemExit(f"{method}: continuous batching changed captions")
            lengths = [expected[path][1] for path in paths]
            fixed, fewest = steps(lengths, args.batch)
            rate = {way: args.images / statistics.median(seconds) for way, seconds in times.items()}
            print(
                f"| {method} | {rate['static']:.2f} | {rate['continuous']:.2f} | "
                f"{rate['continuous'] / rate['static']:.2f} | {100 * statistics.median(waits):.1f} % | "
                f"{min(lengths)}-{max(lengths)} | {fixed} / {fewest} = {fixed / fewest:.2f} |"
            )


if __name__ == "__main__":
    main()

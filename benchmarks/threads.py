"""Whole `vacap caption` runs at each torch thread count, side by side, on a quiet or busy machine.

    python benchmarks/threads.py                                  # demo and mid, --threads 1, 2 and auto
    python benchmarks/threads.py --busy 2                         # two other processes spin meanwhile
    python benchmarks/threads.py --sizes wide --images 2 --max-new-tokens 8 --rounds 2

torch starts one thread per core and its threads wait for each other at every operation; when
another process holds a core, each operation waits for the slowest thread. Here the settings of
``--threads`` take turns, run by run, so machine load hits them alike; ``--busy N`` starts N
processes that spin on the CPU for the whole measurement (a machine shared with another job).

Models: ``demo`` (the shipped 1.8M-parameter model, its own 96-px scenes), ``mid`` (a random
310M-parameter LLaVA, 576 image tokens, ``vacap.tiny_models``) and ``wide`` (6 layers of
LLaVA-1.5-7B's width, 1.2B text parameters). Each run is a fresh process: loading included,
as a user meets it. Prints a Markdown table: median wall seconds of each ``--threads`` value
(``auto`` makes its own choice, as a user's run does), and each median's ratio to the first's
(above 1 is slower).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def spin() -> None:
    while True:
        pass


def model_for(size: str, cache: Path) -> str:
    if size == "demo":
        return "demo"
    from vacap.tiny_models import build_tiny_model

    folder = cache / f"llava-{size}"
    if not (folder / "config.json").exists():
        build_tiny_model("llava-llama", folder, size=size)
    return str(folder)


def images_for(size: str, count: int, folder: Path) -> list[str]:
    """``count`` scene images (the demo model's kind of picture; any picture does for random models)."""
    from vacap.demo.worlds import scenes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes(count, 11, "test")):
        path = folder / f"scene_{i}.png"
        scene.image.save(path)
        paths.append(str(path))
    return paths


def run(threads: str, model: str, images: list[str], max_new: int) -> float:
    """Wall seconds of one `vacap caption` with ``--threads threads`` (OMP_NUM_THREADS unset, so
    that ``auto`` makes its own choice)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = [sys.executable, "-m", "vacap.cli", "caption", *images, "--model", model,
               "--max-new-tokens", str(max_new), "--method", "greedy", "--threads", threads, "-o", os.devnull]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="demo,mid")
    parser.add_argument("--threads", default="1,2,auto", help="comma-separated --threads values; the first is the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--busy", type=int, default=0, help="processes that spin on the CPU meanwhile")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "vacap-threads-models")
    args = parser.parse_args()
    counts = args.threads.split(",")
    spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for process in spinners:
        process.start()
    try:
        rows = []
        for size in args.sizes.split(","):
            model = model_for(size, args.cache)
            images = images_for(size, args.images, args.cache / "images")
            run(counts[0], model, images[:1], 2)  # warm the file cache
            times: dict[str, list[float]] = {t: [] for t in counts}
            loads = []
            for _ in range(args.rounds):
                for t in counts:
                    loads.append(os.getloadavg()[0])
                    times[t].append(run(t, model, images, args.max_new_tokens))
            rows.append((size, {t: statistics.median(v) for t, v in times.items()}, statistics.median(loads)))
            print(f"{size}: " + ", ".join(f"--threads {t}: {v}" for t, v in times.items()), flush=True)
    finally:
        for process in spinners:
            process.terminate()
    print(f"\n{args.images} images, greedy, {args.max_new_tokens} new tokens at most, {os.cpu_count()} cores, "
          f"{args.busy} spinning processes, median of {args.rounds} rounds (whole processes)\n")  # fmt: skip
    print("| model | " + " | ".join(f"--threads {t} (s)" for t in counts)
          + " | " + " | ".join(f"{t} / {counts[0]}" for t in counts[1:]) + " | load average |")  # fmt: skip
    print("|---|" + "---:|" * (2 * len(counts) - 1) + "---:|")
    for size, median, load in rows:
        cells = [f"{median[t]:.2f}" for t in counts] + [f"{median[t] / median[counts[0]]:.2f}x" for t in counts[1:]]
        print(f"| {size} | " + " | ".join(cells) + f" | {load:.1f} |")


if __name__ == "__main__":
    main()

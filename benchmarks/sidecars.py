"""The cost of caption files: `vacap caption` with JSONL alone against JSONL plus `--sidecar txt`,
side by side in one run, on a folder of the demo model's shapes scenes.

    python benchmarks/sidecars.py                      # 200 images, batch 8, 2 rounds
    python benchmarks/sidecars.py --images 200 --rounds 3 --method vasparse

Each way is the real command in a subprocess, run on the same folder with a fresh output (the
JSONL and every caption file removed before each run, so nothing resumes). After one untimed
run of each, the two take turns round by round, so machine load hits them alike. The table gives
the median seconds of the whole command (start-up and model load included) and of captioning
alone (the figure the run's summary prints), each way, and the ratio with caption files to
without. Every round checks that each caption file holds its record's caption.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vacap.demo.shapes import scenes


def run(folder: Path, output: Path, common: list[str], sidecars: bool) -> tuple[float, float]:
    """One command on a clean folder -> (wall seconds, captioning seconds from its summary)."""
    output.unlink(missing_ok=True)
    for caption_file in folder.glob("*.txt"):
        caption_file.unlink()
    command = [sys.executable, "-m", "vacap.cli", "caption", str(folder), "-o", str(output), *common]
    command += ["--sidecar", "txt"] if sidecars else []
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"vacap failed:\n{done.stderr}")
    captioning = float(re.search(r" in ([\d.]+) s", done.stderr)[1])
    if sidecars:
        for line in output.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if Path(record["path"]).with_suffix(".txt").read_text(encoding="utf-8") != record["caption"] + "\n":
                raise SystemExit(f"{record['path']}: the caption file does not hold the record's caption")
    return wall, captioning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="greedy")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    common = ["--model", "demo", "--dtype", "fp32", "--device", "cpu", "--method", args.method,
              "--batch-size", str(args.batch), "--max-new-tokens", str(args.max_new_tokens)]  # fmt: skip

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "images"
        folder.mkdir()
        for i, scene in enumerate(scenes(args.images, args.seed, "test")):
            scene.image.save(folder / f"scene_{i:03d}.png")
        output = Path(temporary) / "out.jsonl"
        ways = {"JSONL": False, "JSONL + --sidecar txt": True}
        for sidecars in ways.values():  # untimed: file caches, the first model load
            run(folder, output, common, sidecars)
        times: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
        for _ in range(args.rounds):
            for way, sidecars in ways.items():
                times[way].append(run(folder, output, common, sidecars))

    print(f"{args.images} shapes scenes, demo model, {args.method}, batch {args.batch}, fp32, "
          f"max {args.max_new_tokens} new tokens, median of {args.rounds} rounds\n")  # fmt: skip
    print("| way | whole command s | captioning s | images/s (captioning) |")
    print("|---|---:|---:|---:|")
    medians = {}
    for way, figures in times.items():
        wall = statistics.median(w for w, _ in figures)
        captioning = statistics.median(c for _, c in figures)
        medians[way] = (wall, captioning)
        print(f"| {way} | {wall:.2f} | {captioning:.2f} | {args.images / captioning:.1f} |")
    (plain_wall, plain), (files_wall, files) = medians.values()
    ratios = f"whole command {files_wall / plain_wall:.3f}, captioning {files / plain:.3f}"
    print(f"\nwith caption files / without: {ratios}")


if __name__ == "__main__":
    main()

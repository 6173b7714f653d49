"""What the benchmarks of whole `vacap caption` commands share: their flags, a folder of the
demo model's shapes scenes, and one timed command in a subprocess."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from vacap.demo.worlds import scenes


def parser(description: str, images: int) -> argparse.ArgumentParser:
    """The flags every such benchmark takes; ``images``: the default number of scenes."""
    made = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    made.add_argument("--images", type=int, default=images)
    made.add_argument("--batch", type=int, default=8)
    made.add_argument("--rounds", type=int, default=2)
    made.add_argument("--method", default="greedy")
    made.add_argument("--max-new-tokens", type=int, default=32)
    made.add_argument("--seed", type=int, default=0)
    return made


def caption_flags(args: argparse.Namespace) -> list[str]:
    """The `vacap caption` flags of the parsed ``args``: the demo model in fp32 on the CPU."""
    return ["--model", "demo", "--dtype", "fp32", "--device", "cpu", "--method", args.method,
            "--batch-size", str(args.batch), "--max-new-tokens", str(args.max_new_tokens)]  # fmt: skip


def scene_folder(parent: Path, args: argparse.Namespace) -> Path:
    """``parent``/images holding ``args.images`` test scenes drawn with ``args.seed``."""
    folder = parent / "images"
    folder.mkdir()
    for i, scene in enumerate(scenes(args.images, args.seed, "test")):
        scene.image.save(folder / f"scene_{i:03d}.png")
    return folder


def timed_caption(folder: Path, output: Path, flags: list[str]) -> tuple[float, float]:
    """`vacap caption folder -o output flags` in a subprocess -> (wall seconds, captioning
    seconds from its summary); a failed command ends the benchmark with its stderr."""
    command = [sys.executable, "-m", "vacap.cli", "caption", str(folder), "-o", str(output), *flags]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"vacap failed:\n{done.stderr}")
    return wall, float(re.search(r" in ([\d.]+) s", done.stderr)[1])

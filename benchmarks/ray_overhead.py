"""What `--ray` costs on one machine: `vacap caption` locally, with `--ray --workers 1` and with
`--ray --workers 2`, side by side in one run, on a folder of the demo model's shapes scenes.

    python benchmarks/ray_overhead.py                    # 64 images, batch 8, 2 rounds
    python benchmarks/ray_overhead.py --images 64 --rounds 3

Each way is the real command in a subprocess, on the same folder with a fresh output (nothing
resumes). After one untimed local run (file caches), the ways take turns round by round, so
machine load hits them alike. The table gives the median seconds of the whole command and of
captioning alone (from the run's summary: for --ray, from the first work sent to the last record,
so the actors' start and model loads are in it), images/s over the captioning time and over the
whole command, and each against the local run. Ray's start-up is timed apart: `ray.init` of a
local instance and its shutdown, in a fresh process. Every round checks that the records of each
way hold the local run's captions.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from commands import caption_flags, parser, scene_folder, timed_caption

WAYS = {"local": [], "--ray --workers 1": ["--ray", "--workers", "1"], "--ray --workers 2": ["--ray", "--workers", "2"]}
RAY_START = """
import time
started = time.perf_counter()
import ray
ray.init(address="local", include_dashboard=False, logging_level="ERROR")
up = time.perf_counter()
ray.shutdown()
print(up - started, time.perf_counter() - up)
"""


def run(folder: Path, output: Path, common: list[str], extra: list[str]) -> tuple[float, float, dict]:
    """One command -> (wall seconds, captioning seconds from its summary, path -> caption)."""
    output.unlink(missing_ok=True)
    wall, captioning = timed_caption(folder, output, [*common, *extra])
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    return wall, captioning, {record["path"]: record["caption"] for record in records}


def ray_start() -> tuple[float, float]:
    """(seconds to import ray and start a local instance, seconds to shut it down)."""
    done = subprocess.run([sys.executable, "-c", RAY_START], capture_output=True, text=True, check=True)
    up, down = map(float, done.stdout.split())
    return up, down


def main() -> None:
    args = parser(__doc__, images=64).parse_args()
    common = caption_flags(args)

    with tempfile.TemporaryDirectory() as temporary:
        folder = scene_folder(Path(temporary), args)
        output = Path(temporary) / "out.jsonl"
        _, _, reference = run(folder, output, common, [])  # untimed: file caches, the first model load
        times: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
        starts = []
        for _ in range(args.rounds):
            for way, extra in WAYS.items():
                wall, captioning, captions = run(folder, output, common, extra)
                if captions != reference:
                    raise SystemExit(f"{way}: the captions differ from the local run's")
                times[way].append((wall, captioning))
            starts.append(ray_start())

    n = args.images
    print(f"{n} shapes scenes, demo model, {args.method}, batch {args.batch}, fp32, "
          f"max {args.max_new_tokens} new tokens, median of {args.rounds} rounds\n")  # fmt: skip
    print("| way | whole command s | captioning s | images/s (captioning) | images/s (whole) | whole vs local |")
    print("|---|---:|---:|---:|---:|---:|")
    local_wall = statistics.median(wall for wall, _ in times["local"])
    for way, pairs in times.items():
        wall = statistics.median(w for w, _ in pairs)
        captioning = statistics.median(c for _, c in pairs)
        print(f"| {way} | {wall:.1f} | {captioning:.1f} | {n / captioning:.2f} | {n / wall:.2f} | "
              f"{wall / local_wall:.2f}x |")  # fmt: skip
    up = statistics.median(u for u, _ in starts)
    down = statistics.median(d for _, d in starts)
    print(f"\nRay start-up (import ray + ray.init of a local instance): {up:.1f} s; ray.shutdown: {down:.1f} s")


if __name__ == "__main__":
    main()

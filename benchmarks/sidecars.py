"""The cost of caption files: `vacap caption` with JSONL alone against JSONL plus `--sidecar txt`,
side by side in one run, on a folder of the demo model's shapes scenes.

    python benchmarks/sidecars.py                      # 200 images, batch 8, 2 rounds
    python benchmarks/sidecars.py --images 200 --rounds 3 --method vasparse

Each way is the real command in a subprocess, run on the same folder with a fresh output (the
JSONL and every caption file removed before each run, so nothing resumes). After one untimed
run of each, the two take turns round by round, so machine load hits them alike. The table gives
the median seconds of the whole command (start-up and model load included) and of captioning
alone (the figure the run's summary prints), each way, and the ratio with caption files to
without. Every round checks that each caption file holds its record's caption. Each record is
written before its caption file; the JSONL's flush to disk and the file are written on a thread
of their own.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from commands import caption_flags, parser, scene_folder, timed_caption


def run(folder: Path, output: Path, common: list[str], sidecars: bool) -> tuple[float, float]:
    """One command on a clean folder -> (wall seconds, captioning seconds from its summary)."""
    output.unlink(missing_ok=True)
    for caption_file in folder.glob("*.txt"):
        caption_file.unlink()
    wall, captioning = timed_caption(folder, output, [*common, *(["--sidecar", "txt"] if sidecars else [])])
    if sidecars:
        for line in output.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            text = Path(record["path"]).with_suffix(".txt").read_text(encoding="utf-8")
            if text != record["caption"] + "\n" or text != record["caption_file"]["text"]:
                raise SystemExit(f"{record['path']}: the caption file does not hold the record's caption")
    return wall, captioning


def main() -> None:
    args = parser(__doc__, images=200).parse_args()
    common = caption_flags(args)

    with tempfile.TemporaryDirectory() as temporary:
        folder = scene_folder(Path(temporary), args)
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

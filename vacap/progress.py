"""The run's progress bar and end-of-run summary, both on stderr (stdout carries records)."""

from __future__ import annotations

import time
from collections import Counter

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

FAILURES_LISTED = 5


def console() -> Console:
    """Where progress and messages go: stderr, since stdout carries the data."""
    return Console(stderr=True)


class RunProgress:
    """Counts records by status and shows images/s and tokens/s while a run goes on."""

    def __init__(self, total: int, settings: int = 1) -> None:
        self.console = console()
        self.settings = settings  # compare: records per image
        self.counts: Counter[str] = Counter()
        self.tokens = 0
        self.captioned_seconds = 0.0
        self.failures: list[tuple[str, str]] = []  # (path, error) of each error record
        self.started = time.perf_counter()
        self._bar = Progress(
            TextColumn("captioning"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task = self._bar.add_task("caption", total=total, rate="")

    def __enter__(self) -> RunProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def record(self, record: dict) -> None:
        self.counts[record["status"]] += 1
        if record["status"] == "error":
            self.failures.append((record["path"], record.get("error") or "unknown error"))
        self.tokens += record.get("tokens") or 0
        self.captioned_seconds += record.get("seconds") or 0.0
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        done = self.counts["ok"] + self.counts["error"]
        rate = f"{done / elapsed:.2f} img/s {self.tokens / elapsed:.1f} tok/s"
        self._bar.update(self._task, advance=1, rate=rate)

    def skipped(self, count: int = 1) -> None:
        self.counts["skipped"] += count
        self._bar.update(self._task, advance=count)

    def summary(self) -> str:
        """One plain line of what the run did, then the first few failed files with their errors.

        "captioned 3 of 5 images in 9.2 s (3.07 s each); 1 already done; 1 failed:"
        """
        elapsed = time.perf_counter() - self.started
        ok, error, skipped = self.counts["ok"], self.counts["error"], self.counts["skipped"]
        total = ok + error + skipped
        if self.settings == 1:
            what = "image" if total == 1 else "images"
        else:
            what = f"captions ({total // self.settings} images x {self.settings} settings)"
        line = f"captioned {ok} of {total} {what} in {elapsed:.1f} s"
        if ok:
            line += f" ({self.captioned_seconds / ok:.2f} s each)"
        if skipped:
            line += f"; {skipped} already done"
        if error:
            line += f"; {error} failed:"
        lines = [line]
        # compare gives each image one record per setting: an image failing alike in all is one line.
        failures = list(dict.fromkeys(self.failures))
        lines += [f"  {path}: {error}" for path, error in failures[:FAILURES_LISTED]]
        if len(failures) > FAILURES_LISTED:
            lines.append(f"  and {len(failures) - FAILURES_LISTED} more (see the records)")
        return "\n".join(lines)

    def print_summary(self) -> None:
        # Paths may hold brackets, which rich would take for markup.
        self.console.print(self.summary(), markup=False, highlight=False, soft_wrap=True)

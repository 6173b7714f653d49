"""The run's progress bar and end-of-run summary, both on stderr (stdout carries records)."""

from __future__ import annotations

import time
from collections import Counter

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

FAILURES_LISTED = 5


class RunProgress:
    """Counts records by status and shows images/s and tokens/s while a run goes on."""

    def __init__(self, total: int, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
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
        """Counts, time, and the first few failed files with their errors (one per line)."""
        elapsed = time.perf_counter() - self.started
        ok = self.counts["ok"]
        per_image = f", {self.captioned_seconds / ok:.2f} s per captioned image" if ok else ""
        lines = [
            f"{ok} ok, {self.counts['error']} error, {self.counts['skipped']} skipped "
            f"in {elapsed:.1f} s{per_image}"
        ]
        # compare gives each image one record per setting: an image failing alike in all is one line.
        failures = list(dict.fromkeys(self.failures))
        if failures:
            lines.append("failed:")
            lines += [f"  {path}: {error}" for path, error in failures[:FAILURES_LISTED]]
            if len(failures) > FAILURES_LISTED:
                lines.append(f"  and {len(failures) - FAILURES_LISTED} more (see the records)")
        return "\n".join(lines)

    def print_summary(self) -> None:
        # Paths may hold brackets, which rich would take for markup.
        self.console.print(self.summary(), markup=False, highlight=False, soft_wrap=True)

"""Stopping a caption run with SIGINT or SIGTERM: at once, saying what was written and how to go on.

The JSONL is the run's log and each caption file follows its record, so a run stopped anywhere
is resumed as one killed there would be; what a stop adds is the word to the user.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM while images are captioned (args[0]: the signal's number)."""


class Stops:
    """SIGINT and SIGTERM end a caption run at once, saying what it wrote and how to go on, with
    exit 128 + the signal's number. Stopping loses nothing: each caption file follows its record,
    so a run stopped anywhere is resumed as one killed there would be.

    While images are captioned (``captioning``) the signal is raised as ``Stopped`` where the run
    is, so the caption files of the records already written are written on the way out. Before
    that (the model loading, imports under way that an exception would leave half done) the run
    says what it wrote and exits on the spot."""

    def __init__(self, writer, run) -> None:
        self.writer, self.run = writer, run
        self.captioning = False
        self._handlers = {}
        self._holding = False
        self._deferred: int | None = None

    @contextlib.contextmanager
    def held(self):
        """A stop that comes in here is raised as the block ends: a record and the submission
        of its caption file go together, so that every record written gets its file."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._deferred is not None:
                signum, self._deferred = self._deferred, None
                raise Stopped(signum)

    def __enter__(self) -> Stops:
        self._handlers = {signum: signal.signal(signum, self._stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        if isinstance(exc, Stopped):
            self._say(exc.args[0])
            raise SystemExit(128 + exc.args[0]) from None

    def _stop(self, signum: int, frame) -> None:
        if self.captioning and self._holding:
            self._deferred = signum
            return
        if self.captioning:
            raise Stopped(signum)
        self._say(signum)
        sys.stderr.flush()
        os._exit(128 + signum)

    def _say(self, signum: int) -> None:
        print(stopped_message(signum, self.writer, self.run), file=sys.stderr)


def stopped_message(signum: int, writer, run) -> str:
    files = f" and {run.files_written} caption files" if run is not None else ""
    where = "" if writer.name == os.devnull else f" to {writer.name}"
    said = f"stopped by {signal.Signals(signum).name}: {writer.written} records written{where}{files} so far"
    if writer.resumable:
        return f"{said}; run the same command again to resume from them"
    if run is not None and run.sidecars.existing == "skip":
        return f"{said}; run the same command again to go on (images with a caption file are skipped)"
    if run is not None and run.sidecars.existing in ("append", "prepend"):
        return (
            f"{said}; no records file (-o FILE) says which caption files were {run.sidecars.existing}ed to, so "
            "running the same command again would add to them a second time"
        )
    return f"{said}; nothing records what is done: give -o FILE to make a run resumable"

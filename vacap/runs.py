"""A caption run, from the chosen images to records and caption files, resuming what is done.

`vacap caption` checks its flags and hands over to :func:`caption`; `vacap compare` shares the
output, the model loading and the record writing. A problem met while running raises
``RunError`` with the exit code the command ends with; the command line prints it as one line.
Messages go to stderr: stdout carries the records.

torch is imported only once the output is open and locked, so that a second run on the same
output is refused at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vacap.config import DecodeConfig, OutputConfig
from vacap.images import Listing, nothing_chosen


class RunError(Exception):
    """A problem met while running: one line for the user, and the command's exit code (2 where
    a flag asks what the model or this machine cannot do, else 1)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def use_threads(threads: str) -> None:
    """Set torch's CPU thread count (``--threads``), and say it with -v."""
    import torch

    from vacap.model import resolve_threads

    count, why = resolve_threads(threads)
    torch.set_num_threads(count)
    logging.getLogger("vacap").info("torch threads: %d (%s)", count, why)


def load_captioner(threads: str = "auto", **arguments):
    """A ``Captioner`` with the model loaded; a flag the model cannot honour is a RunError (2)."""
    from vacap.captioner import Captioner
    from vacap.model import ModelLoadError

    use_threads(threads)
    try:
        return Captioner(**arguments)
    except (ModelLoadError, ValueError) as exc:
        raise RunError(str(exc), 2) from None


def open_output(output: Path | None, **mode):
    """The output opened, locked and checked (a ``RecordWriter``), before any model loads."""
    from vacap.records import OutputError, RecordWriter

    try:
        return RecordWriter(output, **mode)
    except OutputError as exc:
        raise RunError(str(exc), 2) from None


def write_records(writer, progress, records: Iterable[dict], run=None, hold=contextlib.nullcontext) -> None:
    """Write and count each record, with caption files (``run``) each file after its record,
    a stop held while a record and its file's submission are under way (``hold``).
    An output that fails mid-run is a RunError; a reader that went away ends the run with 141
    and no word, as a Unix tool that SIGPIPE ends."""
    from vacap.records import OutputError, ReaderGone, logged

    written = run.logged(records, writer, hold=hold) if run is not None else logged(records, writer)
    try:
        # Closed on the way out (a stop, a failed write), so the caption files of the records
        # already written are written before the output is closed.
        with contextlib.closing(written):
            for record in written:
                progress.record(record)
    except ReaderGone:
        # Anything still buffered for stdout would fail again at exit, with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
    except OutputError as exc:
        kept = "; the records written before are kept, and a new run continues from them" if writer.resumable else ""
        raise RunError(f"{exc}{kept}") from None


def ray_step(step, *args, **kwargs):
    """``step(*args, **kwargs)``; Ray that cannot start, be reached, or load the model is a RunError (2)."""
    from vacap.ray_run import RayUnavailable

    try:
        return step(*args, **kwargs)
    except RayUnavailable as exc:
        raise RunError(str(exc), 2) from None


@dataclass(frozen=True)
class CaptionFiles:
    """--sidecar, --sidecar-dir and --existing."""

    suffix: str = "txt"
    folder: Path | None = None
    existing: str = "skip"


@dataclass(frozen=True)
class Job:
    """What a caption run takes, as the command line gave it."""

    listing: Listing
    config: DecodeConfig
    settings: dict  # the DecodeConfig's arguments, for the Captioner (and each Ray actor)
    shaping: OutputConfig
    model: str
    precision: dict  # dtype, device, quant, max_pixels, min_pixels
    batch_size: int = 1
    output: Path | None = None
    overwrite: bool = False
    files: CaptionFiles | None = None
    threads: str = "auto"
    ray: object | None = None  # RayOptions
    verbose: bool = False
    filters: tuple[Sequence[str], Sequence[str]] = ((), ())  # include, exclude: for the nothing-chosen message
    risk_vocab: Path | None = None  # --risk-vocab


def caption(job: Job) -> int:
    """Caption the job's images not yet done: a record each, then its caption file. Returns
    the exit code: 1 when some image failed, else 0."""
    from vacap.progress import RunProgress
    from vacap.records import make_record, settings_key, still_to_do
    from vacap.sidecars import SidecarRun, Sidecars
    from vacap.stops import Stops

    listing, output = job.listing, job.output
    run = None
    if job.files is not None:
        sidecars = Sidecars(job.files.suffix, job.files.folder, job.files.existing)
        run = SidecarRun(sidecars, listing.files, listing.roots)
        refusal = run.refusal()
        if refusal is not None:
            raise RunError(refusal, 2)
        if output is None:
            output = Path(os.devnull)  # the caption files are the output; `-o -` streams records too
    writer = open_output(output, overwrite=job.overwrite, resume=True)
    with writer, Stops(writer, run) as stops:
        if not listing.files and not listing.problems:
            say(nothing_chosen(listing, *job.filters))
            return 0
        pool, params = _params(job)
        problems = [
            make_record(path=path, status="error", error=reason, model=job.model, method=job.config.method, params=params)
            for path, reason in listing.problems
        ]
        uncaptioned = run.unwritten(listing.files) if run else listing.files
        todo = still_to_do(uncaptioned, writer, settings_key(job.model, params), run)
        if run is not None:
            run.sweep()
            if note := run.edited_note():
                say(note)
        if not todo and not problems:
            files_too = " or with a caption file" if len(uncaptioned) < len(listing.files) else ""
            say(f"all {len(listing.files)} images already captioned with these settings{files_too}")
            return 0

        progress = RunProgress(total=len(listing.files) + len(problems))
        progress.skipped(len(listing.files) - len(todo))
        records = itertools.chain(problems, _captioned(job, todo, pool, writer, progress))
        stops.captioning = True
        with progress:
            if pool is None:
                write_records(writer, progress, records, run, stops.held)
            else:  # the actors start as the first records are asked for
                ray_step(write_records, writer, progress, records, run, stops.held)
    progress.print_summary()
    return 1 if progress.counts["error"] else 0


def _params(job: Job):
    """The Ray pool (None for a local run) and the records' params, which make the resume key,
    worked out as the captioner will, without loading the model."""
    if job.ray is not None:
        from vacap import ray_run

        pool = ray_step(ray_run.connect, job.ray)
        return pool, ray_step(ray_run.worker_params, pool, job.config, job.shaping, **job.precision)
    from vacap.captioner import record_params
    from vacap.model import ModelLoadError

    try:
        return None, record_params(job.config, output=job.shaping, **job.precision)
    except ModelLoadError as exc:  # --device cuda without CUDA
        raise RunError(str(exc), 2) from None


def _captioned(job: Job, todo: list[Path], pool, writer, progress) -> Iterable[dict]:
    """The records of the images still to do, from Ray's actors or a model loaded here; none
    (and no model) when only folders that could not be listed are left."""
    if not todo:
        return iter(())
    loading = dict(
        model=job.model, batch_size=job.batch_size, output=job.shaping, risk_vocab=job.risk_vocab, **job.precision
    )
    if pool is not None:
        from vacap import ray_run

        return ray_run.caption(pool, todo, {**loading, **job.settings}, verbose=job.verbose)
    captioner = load_captioner(job.threads, **loading, **job.settings)

    def skip(path: str, sha256: str, settings_key: str) -> bool:
        done = writer.is_done(path, sha256, settings_key)
        if done:
            progress.skipped()
        return done

    return captioner.records((str(p) for p in todo), skip=skip, folders=False)


def compare(
    listing: Listing, grid: dict[str, dict], loading: dict, output: Path | None, overwrite: bool, threads: str,
    filters: tuple[Sequence[str], Sequence[str]] = ((), ()),
) -> int:
    """Every setting of ``grid`` (label -> settings) on every image: the records, each with its
    ``setting``, then a table comparing the settings. Returns the exit code."""
    from vacap.compare import summary_table
    from vacap.progress import RunProgress

    images = [str(p) for p in listing.files]
    # compare replaces its output each time, so it resumes nothing; it still refuses a file
    # that is not vacap records (or is being written by another run) before the model loads.
    with open_output(output, overwrite=overwrite, resume=False) as writer:
        if not images and not listing.problems:
            say(nothing_chosen(listing, *filters))
            return 0
        progress = RunProgress(total=(len(images) + len(listing.problems)) * len(grid), settings=len(grid))
        base = load_captioner(threads, **loading)
        written: list[dict] = []

        def labelled():
            for label, settings in grid.items():
                captioner = base.with_settings(**settings)
                problems = (captioner.error_record(str(path), reason) for path, reason in listing.problems)
                for record in itertools.chain(problems, captioner.records(images, folders=False)):
                    record["setting"] = label
                    written.append(record)
                    yield record

        with progress:
            write_records(writer, progress, labelled())
    progress.console.print(summary_table(written, list(grid)))
    progress.print_summary()
    return 1 if progress.counts["error"] else 0

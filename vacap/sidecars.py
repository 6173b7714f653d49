"""Caption files beside images (or in a mirror of the input tree), written atomically.

A run writes an image's caption file before its JSONL record, so an ``ok`` record in the
output means its caption file was written: a resumed run never leaves a done image without
one. Error records never write a caption file.
"""

from __future__ import annotations

import base64
import collections
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vacap.files import OutsideError, contained, write_atomic
from vacap.records import path_fields

SUFFIXES = ("txt", "caption")
EXISTING = ("skip", "overwrite", "append", "prepend")
# kohya's sd-scripts reads the first line of a caption file and splits it at commas (for
# shuffle_caption and keep_tokens); OneTrainer and taggui read the file as one caption. A
# comma on one line keeps an added caption visible, and its own chunk, to all of them.
SEPARATOR = ", "


def sidecar_path(image: Path, suffix: str, root: Path | None = None, mirror: Path | None = None) -> Path:
    """Where the caption of ``image`` goes: ``<stem>.<suffix>`` beside it, or, with ``mirror``,
    at the same place relative to ``root`` (the input folder the image was found under) inside
    ``mirror``. An image outside ``root`` lands at the top of ``mirror``."""
    name = f"{image.stem}.{suffix}"
    if mirror is None:
        return image.with_name(name)
    return mirror / _place(image.parent, root) / name


def _place(folder: Path, root: Path | None) -> Path:
    """Where ``folder`` lies inside ``root``, as a path without ``..``: as the two are written
    when that is one, else with both resolved (``/data/w/../imgs`` under ``/data`` is ``imgs``:
    joined to the mirror as written, it would climb out of it); nowhere (``.``) when outside."""
    if root is None:
        return Path()
    try:
        relative = folder.relative_to(root)
        if ".." not in relative.parts:
            return relative
    except ValueError:
        pass
    try:
        return folder.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a link loop, before Python 3.13
        return Path()


def join_captions(existing: str, caption: str, where: str) -> str:
    """An existing caption file's text with ``caption`` added at its end (``append``) or start
    (``prepend``), joined by ``SEPARATOR``; a file holding only blanks is replaced."""
    old = existing.strip().strip(",").strip()
    if not old:
        return caption
    return f"{old}{SEPARATOR}{caption}" if where == "append" else f"{caption}{SEPARATOR}{old}"


@dataclass(frozen=True)
class Sidecars:
    """Which caption files a run writes, where, and what it does with one already there."""

    suffix: str
    mirror: Path | None = None  # None: beside each image
    existing: str = "skip"

    def __post_init__(self) -> None:
        if self.suffix not in SUFFIXES:
            raise ValueError(f"--sidecar must be one of {', '.join(SUFFIXES)}, got {self.suffix!r}")
        if self.existing not in EXISTING:
            raise ValueError(f"--existing must be one of {', '.join(EXISTING)}, got {self.existing!r}")

    def write(self, target: Path, caption: str) -> None:
        """Write ``caption`` (and a newline) to ``target`` as ``existing`` says; OSError or
        UnicodeDecodeError (an existing file to join that is not UTF-8) when it cannot."""
        text = caption
        if self.existing in ("append", "prepend"):
            try:
                text = join_captions(target.read_text(encoding="utf-8"), caption, self.existing)
            except FileNotFoundError:
                pass
        write_atomic(target, text + "\n")


class SidecarRun:
    """The caption files of one run's images (``files`` with their input ``roots``)."""

    def __init__(self, sidecars: Sidecars, files: Sequence[Path], roots: Sequence[Path]) -> None:
        self.sidecars = sidecars
        self._targets: dict[str, Path] = {}
        self._named: dict[str, Path] = {}  # each target as the user's paths spell it, for messages
        self._outside: list[tuple[Path, Path]] = []  # (image, its caption file), a link leading out of the mirror
        resolved: dict[Path, Path | None] = {}  # a target's folder -> it resolved, None when outside; once each
        for file, root in zip(files, roots):
            target = self._named[str(file)] = sidecar_path(file, sidecars.suffix, root, sidecars.mirror)
            if sidecars.mirror is not None:
                # The mirror's links resolved, as the write will meet them. A caption file beside
                # its image needs no check: it goes where the image is, in whichever real folder
                # a link to the image's folder leads to.
                if target.parent not in resolved:
                    try:
                        resolved[target.parent] = contained(target, sidecars.mirror).parent
                    except OutsideError:
                        resolved[target.parent] = None
                folder = resolved[target.parent]
                if folder is None:
                    self._outside.append((file, target))
                else:
                    target = folder / target.name
            self._targets[str(file)] = target

    def refusal(self) -> str | None:
        """Why this run must not start, None when it may: a --sidecar-dir that is no folder, a
        caption file that a link in it leads out of it, or one caption file for two images (the
        second caption would replace the first, and both records say ok). Checked before the model
        loads, so that nothing is captioned for files that cannot hold the captions."""
        mirror = self.sidecars.mirror
        if mirror is not None:
            existing = next((folder for folder in (mirror, *mirror.parents) if os.path.exists(folder)), None)
            if existing is not None and not os.path.isdir(existing):
                what = "is a file" if existing == mirror else f"lies under {_shown(existing)}, which is a file"
                return f"--sidecar-dir {_shown(mirror)} {what}, not a folder; give a folder (created when missing)"
        if self._outside:
            lines = [f"{_shown(target)} (for {_shown(image)})" for image, target in self._outside]
            return (
                f"{_count(lines, 'caption file')} would be written outside --sidecar-dir {_shown(mirror)}, "
                f"through a symbolic link in it:\n{_listed(lines)}\nvacap does not write through links that lead "
                "out of the folder it writes into: remove the link, or give another --sidecar-dir"
            )
        groups: dict[Path, list[str]] = collections.defaultdict(list)  # the file, then its images
        folders: dict[Path, Path] = {}
        for image, target in self._targets.items():
            if target.parent not in folders:
                folders[target.parent] = _identity(target.parent)
            groups[folders[target.parent] / target.name].append(image)
        clashes = [images for images in groups.values() if len(images) > 1]
        if clashes:
            lines = [f"{_shown(self._named[images[0]])}: {', '.join(map(_shown, images))}" for images in clashes]
            return (
                f"{_count(lines, 'caption file')} would be shared by more than one image, each caption replacing "
                f"the one before:\n{_listed(lines)}\nGive each image a caption file of its own: "
                "rename one of each group (another stem), leave it out with --exclude, or, with --sidecar-dir, "
                "caption the clashing input folders in separate runs into separate folders"
            )
        return None

    def target(self, image: str | Path) -> Path:
        return self._targets[str(image)]

    def unwritten(self, images: Iterable[Path]) -> list[Path]:
        """The images still to caption: with ``existing`` skip, those without a caption file."""
        if self.sidecars.existing != "skip":
            return list(images)
        return [image for image in images if not os.path.lexists(self.target(image))]

    def restore(self, image: Path, caption: str | None) -> bool:
        """Write the caption file of an image that resume found done, from its record's
        caption, if the file is missing; False when that could not be done."""
        target = self.target(image)
        if os.path.lexists(target):
            return True
        if caption is None:
            return False
        try:
            write_atomic(target, caption + "\n")
        except OSError:
            return False
        return True

    def write_behind(self, records: Iterable[dict], ahead: int = 16) -> Iterator[dict]:
        """``records``, each after its caption file is written (see :meth:`written`), in order.

        The files are written on a thread of their own, at most ``ahead`` records behind, so
        the disk's fsync overlaps the decoding of the next captions instead of holding it up.
        """
        pending: collections.deque = collections.deque()
        with ThreadPoolExecutor(1, thread_name_prefix="vacap-captions") as pool:
            for record in records:
                pending.append(pool.submit(self.written, record))
                while pending and (pending[0].done() or len(pending) > ahead):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def written(self, record: dict) -> dict:
        """An ok record after its caption file is written; an error record (with the reason)
        when the file could not be. Other records pass unchanged."""
        if record.get("status") != "ok":
            return record
        target = self.target(_given_path(record))
        try:
            self.sidecars.write(target, record["caption"])
        except OSError as exc:
            why = f"cannot write caption file {path_fields(target)[0]}: {exc.strerror or exc}"
            return {**record, "status": "error", "error": why}
        except UnicodeDecodeError:
            why = f"caption file {path_fields(target)[0]} is not UTF-8 text, so nothing is joined to it; left as it was"
            return {**record, "status": "error", "error": why}
        return record


def _shown(path: str | Path) -> str:
    """A path as messages print it (a name that is not UTF-8 with \\xNN for its bad bytes)."""
    return path_fields(path)[0]


def _identity(folder: Path) -> Path:
    """``folder`` with its links resolved: two paths to one folder are one."""
    try:
        return folder.resolve()
    except (OSError, RuntimeError):
        return folder.absolute()


def _count(lines: list, what: str) -> str:
    return f"{len(lines)} {what}{'s' if len(lines) > 1 else ''}"


def _listed(lines: list[str], most: int = 5) -> str:
    """The first ``most`` lines, indented, and how many more there are."""
    more = [f"  and {len(lines) - most} more"] if len(lines) > most else []
    return "\n".join([f"  {line}" for line in lines[:most]] + more)


def _given_path(record: dict) -> str:
    """The path the image was captioned under (a record keeps a non-UTF-8 name in path_bytes)."""
    raw = record.get("path_bytes")
    return os.fsdecode(base64.b64decode(raw)) if raw else record["path"]

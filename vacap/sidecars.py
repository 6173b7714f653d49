"""Caption files beside images (or in a mirror of the input tree), each written after its record.

The JSONL is the run's log, and the caption files follow from it. The ``ok`` record of an image
in a caption-file run says what its file must hold, in ``caption_file``: the file's ``path``, the
whole ``text`` written (the caption, or an existing caption with it joined), and the sha256 of
what the file held ``before`` (None: no file). The record is written first, then the file, whole
(:func:`vacap.files.write_atomic`). A run stopped between the two leaves a record whose file is
missing or still holds what it held before: the resumed run writes the record's text then, so
an append is applied once, whatever stops a run. Error records never write a caption file.

An existing caption file is read without following a link and without waiting on a FIFO
(:func:`vacap.files.read_regular`): anything but a regular file there gets an error record and
is left untouched.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vacap.files import OutsideError, contained, read_regular, resolved, write_atomic
from vacap.records import RecordWriter, path_fields

SUFFIXES = ("txt", "caption")
EXISTING = ("skip", "overwrite", "append", "prepend")
# kohya's sd-scripts reads the first line of a caption file and splits it at commas (for
# shuffle_caption and keep_tokens); OneTrainer and taggui read the file as one caption. A
# comma on one line keeps an added caption visible, and its own chunk, to all of them.
SEPARATOR = ", "
SENTENCE_END = (".", "!", "?")
# vacap.files.temporary_name's names: "." + the (perhaps shortened) name + ".<8 hex>.tmp".
_TEMPORARY = re.compile(r"^\.(.+)\.[0-9a-f]{8}\.tmp$", re.DOTALL)


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
    (``prepend``), so that the whole reads as the existing text does; a file holding only
    blanks is replaced.

    Text that ends a sentence (``.``, ``!``, ``?``) is prose: the caption joins it as a sentence
    of its own, after a space, capitalised, and ends with a full stop when it goes first
    ("A red ring. A black square"). Anything else is a tag list: the caption joins it as one more
    tag, after ``SEPARATOR``, without the full stop it would end with when it goes first
    ("a black square, tag1, tag2")."""
    old = existing.strip().strip(",").strip()
    if not old:
        return caption
    if old.endswith(SENTENCE_END):
        sentence = caption[:1].upper() + caption[1:]
        if where == "append":
            return f"{old} {sentence}"
        return f"{sentence}{'' if sentence.endswith(SENTENCE_END) else '.'} {old}"
    if where == "append":
        return f"{old}{SEPARATOR}{caption}"
    return f"{caption.rstrip('.')}{SEPARATOR}{old}"


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

    def plan(self, target: Path, caption: str) -> dict:
        """The ``caption_file`` of the record that writes ``caption`` to ``target`` as
        ``existing`` says. OSError when what is at ``target`` is not a regular file (or is over
        read_regular's limit), UnicodeDecodeError when it is to be joined and is not UTF-8."""
        before = read_regular(target)
        text = caption
        if before is not None and self.existing in ("append", "prepend"):
            text = join_captions(before.decode("utf-8"), caption, self.existing)
        return {"path": path_fields(target)[0], "text": text + "\n", "before": _sha256(before)}


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
        self.files_written = 0  # caption files this run wrote, restored ones included
        # Caption files that resume found holding neither their record's text nor what was there
        # before it: changed since the run wrote them, so left as they are.
        self.edited: list[str] = []

    def edited_note(self) -> str | None:
        """Which caption files resume left as they are, since they changed after their run."""
        if not self.edited:
            return None
        edited = self.edited
        more = f" and {len(edited) - 3} more" if len(edited) > 3 else ""
        one = len(edited) == 1
        files, records = ("file holds", "its record says") if one else ("files hold", "their records say")
        left = "it is" if one else "they are"
        return (
            f"{len(edited)} caption {files} neither what {records} was written nor what was there before "
            f"(changed since?); left as {left}: {', '.join(edited[:3])}{more}"
        )

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
                folders[target.parent] = resolved(target.parent)
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

    def sweep(self) -> None:
        """Remove the temporary files a killed run left beside this run's caption files (their
        hidden ``.<name>.<hex>.tmp`` names)."""
        names: dict[Path, set[str]] = collections.defaultdict(set)
        for target in self._targets.values():
            names[target.parent].add(target.name)
        for folder, mine in names.items():
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue  # not made yet, or unreadable: the writes will say
            for entry in entries:
                match = _TEMPORARY.match(entry.name)
                if match and entry.is_file(follow_symlinks=False) and any(n.startswith(match[1]) for n in mine):
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        pass  # gone already, or not ours to remove: harmless either way

    def restore(self, image: Path, done: dict) -> bool:
        """Bring the caption file of an image that resume found done (``done``: its ok record's
        ``caption`` and ``caption_file``) to what the record says; False when it must be captioned
        again. A file missing, or still holding what it held before the record, gets the record's
        text; a file holding something else was changed since, and is left (see ``edited``)."""
        target = self.target(image)
        planned = done.get("caption_file")
        if not isinstance(planned, dict) or planned.get("path") != path_fields(target)[0]:
            # A record that names no caption file here (a run with another --sidecar-dir, or by a
            # vacap that wrote no caption_file): a missing file gets the caption alone, one that is
            # there is left as it is.
            if os.path.lexists(target):
                return True
            if done.get("caption") is None:
                return False
            planned = {"text": done["caption"] + "\n", "before": None}
        try:
            now = read_regular(target)
        except OSError:
            self.edited.append(path_fields(target)[0])
            return True
        text = planned.get("text")
        if not isinstance(text, str):
            return False
        if now is not None and now == text.encode("utf-8"):
            return True
        if now is not None and _sha256(now) != planned.get("before"):
            self.edited.append(path_fields(target)[0])
            return True
        try:
            self._write_file(target, text)
        except (OSError, OutsideError):
            return False
        self.files_written += 1
        return True

    def logged(
        self, records: Iterable[dict], log: RecordWriter, ahead: int = 16, hold=contextlib.nullcontext
    ) -> Iterator[dict]:
        """Each of ``records`` written to ``log`` and then, an ok one, its caption file; yields
        each record, in order, as it stands once its file is written: an error record (written
        to ``log`` too) when the file could not be. Raises what ``log.write`` raises.

        The files are written on a thread of their own, at most ``ahead`` records behind, so the
        disk's fsync overlaps the decoding of the next captions instead of holding it up. The
        thread flushes the log to disk before each file, so even a power cut leaves no caption
        file that its record does not account for. ``hold()`` wraps each record's write and its
        file's submission (``Stops.held``: a stop waits until both are done)."""
        pending: collections.deque[tuple[dict, Future | None]] = collections.deque()
        with ThreadPoolExecutor(1, thread_name_prefix="vacap-captions") as pool:
            for record in records:
                record = self._planned(record)
                with hold():
                    log.write(record)
                    file = pool.submit(self._write, record, log, log.written) if "caption_file" in record else None
                    pending.append((record, file))
                while pending and (pending[0][1] is None or pending[0][1].done() or len(pending) > ahead):
                    yield self._finished(*pending.popleft(), log)
            while pending:
                yield self._finished(*pending.popleft(), log)

    def _planned(self, record: dict) -> dict:
        """An ok record with its ``caption_file``; an error record (with the reason) when the
        caption file there cannot be read or joined. Other records pass unchanged."""
        if record.get("status") != "ok":
            return record
        target = self.target(_given_path(record))
        try:
            return {**record, "caption_file": self.sidecars.plan(target, record["caption"])}
        except OSError as exc:
            why = f"caption file {path_fields(target)[0]} cannot be read: {exc.strerror or exc}; left as it was"
        except UnicodeDecodeError:
            why = f"caption file {path_fields(target)[0]} is not UTF-8 text, so nothing is joined to it; left as it was"
        return {**record, "status": "error", "error": why}

    def _write(self, record: dict, log: RecordWriter, logged: int) -> None:
        """Write a logged ok record's caption file, once the first ``logged`` records are on disk."""
        log.sync(logged)
        self._write_file(self.target(_given_path(record)), record["caption_file"]["text"])
        self.files_written += 1

    def _write_file(self, target: Path, text: str) -> None:
        # Checked again at the write, not only when the run was planned: a folder of the mirror
        # can become a link leading out of it while the run goes on.
        if self.sidecars.mirror is not None:
            contained(target, self.sidecars.mirror)
        write_atomic(target, text)

    def _finished(self, record: dict, file: Future | None, log: RecordWriter) -> dict:
        if file is None:
            return record
        try:
            file.result()
        except (OSError, OutsideError) as exc:
            target = record["caption_file"]["path"]
            why = f"cannot write caption file {target}: {getattr(exc, 'strerror', None) or exc}"
            failed = {key: value for key, value in record.items() if key != "caption_file"}
            failed.update(status="error", error=why)
            log.write(failed)  # after the ok record: the last record of a path is the one that counts
            return failed
        return record


def _shown(path: str | Path) -> str:
    """A path as messages print it (a name that is not UTF-8 with \\xNN for its bad bytes)."""
    return path_fields(path)[0]


def _count(lines: list, what: str) -> str:
    return f"{len(lines)} {what}{'s' if len(lines) > 1 else ''}"


def _listed(lines: list[str], most: int = 5) -> str:
    """The first ``most`` lines, indented, and how many more there are."""
    more = [f"  and {len(lines) - most} more"] if len(lines) > most else []
    return "\n".join([f"  {line}" for line in lines[:most]] + more)


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _given_path(record: dict) -> str:
    """The path the image was captioned under (a record keeps a non-UTF-8 name in path_bytes)."""
    raw = record.get("path_bytes")
    return os.fsdecode(base64.b64decode(raw)) if raw else record["path"]

"""Records (vacap's JSONL) turned into what dataset tools read: an imagefolder metadata.jsonl,
CSV, Parquet, or a caption file per image.

The last ``ok`` record of each image wins (a retried or re-captioned image has several); images
with only ``error`` records are left out and counted. A file holding captions made with more
than one set of settings (a ``compare`` output, or a run resumed with other flags) is refused
unless one set is chosen: mixing them would pick each image's caption by which run came last.

Records made with ``vacap caption --risk`` carry a ``risk`` object whose ``score`` is the
caption's hallucination risk (its highest object-word score; null when it names no known
object): ``--max-risk`` leaves out captions scored above a limit (``by_risk``), ``--mark-risk``
writes the score beside each caption.

An export is made whole or not at all (see "writing an export whole" below), every file it writes
lies inside ``--to`` after links are resolved, and csv cells are escaped against formula injection
(see ``csv_cell``). No torch import: exporting needs no model.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vacap.files import OutsideError, contained, sync_folder, write_all
from vacap.records import NotRecords, scan, settings_key
from vacap.sidecars import sidecar_path

FORMATS = ("hf-metadata", "csv", "parquet", "txt")
# Columns of the csv and parquet exports, with their parquet types.
COLUMNS = {
    "path": "string",
    "caption": "string",
    "model": "string",
    "method": "string",
    "prompt": "string",
    "tokens": "int64",
    "seconds": "float64",
    "width": "int64",
    "height": "int64",
    "sha256": "string",
    "settings": "string",
    "setting": "string",
    "params": "string",
    "vacap_version": "string",
}
RISK_COLUMN = "risk"  # with --mark-risk: the caption's risk score, after the caption column (float64)
SHORT_KEY = 12  # hex digits of the settings fingerprint shown to users and accepted by --settings
MARK_RISK_TXT = (
    "--mark-risk writes a risk score beside each caption, and a txt caption file has no place for it: "
    "use --format csv, parquet or hf-metadata, or leave --mark-risk out"
)
PARQUET_INSTALL = 'parquet export needs pyarrow; install it with pip install ".[parquet]" in vacap\'s checkout, or pip install pyarrow'
# A csv cell starting with one of these is read as a formula by spreadsheets (OWASP, CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
STAGING = ".vacap-export"  # hidden folder inside --to where an export is assembled (see _staged)
METADATA = "metadata.jsonl"


class ExportError(ValueError):
    """The export cannot be made as asked; the message is one paragraph, for the user."""


@dataclass
class Selection:
    """The captions to export and what was left out on the way."""

    records: list[dict]  # the last ok record of each image, in the order images first appear
    errors: int = 0  # images with no ok record
    superseded: int = 0  # ok records replaced by a later ok record of the same image
    other_settings: int = 0  # records of settings other than the chosen ones
    max_risk: float | None = None  # the --max-risk limit applied, if any
    risky: int = 0  # captions whose risk score is above max_risk
    unscored: int = 0  # captions with no risk object (captioned without --risk), left out under a risk flag
    null_risk: int = 0  # kept captions whose risk score is null (no known object word)

    def nothing_left(self) -> str:
        """Why no caption is left to export, for the user."""
        reasons = [
            (self.risky, f"captions have a risk score above --max-risk {self.max_risk}"),
            (self.unscored, "captions have no risk score (captioned without --risk)"),
            (self.errors, "images have only error records"),
        ]
        why = ", ".join(f"{count} {what}" for count, what in reasons if count)
        return f"no ok caption to export ({why or 'the records hold none'})"


@dataclass
class Result:
    written: int = 0
    missing: list[str] = field(default_factory=list)  # images that are not on disk (hf-metadata)
    clashes: list[str] = field(default_factory=list)  # images whose caption file another image claims
    unwritable: list[str] = field(default_factory=list)  # "path (why)" of images whose file cannot be written
    copied: int = 0
    identical: int = 0  # images --copy-images found already in place, byte for byte
    finished: bool = False  # a ready export that a stopped run had left was moved into place first
    where: Path | None = None  # the file written, or the folder of the caption files

    @property
    def incomplete(self) -> bool:
        """Some selected captions could not be exported (the command then exits 1)."""
        return bool(self.missing or self.clashes or self.unwritable)

    def lines(self, selection: Selection, to: Path, copy_images: bool) -> list[str]:
        """What the export did and left out, for stderr."""
        lines = []
        if self.finished:
            lines.append(f"finished first the export a stopped run had left ready in {to}")
        copied = f", {self.copied} images copied, {self.identical} already there with the same bytes"
        lines.append(f"exported {self.written} captions to {self.where}{copied if copy_images else ''}")
        left_out = [
            (selection.errors, "images with only error records"),
            (selection.superseded, "earlier ok records superseded by a later one"),
            (selection.other_settings, "records of other settings"),
            (selection.risky, f"captions with a risk score above {selection.max_risk}"),
            (selection.unscored, "captions with no risk score (captioned without --risk)"),
        ]
        lines += [f"left out: {count} {what}" for count, what in left_out if count]
        if selection.null_risk:
            lines.append(f"kept: {selection.null_risk} captions with a null risk score (they name no known object)")
        problems = {
            "images not found": self.missing,
            "images whose caption files clash": self.clashes,
            "files that cannot be written": self.unwritable,
        }
        for what, paths in problems.items():
            if paths:
                more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
                lines.append(f"left out: {len(paths)} {what}: {', '.join(paths[:5])}{more}")
        return lines


# --- reading and choosing records ----------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    """Every record of a vacap JSONL file, through the same reader resume uses (a torn last
    line is dropped); anything that is not records raises ``ExportError``."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ExportError(f"{path} is a folder; give the JSONL file written by vacap caption or compare") from None
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        records, _ = scan(data)
    except NotRecords as exc:
        raise ExportError(f"{path} is not a vacap records file ({exc})") from None
    if not records:
        raise ExportError(f"{path} holds no records")
    return records


def record_key(record: dict) -> str:
    return settings_key(record.get("model"), record.get("params"))


def select(records: list[dict], settings: str | None = None) -> Selection:
    """The captions to export: one set of settings, then the last ok record per image.

    ``settings`` picks one set: a prefix of its fingerprint (the ``settings`` column), a
    ``compare`` setting label, or a method name when that names one set.
    """
    ok_keys = Counter(record_key(r) for r in records if _is_ok(r))
    if settings is not None:
        chosen = _choose(records, ok_keys, settings)
    elif len(ok_keys) > 1:
        raise ExportError(
            f"the records hold captions made with {len(ok_keys)} different settings; choose one with "
            f"--settings (a fingerprint, a compare setting label or a method):\n{describe(records, ok_keys)}"
        )
    else:
        chosen = next(iter(ok_keys), None)
    kept = [r for r in records if chosen is None or record_key(r) == chosen]
    selection = Selection(records=[], other_settings=len(records) - len(kept))
    last: dict[tuple, dict] = {}
    for record in kept:
        image = (record["path"], record.get("path_bytes"))
        if _is_ok(record):
            if last.get(image) is not None:
                selection.superseded += 1
            last[image] = record
        else:
            last.setdefault(image, None)
    selection.records = [r for r in last.values() if r is not None]
    selection.errors = sum(r is None for r in last.values())
    return selection


def _is_ok(record: dict) -> bool:
    return record.get("status") == "ok" and isinstance(record.get("caption"), str)


def _choose(records: list[dict], ok_keys: Counter, wanted: str) -> str:
    matches = {key for key in ok_keys if len(wanted) >= 4 and key.startswith(wanted.lower())}
    if not matches:
        matches = {record_key(r) for r in records if _is_ok(r) and wanted in (r.get("setting"), r.get("method"))}
    if not matches and len(wanted) < 4 and all(c in "0123456789abcdefABCDEF" for c in wanted):
        # Three hex digits are too few to tell fingerprints apart, so they are not taken as one.
        raise ExportError(
            f"--settings {wanted!r} is too short for a fingerprint: give at least 4 of its hex digits (the settings "
            f"column), or a compare setting label or a method; the records hold:\n{describe(records, ok_keys)}"
        )
    if len(matches) == 1:
        return matches.pop()
    how = "matches no settings" if not matches else f"matches {len(matches)} settings"
    shown = ok_keys if not matches else Counter({key: ok_keys[key] for key in matches})
    raise ExportError(f"--settings {wanted!r} {how}; the records hold:\n{describe(records, shown)}")


def describe(records: list[dict], keys: Counter) -> str:
    """One line per set of settings: fingerprint, model, what tells it from the others, images."""
    first: dict[str, dict] = {}
    for record in records:
        if _is_ok(record):
            first.setdefault(record_key(record), record)
    params = {key: first[key].get("params") or {} for key in keys}
    names = sorted({name for p in params.values() for name in p})
    differing = [n for n in names if len({json.dumps(p.get(n), sort_keys=True) for p in params.values()}) > 1]
    lines = []
    for key, count in keys.most_common():
        record = first[key]
        label = f' setting "{record["setting"]}"' if record.get("setting") else ""
        shown = " ".join(f"{n}={params[key].get(n)!r}" for n in differing if n != "method")
        name = f"{record.get('model')} {record.get('method')}{label}"
        lines.append("  " + "  ".join(part for part in (key[:SHORT_KEY], name, shown, f"({count} captions)") if part))
    return "\n".join(lines)


# --- risk scores (vacap caption --risk) -----------------------------------------------------------


def risk_score(record: dict) -> tuple[bool, float | None]:
    """(whether ``record`` has a risk object, its caption score: a float, or None when the
    caption names no known object). A malformed risk object raises ``ExportError``."""
    risk = record.get("risk")
    if risk is None:
        return False, None
    score = risk.get("score", _MISSING) if isinstance(risk, dict) else _MISSING
    if score is None:
        return True, None
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        return True, float(score)
    shown = "no score" if score is _MISSING else f"score {score!r}"
    raise ExportError(f"the risk object of {record['path']} is not one vacap writes ({shown}); was the file edited?")


_MISSING = object()


def by_risk(selection: Selection, flags: str, max_risk: float | None = None) -> None:
    """Apply the risk flags (``flags`` names them, for messages) to ``selection`` in place:
    captions with no risk object are left out and counted, and so are those whose score is
    above ``max_risk``; a null score (no known object word) is kept and counted. None of the
    captions having a risk object raises ``ExportError``: the flags would have nothing to act on."""
    scores = [(record, *risk_score(record)) for record in selection.records]
    if scores and not any(has for _, has, _ in scores):
        raise ExportError(
            f"{flags} needs risk scores, and none of the {len(scores)} captions to export has one: "
            "caption with vacap caption --risk first"
        )
    selection.max_risk = max_risk
    kept = []
    for record, has, score in scores:
        if not has:
            selection.unscored += 1
        elif max_risk is not None and score is not None and score > max_risk:
            selection.risky += 1
        else:
            selection.null_risk += score is None
            kept.append(record)
    selection.records = kept


# --- where images and caption files go ------------------------------------------------------------


def source_path(record: dict) -> Path:
    """The image file a record names, as the file system knows it (``path_bytes`` when the name
    is not UTF-8). A relative path is relative to where the caption run started, which export
    takes to be the current folder."""
    raw = record.get("path_bytes")
    if isinstance(raw, str):
        return Path(os.fsdecode(base64.b64decode(raw)))
    return Path(record["path"])


def _absolute(path: Path) -> Path:
    # abspath, not resolve: a symbolic link to a folder keeps its name in the layout.
    return Path(os.path.abspath(path))


def relative_layout(paths: list[Path]) -> list[Path]:
    """Each image's path relative to the deepest folder holding them all, so an export mirrors
    the tree the images came from without the folders above it."""
    if not paths:
        return []
    absolute = [_absolute(p) for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return [p.relative_to(root) for p in absolute]


def _inside(path: Path, folder: Path) -> Path | None:
    try:
        return _absolute(path).relative_to(_absolute(folder))
    except ValueError:
        return None


def _readable(path: Path) -> str:
    """A relative path as text for a JSON file: \\xNN for bytes of a name that is not UTF-8."""
    text = path.as_posix()
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


# --- the formats ---------------------------------------------------------------------------------


def export(
    selection: Selection, fmt: str, to: Path, *, copy_images: bool = False, mark_risk: bool = False
) -> Result:
    """Write ``selection`` under the folder ``to`` in format ``fmt``, whole or not at all;
    ``ExportError`` when it cannot be done as asked (nothing is written then), ``OSError`` when
    writing fails (the previous export is left as it was). ``mark_risk`` adds each caption's
    risk score: a ``risk`` column (csv, parquet) or key (hf-metadata); run ``by_risk`` first."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet":
        _pyarrow()  # before anything is written
    if to.exists() and not to.is_dir():
        raise ExportError(f"--to {to} is a file; give a folder (it is created when missing)")
    if copy_images and fmt != "hf-metadata":
        raise ExportError("--copy-images goes with --format hf-metadata only")
    if mark_risk and fmt == "txt":
        raise ExportError(MARK_RISK_TXT)
    places = _hf_places(selection.records, to, copy_images) if fmt == "hf-metadata" else None
    to.mkdir(parents=True, exist_ok=True)
    result = Result()
    with _staged(to, result) as stage:
        if places is not None:
            _hf_metadata(places, stage, result, mark_risk)
        elif fmt == "txt":
            _txt(selection.records, stage, result)
        else:
            rows = [row(record, mark_risk) for record in selection.records]
            names = columns(mark_risk)
            if fmt == "csv":
                result.where = to / "captions.csv"
                buffer = io.StringIO(newline="")
                # \r\n ends rows (RFC 4180), and makes the writer quote a field holding a lone \r.
                writer = csv.DictWriter(buffer, fieldnames=list(names), lineterminator="\r\n")
                writer.writeheader()
                writer.writerows({name: csv_cell(value) for name, value in r.items()} for r in rows)
                stage.write(Path("captions.csv"), buffer.getvalue().encode("utf-8"))
            else:
                result.where = to / "captions.parquet"
                _write_parquet(rows, names, stage.place(Path("captions.parquet")))
            result.written = len(rows)
    return result


def columns(mark_risk: bool = False) -> dict[str, str]:
    """The csv and parquet columns, with their parquet types: ``COLUMNS``, and with
    ``mark_risk`` the risk score right after the caption."""
    if not mark_risk:
        return dict(COLUMNS)
    names = list(COLUMNS.items())
    at = list(COLUMNS).index("caption") + 1
    return dict(names[:at] + [(RISK_COLUMN, "float64")] + names[at:])


def row(record: dict, mark_risk: bool = False) -> dict:
    """The csv and parquet columns of one record (``columns(mark_risk)``)."""
    params = record.get("params") or {}
    risk = {RISK_COLUMN: risk_score(record)[1]} if mark_risk else {}
    return {
        "path": record["path"],
        "caption": record["caption"],
        **risk,
        "model": record.get("model"),
        "method": record.get("method"),
        "prompt": params.get("prompt"),
        "tokens": record.get("tokens"),
        "seconds": record.get("seconds"),
        "width": record.get("width"),
        "height": record.get("height"),
        "sha256": record.get("sha256"),
        "settings": record_key(record)[:SHORT_KEY],
        "setting": record.get("setting"),
        "params": json.dumps(params, ensure_ascii=False, sort_keys=True),
        "vacap_version": record.get("vacap_version"),
    }


def csv_cell(value):
    """A csv value that no spreadsheet runs as a formula: text starting with =, +, -, @, tab or
    carriage return gets a leading single quote, as OWASP advises (a caption a model wrote, or
    a file name, is untrusted text). Only csv is escaped; parquet and jsonl keep the text as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ExportError(PARQUET_INSTALL) from None
    return pyarrow


def _write_parquet(rows: list[dict], names: dict[str, str], path: Path) -> None:
    pa = _pyarrow()
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in names.items()])
    pa.parquet.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _txt(records: list[dict], stage: Stage, result: Result) -> None:
    """``<stem>.txt`` per image in ``to``, mirroring the images' tree. Two images whose caption
    files would be the same file (``a.png`` and ``a.jpg`` side by side) are both left out; so is
    a record whose path names no file (``/``)."""
    result.where = stage.to
    named = []
    for record in records:
        if _absolute(source_path(record)).name:
            named.append(record)
        else:
            result.unwritable.append(f"{record['path']} (names no file)")
    layout = relative_layout([source_path(r) for r in named])
    targets = [sidecar_path(relative, "txt") for relative in layout]
    claims = Counter(targets)
    for record, target in zip(named, targets):
        if claims[target] > 1:
            result.clashes.append(record["path"])
        elif stage.try_write(target, (record["caption"] + "\n").encode("utf-8"), record["path"]):
            result.written += 1


@dataclass
class Places:
    """Where each image of an hf-metadata export is, relative to ``to``, and which are copied."""

    to: Path
    present: list[dict]  # records whose image is on disk, in export order
    places: dict[int, Path]  # id(record) -> its file_name
    copies: list[dict]  # records whose image is copied in
    missing: list[str]


def _hf_places(records: list[dict], to: Path, copy_images: bool) -> Places:
    """The imagefolder layout: file names relative to ``to``, which Hugging Face's loader does
    not let leave the folder, so images outside ``to`` are copied in with ``copy_images`` and
    refused (``ExportError``, before anything is written) without it."""
    present, missing = [], []
    for record in records:
        if source_path(record).is_file():
            present.append(record)
        else:
            missing.append(record["path"])
    outside = [r for r in present if _inside(source_path(r), to) is None]
    if outside and not copy_images:
        raise ExportError(
            f"{len(outside)} of the {len(present)} images are not inside {to} (the first: {outside[0]['path']}), "
            "and an imagefolder's file_name cannot point outside its folder; pass --copy-images to copy "
            "them into it, or export to a folder that holds the images"
        )
    copied = {id(r) for r in outside}
    places = {id(r): _inside(source_path(r), to) for r in present if id(r) not in copied}
    taken = set(places.values())
    for record, relative in zip(outside, relative_layout([source_path(r) for r in outside])):
        place = _unclaimed(relative, taken)
        taken.add(place)
        places[id(record)] = place
    return Places(to=to, present=present, places=places, copies=outside, missing=missing)


def _hf_metadata(layout: Places, stage: Stage, result: Result, mark_risk: bool = False) -> None:
    """``to/metadata.jsonl`` with ``file_name`` and ``text`` per image (and ``risk`` with
    ``mark_risk``: a float, or null), the images outside ``to`` copied in first; one already there
    with the same bytes is left as it is."""
    result.missing = layout.missing
    failed = set()
    for record in layout.copies:
        copied = stage.try_copy(layout.places[id(record)], source_path(record), record["path"])
        if copied is None:
            failed.add(id(record))
        elif copied:
            result.copied += 1
        else:
            result.identical += 1
    lines = []
    for r in layout.present:
        if id(r) not in failed:
            line = {"file_name": _readable(layout.places[id(r)]), "text": r["caption"]}
            if mark_risk:
                line[RISK_COLUMN] = risk_score(r)[1]
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    stage.write(Path(METADATA), "".join(lines).encode("utf-8"))
    result.written = len(lines)
    result.where = layout.to / METADATA


def _unclaimed(relative: Path, taken: set[Path]) -> Path:
    """``relative``, or ``stem_2``, ``stem_3``... beside it when another image has that place."""
    place, number = relative, 1
    while place in taken:
        number += 1
        place = relative.with_name(f"{relative.stem}_{number}{relative.suffix}")
    return place


def _same_bytes(source: Path, existing: Path) -> bool:
    """Whether the regular file ``existing`` (a link there is not followed: it is replaced) holds
    the bytes of ``source``."""
    try:
        fd = os.open(existing, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    with open(fd, "rb") as fb:
        if os.fstat(fb.fileno()).st_size != os.stat(source).st_size:
            return False
        with open(source, "rb") as fa:
            while True:
                block = fa.read(1 << 20)
                if block != fb.read(1 << 20):
                    return False
                if not block:
                    return True


# --- writing an export whole ---------------------------------------------------------------------
#
# An export is many files (caption files, copied images, metadata.jsonl) that may have to go into a
# folder holding other things, the images themselves, so it cannot be made in a folder of its own
# and renamed over the old one. Instead every new file is written under to/.vacap-export/new; the
# rename of that folder to .vacap-export/ready is the moment the export is made; the files are then
# moved into place (renames in one file system), metadata.jsonl last, and the staging folder is
# removed. A run stopped before that rename leaves the previous export as it was, and the next
# export into the folder removes what it staged; a run stopped after it leaves a ready folder that
# the next export into the folder moves into place before anything else. While images are moved in
# over different ones, the old metadata.jsonl is gone, so it never names an image it does not
# describe. Hidden names keep the staging folder out of image discovery and of imagefolder loading;
# a lock on the folder keeps two exports into it apart.


class Stage:
    """The new files of one export, under ``to/.vacap-export/new`` at their relative paths."""

    def __init__(self, to: Path, failures: list[str]):
        self.to = to
        self.new = to / STAGING / "new"
        self.failures = failures  # "image (why)" of each file that could not be staged

    def place(self, relative: Path) -> Path:
        """Where the file ``relative`` is staged; ``OutsideError`` when its final place would not
        be inside ``to`` once links are resolved (a link in ``to`` to a folder elsewhere), or
        would be in the staging folder."""
        contained(self.to / relative, self.to)
        if relative.parts[:1] == (STAGING,):
            raise OutsideError(f"{relative} would be written into vacap's staging folder {self.to / STAGING}")
        staged = self.new / relative
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def write(self, relative: Path, data: bytes) -> None:
        fd = os.open(self.place(relative), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)

    def try_write(self, relative: Path, data: bytes, image: str) -> bool:
        def write():
            self.write(relative, data)
            return True

        return self._trying(write, image) is not None

    def try_copy(self, relative: Path, source: Path, image: str) -> bool | None:
        """Stage a copy of the image ``source`` unless the file in place has its bytes already.
        -> True when staged, False when already there, None when it cannot be written."""

        def copy():
            staged = self.place(relative)
            if _same_bytes(source, self.to / relative):
                return False
            shutil.copy2(source, staged)
            return True

        return self._trying(copy, image)

    def _trying(self, write, image: str):
        """``write()`` for one image's file, or None when the file cannot be written (a name too
        long, a place outside ``to``): that image is left out of the export, with why."""
        try:
            return write()
        except (OSError, OutsideError) as exc:
            self.failures.append(f"{image} ({_why(exc)})")
            return None


@contextlib.contextmanager
def _staged(to: Path, result: Result):
    """A ``Stage`` for ``to``; the staged files are moved into place when the block ends, and
    removed when it raises. Finishes or removes what a stopped run left first."""
    with _locked(to):
        staging = to / STAGING
        result.finished = _finish(to, result.unwritable)
        stage = Stage(to, result.unwritable)
        stage.new.mkdir(parents=True)
        try:
            yield stage
        except BaseException:
            _remove(staging)
            raise
        # One flush of all that was staged before the rename that makes the export count, so a
        # power cut cannot leave a ready export of empty files; an fsync per file costs ms each.
        os.sync()
        os.rename(stage.new, staging / "ready")
        sync_folder(staging)
        _finish(to, result.unwritable)


def _finish(to: Path, failures: list[str]) -> bool:
    """Move a ready export under ``to/.vacap-export`` into place and remove the staging folder
    (an unfinished one is only removed); a file that cannot be moved in goes to ``failures``.
    -> whether there was a ready export."""
    staging = to / STAGING
    ready = staging / "ready"
    found = ready.is_dir() and not ready.is_symlink()
    if found:
        moves = []  # (folder relative to ready, its file names), metadata.jsonl alone at the end
        for folder, _, names in os.walk(ready):
            relative = os.path.relpath(folder, ready)
            names = sorted(name for name in names if (relative, name) != (".", METADATA))
            if names:
                moves.append((relative, names))
        if os.path.isfile(ready / METADATA):
            if any(os.path.lexists(to / folder / name) for folder, names in moves for name in names):
                (to / METADATA).unlink(missing_ok=True)
                sync_folder(to)
            moves.append((".", [METADATA]))
        for folder, names in moves:
            try:
                place = contained(to / folder / names[0], to).parent
                place.mkdir(parents=True, exist_ok=True)
            except (OSError, OutsideError) as exc:
                failures.extend(f"{Path(folder, name)} ({_why(exc)})" for name in names)
                continue
            for name in names:
                try:
                    os.replace(ready / folder / name, place / name)
                except OSError as exc:
                    failures.append(f"{Path(folder, name)} ({_why(exc)})")
            sync_folder(place)
    _remove(staging)
    return found


def _why(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _remove(staging: Path) -> None:
    """Remove the staging folder; a link or file put in its place is removed, not followed."""
    if staging.is_symlink() or (os.path.lexists(staging) and not staging.is_dir()):
        staging.unlink()
    elif staging.exists():
        shutil.rmtree(staging)
    sync_folder(staging.parent)


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on ``folder`` (flock, dropped by the kernel if the process dies),
    so a second export into it cannot take the staging folder of one still running."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another vacap export is writing into {folder}; wait for it to finish") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)


"""Records (vacap's JSONL) turned into what dataset tools read: an imagefolder metadata.jsonl,
CSV, Parquet, or a caption file per image.

The last ``ok`` record of each image wins (a retried or re-captioned image has several); images
with only ``error`` records are left out and counted. A file holding captions made with more
than one set of settings (a ``compare`` output, or a run resumed with other flags) is refused
unless one set is chosen: mixing them would pick each image's caption by which run came last.
No torch import: exporting needs no model.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vacap.records import NotRecords, scan, settings_key
from vacap.files import temporary_name, write_atomic
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
SHORT_KEY = 12  # hex digits of the settings fingerprint shown to users and accepted by --settings
PARQUET_INSTALL = "parquet export needs pyarrow; install it with: pip install 'vacap[parquet]' (or pip install pyarrow)"


class ExportError(ValueError):
    """The export cannot be made as asked; the message is one paragraph, for the user."""


@dataclass
class Selection:
    """The captions to export and what was left out on the way."""

    records: list[dict]  # the last ok record of each image, in the order images first appear
    errors: int = 0  # images with no ok record
    superseded: int = 0  # ok records replaced by a later ok record of the same image
    other_settings: int = 0  # records of settings other than the chosen ones


@dataclass
class Result:
    written: int = 0
    missing: list[str] = field(default_factory=list)  # images that are not on disk (hf-metadata)
    clashes: list[str] = field(default_factory=list)  # images whose caption file another image claims
    copied: int = 0
    where: Path | None = None  # the file written, or the folder of the caption files


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


def export(selection: Selection, fmt: str, to: Path, *, copy_images: bool = False) -> Result:
    """Write ``selection`` under the folder ``to`` in format ``fmt``; ``ExportError`` when it
    cannot be done as asked (nothing is written then)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet":
        _pyarrow()  # before anything is written
    if to.exists() and not to.is_dir():
        raise ExportError(f"--to {to} is a file; give a folder (it is created when missing)")
    if copy_images and fmt != "hf-metadata":
        raise ExportError("--copy-images goes with --format hf-metadata only")
    if fmt == "hf-metadata":
        return _hf_metadata(selection.records, to, copy_images)
    if fmt == "txt":
        return _txt(selection.records, to)
    rows = [row(record) for record in selection.records]
    if fmt == "csv":
        target = to / "captions.csv"
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(target, buffer.getvalue())
    else:
        target = to / "captions.parquet"
        _write_parquet(rows, target)
    return Result(written=len(rows), where=target)


def row(record: dict) -> dict:
    """The csv and parquet columns of one record."""
    params = record.get("params") or {}
    return {
        "path": record["path"],
        "caption": record["caption"],
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


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ExportError(PARQUET_INSTALL) from None
    return pyarrow


def _write_parquet(rows: list[dict], target: Path) -> None:
    pa = _pyarrow()
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS.items()])
    table = pa.Table.from_pylist(rows, schema=schema)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / temporary_name(target.name, target.parent)
    try:
        pa.parquet.write_table(table, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _txt(records: list[dict], to: Path) -> Result:
    """``<stem>.txt`` per image in ``to``, mirroring the images' tree. Two images whose caption
    files would be the same file (``a.png`` and ``a.jpg`` side by side) are both left out."""
    layout = relative_layout([source_path(r) for r in records])
    targets = [sidecar_path(to / relative, "txt") for relative in layout]
    claims = Counter(targets)
    result = Result(where=to)
    for record, target in zip(records, targets):
        if claims[target] > 1:
            result.clashes.append(record["path"])
            continue
        write_atomic(target, record["caption"])
        result.written += 1
    return result


def _hf_metadata(records: list[dict], to: Path, copy_images: bool) -> Result:
    """``to/metadata.jsonl`` with ``file_name`` (relative to ``to``) and ``text`` per image, the
    layout of Hugging Face's ``imagefolder`` loader, whose file names may not leave the folder:
    images outside ``to`` are copied in with ``copy_images``, and refused without it."""
    result = Result()
    present = []
    for record in records:
        if source_path(record).is_file():
            present.append(record)
        else:
            result.missing.append(record["path"])
    outside = [r for r in present if _inside(source_path(r), to) is None]
    copied = {id(r) for r in outside}
    if outside and not copy_images:
        raise ExportError(
            f"{len(outside)} of the {len(present)} images are not inside {to} (the first: {outside[0]['path']}), "
            "and an imagefolder's file_name cannot point outside its folder; pass --copy-images to copy "
            "them into it, or export to a folder that holds the images"
        )
    places: dict[int, Path] = {id(r): _inside(source_path(r), to) for r in present if id(r) not in copied}
    taken = set(places.values())
    for record, relative in zip(outside, relative_layout([source_path(r) for r in outside])):
        place = _unclaimed(relative, taken)
        taken.add(place)
        places[id(record)] = place
        _copy(source_path(record), to / place)
        result.copied += 1
    lines = [
        json.dumps({"file_name": _readable(places[id(r)]), "text": r["caption"]}, ensure_ascii=False) + "\n"
        for r in present
    ]
    target = to / "metadata.jsonl"
    write_atomic(target, "".join(lines))
    result.written = len(lines)
    result.where = target
    return result


def _unclaimed(relative: Path, taken: set[Path]) -> Path:
    """``relative``, or ``stem_2``, ``stem_3``... beside it when another image has that place."""
    place, number = relative, 1
    while place in taken:
        number += 1
        place = relative.with_name(f"{relative.stem}_{number}{relative.suffix}")
    return place


def _copy(source: Path, target: Path) -> None:
    """Copy with metadata through a temporary name, so a stopped export leaves no half image;
    an identical file already there is left as it is."""
    if target.is_file() and _same_bytes(source, target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / temporary_name(target.name, target.parent)
    try:
        shutil.copy2(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block = fa.read(1 << 20)
            if block != fb.read(1 << 20):
                return False
            if not block:
                return True

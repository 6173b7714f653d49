"""JSONL output: one record per image, written as it is made, and resume from an earlier run.

A run appends to its output file. When an image appears in the file more than once (an error
that was retried, say), the last record for that path wins. An image counts as done only when
the file holds an ``ok`` record for the same path, the same file bytes (sha256) and the same
model and decode settings; ``error`` records are retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import IO

import vacap

RECORD_KEYS = (
    "path",
    "status",
    "caption",
    "error",
    "model",
    "method",
    "params",
    "tokens",
    "seconds",
    "width",
    "height",
    "sha256",
    "vacap_version",
)
STATUSES = ("ok", "error", "skipped")

log = logging.getLogger("vacap")


def settings_key(model: str, params: dict) -> str:
    """A fingerprint of everything that decides the caption besides the image itself."""
    canonical = json.dumps(
        {"model": model, "params": params}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def make_record(
    *,
    path,
    status: str,
    model: str,
    method: str,
    params: dict,
    caption: str | None = None,
    error: str | None = None,
    tokens: int | None = None,
    seconds: float | None = None,
    width: int | None = None,
    height: int | None = None,
    sha256: str | None = None,
    **extra,
) -> dict:
    """A record with the standard keys in their fixed order, then any extra keys."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    clashing = sorted(set(extra) & set(RECORD_KEYS))
    if clashing:
        raise ValueError(f"extra record keys clash with standard ones: {clashing}")
    record = {
        "path": str(path),
        "status": status,
        "caption": caption,
        "error": error,
        "model": model,
        "method": method,
        "params": params,
        "tokens": tokens,
        "seconds": seconds,
        "width": width,
        "height": height,
        "sha256": sha256,
        "vacap_version": vacap.__version__,
    }
    record.update(extra)
    return record


class RecordWriter:
    """Appends records to a JSONL file (or stdout), one flushed line per record.

    Flushing every line means a killed run loses at most the line being written, and the next
    run repairs that torn line and resumes.
    """

    def __init__(self, output: str | Path | None, *, overwrite: bool = False) -> None:
        self.previously_done = 0
        self._done: set[tuple[str, str, str]] = set()
        self._file: IO[bytes] | None = None
        if output is None or str(output) == "-":
            return
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not overwrite:
            self._load_existing(path)
            self.previously_done = len(self._done)
        self._file = open(path, "wb" if overwrite else "ab")

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def is_done(self, path: str, sha256: str, settings: str) -> bool:
        return (str(path), sha256, settings) in self._done

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            _write_stdout(line)
        self._remember(record)

    def _remember(self, record: dict) -> None:
        # Also used for records written by this run, so a repeated input is not redone.
        if record.get("status") != "ok":
            return
        path, sha256 = record.get("path"), record.get("sha256")
        model, params = record.get("model"), record.get("params")
        if isinstance(path, str) and isinstance(sha256, str) and isinstance(params, dict):
            self._done.add((path, sha256, settings_key(model, params)))

    def _load_existing(self, path: Path) -> None:
        lines = _split_lines(path.read_bytes())
        for number, (offset, raw) in enumerate(lines, start=1):
            is_last = number == len(lines)
            if raw.strip() == b"" and raw.endswith(b"\n"):
                continue
            record = _parse(raw)
            if record is None and is_last:
                # The only line a killed run can leave half-written; cut it, keep the rest.
                _truncate(path, offset)
                log.warning(
                    "%s: removed a broken last line (%d bytes), likely a killed run", path, len(raw)
                )
            elif record is None:
                log.warning("%s: ignoring line %d, which is not a JSON record", path, number)
            else:
                if is_last and not raw.endswith(b"\n"):
                    # A whole record missing only its newline: keep it, finish the line.
                    _append(path, b"\n")
                self._remember(record)


def _split_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(byte offset, line including its newline) for each line; the last may lack the newline."""
    # Only "\n" ends a line: that is all the writer emits, and json escapes it inside strings.
    lines = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        end = len(data) if end < 0 else end + 1
        lines.append((offset, data[offset:end]))
        offset = end
    return lines


def _parse(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _write_stdout(line: bytes) -> None:
    out = sys.stdout
    buffer = getattr(out, "buffer", None)
    if buffer is None:  # a text-only replacement stream
        out.write(line.decode("utf-8"))
        out.flush()
        return
    # Bytes go straight to the buffer so captions stay UTF-8 whatever the console encoding;
    # anything already printed through the text layer is flushed first to keep the order.
    out.flush()
    buffer.write(line)
    buffer.flush()

"""JSONL output: one record per image, written as it is made, and resume from an earlier run.

A run appends to its output file. When an image appears in the file more than once (an error
that was retried, say), the last record for that path wins. An image counts as done only when
the file holds an ``ok`` record for the same path, the same file bytes (sha256) and the same
model and decode settings, and no later ``error`` record for them; ``error`` records are retried.

The output is opened, locked and checked before anything slow happens: a file that is not
vacap's own JSONL is refused untouched, and a second run on the same file is refused while the
first one holds it.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import sys
from pathlib import Path

import vacap
from vacap.files import write_all

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
# How every line the writer emits begins (path is the first key), so how a torn one begins too.
_LINE_START = b'{"path": "'

log = logging.getLogger("vacap")


class OutputError(Exception):
    """The output cannot be used or written; the message is one line, for the user."""


class ReaderGone(OutputError):
    """The reader of a pipe the records go to went away (``vacap caption | head -1``)."""


# --- text that JSON can carry -----------------------------------------------------------------


def _raw_bytes(text: str) -> bytes:
    """The bytes a str holding lone surrogates stands for (os.fsdecode's surrogateescape)."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:  # surrogates that no decoder made: keep them losslessly
        return text.encode("utf-8", "surrogatepass")


def _readable(text: str) -> str:
    """text itself when it is valid Unicode, else its bytes as UTF-8 with \\xNN for the rest."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _raw_bytes(text).decode("utf-8", "backslashreplace")
    return text


def _clean(value):
    """Strings (also inside dicts and lists) made encodable as UTF-8; the rest unchanged."""
    if isinstance(value, str):
        return _readable(value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def path_fields(path) -> tuple[str, str | None]:
    """(readable path, base64 of its bytes or None) for a path as the file system gave it.

    A file name that is not valid UTF-8 reaches Python as a str with lone surrogates, which
    UTF-8 JSON cannot hold. Its record then says the name readably, with \\xNN for the bad
    bytes, and keeps the exact bytes in ``path_bytes`` (None for every other name).
    """
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    readable = _readable(text)
    if readable == text:
        return text, None
    return readable, base64.b64encode(_raw_bytes(text)).decode("ascii")


def settings_key(model: str, params: dict) -> str:
    """A fingerprint of everything that decides the caption besides the image itself."""
    # Cleaned as make_record cleans them, so a key made from the settings of this run matches
    # the key made from a record written by it.
    canonical = json.dumps(
        _clean({"model": model, "params": params}), sort_keys=True, separators=(",", ":"), ensure_ascii=False
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
    """A record with the standard keys in their fixed order, then any extra keys.

    Every string in it is valid Unicode, so the record always serialises as UTF-8 JSON; a path
    that is not gets ``path_bytes`` (see :func:`path_fields`) right after the standard keys.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    clashing = sorted(set(extra) & {*RECORD_KEYS, "path_bytes"})
    if clashing:
        raise ValueError(f"extra record keys clash with standard ones: {clashing}")
    readable_path, path_bytes = path_fields(path)
    record = {
        "path": readable_path,
        "status": status,
        "caption": _clean(caption),
        "error": _clean(error),
        "model": _clean(model),
        "method": _clean(method),
        "params": _clean(params),
        "tokens": tokens,
        "seconds": seconds,
        "width": width,
        "height": height,
        "sha256": sha256,
        "vacap_version": vacap.__version__,
    }
    if path_bytes is not None:
        record["path_bytes"] = path_bytes
    record.update(_clean(extra))
    return record


def is_record(value) -> bool:
    """Whether a parsed JSON value is a vacap record (of this version or an earlier one)."""
    return isinstance(value, dict) and isinstance(value.get("path"), str) and value.get("status") in STATUSES


# --- the existing content of an output file ---------------------------------------------------


class NotRecords(ValueError):
    """The file holds something other than vacap records; the message says where."""


def scan(data: bytes) -> tuple[list[dict], int]:
    """The records in an output file's bytes, and the length of its intact part.

    Only the last line, and only when it has no newline, can be a write cut short (by a kill
    or a full disk): the writer emits each line whole, newline last. Such a line is dropped if
    it begins the way every record line begins; a complete record that lacks only its newline
    is kept. Blank lines are allowed. Anything else raises ``NotRecords``: the file is not
    vacap's to append to.

    -> (records in file order, byte offset where the intact part ends)
    """
    records: list[dict] = []
    offset = 0
    number = 0
    while offset < len(data):
        number += 1
        end = data.find(b"\n", offset)
        complete = end >= 0
        end = end + 1 if complete else len(data)
        raw = data[offset:end]
        if raw.strip():
            value, why = _parse(raw)
            if value is not None:
                records.append(value)
            elif complete or not _LINE_START.startswith(raw[: len(_LINE_START)]):
                raise NotRecords(f"line {number} {why}")
            else:
                return records, offset
        elif not complete:
            return records, offset
        offset = end
    return records, len(data)


def _parse(raw: bytes) -> tuple[dict | None, str]:
    """-> (the record, "") or (None, why it is not one)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except json.JSONDecodeError:
        return None, "is not JSON"
    if not is_record(value):
        return None, "is JSON but not a vacap record"
    return value, ""


# --- the writer ---------------------------------------------------------------------------------


class RecordWriter:
    """Appends records to a JSONL file (or stdout), one line per record, each written at once.

    The file is opened and locked in the constructor, so every problem with it (a folder, a
    read-only disk, a file that is not vacap's JSONL, another run writing it) is an
    ``OutputError`` before any work starts. Writing each line at once means a killed run loses
    at most the line being written, and the next run drops that torn line and resumes.

    ``resume=False`` replaces an earlier output instead of appending to it (still refusing a
    file that is not vacap records); ``overwrite=True`` replaces whatever the file held. Either
    empties the file only when the first record is written.
    Other file types (a FIFO, /dev/null) are written to as they are, without resume or lock.
    """

    def __init__(self, output: str | Path | None, *, overwrite: bool = False, resume: bool = True) -> None:
        self.previously_done = 0
        # (readable path, path bytes, settings key) -> {sha256 of each file content captioned ok:
        # that record's caption and caption_file}, from which a resumed run brings a caption file
        # to what the record says (vacap.sidecars).
        self._done: dict[tuple[str, str | None, str], dict[str, dict]] = {}
        self._fd: int | None = None
        self._created = False
        self._written = 0
        self._synced = 0
        # Replacing waits for the first record, so a run that stops before it (a model that
        # does not load) leaves the old content as it was.
        self._empty_first = False
        self.name = "stdout"
        self.resumable = False  # whether a later run can continue from what this one wrote
        if output is None or str(output) == "-":
            return
        path = Path(output)
        self.name = str(path)
        self._path = path
        try:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError:  # a file where a folder of the path should be
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
            self._fd, self._created = _open_locked(path)
            if stat.S_ISREG(os.fstat(self._fd).st_mode):
                self._prepare(overwrite, resume)
                self.resumable = resume
        except OutputError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise OutputError(f"cannot write to {path}: {_reason(exc)}") from None
        self.previously_done = sum(len(hashes) for hashes in self._done.values())

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # A file this run created and never wrote to is not left behind; unlinked while
            # still locked, so a run waiting on it sees the name gone and starts afresh.
            if self._created and self._written == 0 and os.fstat(fd).st_size == 0:
                self._path.unlink()
        except OSError:
            pass  # an empty file left behind is harmless
        finally:
            os.close(fd)

    @property
    def written(self) -> int:
        """Records this run wrote."""
        return self._written

    def done_hashes(self, path, settings: str) -> dict[str, dict]:
        """sha256 of each content of ``path`` the file holds an ok record for, under settings,
        with that record's ``caption`` and ``caption_file`` (None where it has none)."""
        return self._done.get((*path_fields(path), settings), {})

    def is_done(self, path, sha256: str, settings: str) -> bool:
        return sha256 in self.done_hashes(path, settings)

    def write(self, record: dict) -> None:
        """Append one record; an ``OutputError`` when it cannot be written (disk full...)."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            if self._empty_first:
                os.ftruncate(self._fd, 0)
                self._empty_first = False
            if self._fd is not None:
                write_all(self._fd, line)
            else:
                _write_stdout(line)
        except BrokenPipeError:
            raise ReaderGone(f"the reader of {self.name} went away") from None
        except OSError as exc:
            raise OutputError(f"cannot write to {self.name}: {_reason(exc)}") from None
        self._written += 1
        self._remember(record)

    def sync(self, records: int) -> None:
        """Make sure the first ``records`` records this run wrote are on disk, not only in the
        page cache (one flush covers every record written before it); may be called from
        another thread than ``write``'s. Nothing to do for stdout and other non-files."""
        if self._synced >= records or not self.resumable or self._fd is None:
            return
        written = self._written
        os.fdatasync(self._fd)
        self._synced = max(self._synced, written)

    def _prepare(self, overwrite: bool, resume: bool) -> None:
        """Check (unless overwriting) and repair or empty the locked regular file."""
        fd = self._fd
        if overwrite:
            self._empty_first = True
            return
        try:
            head = os.pread(fd, 4096, 0)
            if not head.lstrip().startswith(b"{"):
                scan(head)  # refuses at the first line, without reading a big foreign file whole
            data = _read_all(fd)
            records, intact = scan(data)
        except NotRecords as exc:
            raise OutputError(
                f"{self._path} already holds something other than vacap records ({exc}); it was left "
                "as it is. Choose another output file, or pass --overwrite to replace its content."
            ) from None
        if not resume:
            self._empty_first = True
            return
        if intact < len(data):
            os.ftruncate(fd, intact)
            torn = len(data) - intact
            log.warning("%s: removed a broken last line (%d bytes), likely a killed run", self._path, torn)
        elif data and not data.endswith(b"\n"):
            # A whole record missing only its newline: keep it, finish the line.
            write_all(fd, b"\n")
        for record in records:
            self._remember(record)

    def _remember(self, record: dict) -> None:
        # Also used for records written by this run, so a repeated input is not redone.
        path, sha256 = record.get("path"), record.get("sha256")
        model, params = record.get("model"), record.get("params")
        if not (isinstance(path, str) and isinstance(sha256, str) and isinstance(params, dict)):
            return
        key = (path, record.get("path_bytes"), settings_key(model, params))
        if record.get("status") != "ok":
            # An error after an ok record for the same content (its caption file could not be
            # written) undoes it: the last record of a path wins.
            self._done.get(key, {}).pop(sha256, None)
            return
        caption = record.get("caption")
        caption_file = record.get("caption_file")
        self._done.setdefault(key, {})[sha256] = {
            "caption": caption if isinstance(caption, str) else None,
            "caption_file": caption_file if isinstance(caption_file, dict) else None,
        }


def _open_locked(path: Path) -> tuple[int, bool]:
    """-> (descriptor open for reading and appending, whether this call created the file).

    Regular files come back holding an exclusive advisory lock (flock: the kernel drops it when
    the process dies, kill -9 included); a locked file raises ``OutputError`` naming its holder.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
    while True:
        created = False
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:  # another run created it just now; open that one
                continue
            created = True
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return fd, created
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise OutputError(
                f"{path} is being written by {who} (another vacap run?); wait for it to finish "
                "or choose another output file"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            log.warning("%s: this file system cannot lock files, so nothing stops a second run writing it", path)
        # The run that held the lock may have removed the file it had created and not used:
        # then this descriptor points at a deleted file, and the name must be opened anew.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd, created
        os.close(fd)


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on fd's file, from /proc/locks (Linux); None when unknown."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters have "->" after the number.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device and fields[4].isdigit():
            pid = int(fields[4])
            if pid != os.getpid():
                return pid
    return None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


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


def still_to_do(images: list[Path], writer: RecordWriter, key: str, run=None) -> list[Path]:
    """The images without an ok record for their current bytes under these settings (``key``).
    With caption files (``run``, a ``SidecarRun``), a done image's caption file is brought to
    what its record says (written when it is missing or the run stopped before writing it).

    Only an image whose path has such a record is hashed; the rest are read once, when captioned.
    """
    from vacap.images import ImageError, file_sha256

    todo = []
    for image in images:
        done = writer.done_hashes(str(image), key)
        if done:
            try:
                sha256 = file_sha256(image)
                if sha256 in done and (run is None or run.restore(image, done[sha256])):
                    continue
            except ImageError:
                pass  # captioning it will say what is wrong, as an error record
        todo.append(image)
    return todo


def logged(records, writer: RecordWriter):
    """Each record, once the writer has written it."""
    for record in records:
        writer.write(record)
        yield record

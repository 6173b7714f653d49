"""Writing files safely: inside the folder they belong to, whole or not at all, never through a
link, and under temporary names that fit the file system's name limit.

Every file vacap writes (caption files, exports) goes through :func:`contained` and
:func:`write_atomic`. No torch import.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

# The longest file name (in bytes) when the file system does not say; Linux's ext4, xfs, btrfs.
NAME_MAX = 255


class OutsideError(ValueError):
    """A path that would be written lies outside the folder it belongs to."""


def contained(path: Path, folder: Path) -> Path:
    """``path`` with its folder's links resolved, checked to lie inside ``folder`` (links
    resolved too); the last component is kept as it is, so a link there is replaced by the
    write, not followed. Raises ``OutsideError`` naming both.
    """
    path, folder = Path(path), Path(folder)
    if path.name in ("", ".", ".."):
        raise OutsideError(f"{path} is not a file name inside {folder}")
    try:
        base = folder.resolve()
        parent = path.parent.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop: RuntimeError before Python 3.13
        raise OutsideError(f"{path} cannot be resolved inside {folder}: {exc}") from None
    if parent != base and base not in parent.parents:
        raise OutsideError(f"{path} would be written outside {folder}")
    return parent / path.name


def resolved(path: Path) -> Path:
    """``path`` with its links resolved, so that two paths to one file or folder are one; the
    absolute path where it cannot be resolved (too long a path, a link loop)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a link loop, before Python 3.13
        return Path(path).absolute()


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd``, unbuffered: a failed write leaves nothing queued
    to fail again at close."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def temporary_name(name: str, folder: Path | None = None) -> str:
    """A hidden temporary name for a file that will be renamed to ``name``, never longer than
    the folder's name limit: ``name`` is shortened (by bytes) when the whole would not fit."""
    limit = NAME_MAX
    if folder is not None:
        try:
            limit = os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            pass
    tail = f".{secrets.token_hex(4)}.tmp".encode()
    room = limit - len(tail) - 1
    return os.fsdecode(b"." + os.fsencode(name)[:room] + tail)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` so that a reader, or a run killed at any
    moment, sees either the old file or the whole new one: a temporary file in the same
    folder, flushed to disk, then renamed over ``path``. A link at ``path`` is replaced, never
    written through; the new file gets the mode any new file would (the umask's)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / temporary_name(path.name, path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o666)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_regular(path: Path, limit: int = 1 << 20) -> bytes | None:
    """The bytes of the regular file at ``path``, None when nothing is there. A link, a FIFO, a
    device or a folder there raises ``OSError`` without being opened for reading through or
    waited on; so does a file over ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link, which vacap does not read or write through") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"it is larger than {limit} bytes")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)

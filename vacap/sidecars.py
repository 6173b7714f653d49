"""Caption files beside images (or in a mirror of the input tree), written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SUFFIXES = ("txt", "caption")


def sidecar_path(image: Path, suffix: str, root: Path | None = None, mirror: Path | None = None) -> Path:
    """Where the caption of ``image`` goes: ``<stem>.<suffix>`` beside it, or, with ``mirror``,
    at the same place relative to ``root`` (the input folder the image was found under) inside
    ``mirror``. An image outside ``root`` lands at the top of ``mirror``."""
    name = f"{image.stem}.{suffix}"
    if mirror is None:
        return image.with_name(name)
    try:
        relative = image.parent.relative_to(root) if root is not None else Path()
    except ValueError:
        relative = Path()
    return mirror / relative / name


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` so that a reader, or a run killed at any moment, sees
    either the old file or the whole new one: a temporary file in the same folder, flushed to
    disk, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private; a caption file should get the mode any new file would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

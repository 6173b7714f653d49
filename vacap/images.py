"""Finding images on disk and loading them into plain RGB, whatever the file holds.

Every problem with one file becomes an ``ImageError`` carrying a readable reason, so the caller
can write an error record for that file and carry on with the rest of the folder.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
import re
import stat
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from vacap.files import resolved

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Modes whose pixel values are not 0-255 and need rescaling before they can become RGB.
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = (255, 255, 255)
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}
# The processors scale an image's short side up to the model's input size, so a thin picture
# grows with its aspect ratio (a 20000x1 PNG of 140 bytes became 2 GB for the 96-pixel demo
# model, 27 GB at LLaVA-1.5's 336). Beyond this ratio the picture is padded instead, after its
# long side is brought down to _THIN_MAX_SIDE, which keeps the padded canvas small too.
MAX_ASPECT_RATIO = 10
_THIN_MAX_SIDE = 4096
# The largest file read as an image. Pillow refuses pictures over twice Image.MAX_IMAGE_PIXELS
# (179 million pixels), which even stored uncompressed at 8 bytes a pixel (16-bit RGBA) take
# 1.4 GB; a larger file cannot be an image vacap would use, and reading it whole could take all
# memory (a 4 GB file took 4.6 GB).
MAX_FILE_BYTES = 2 << 30


class ImageError(Exception):
    """A file that cannot be used as an image; the message is the reason, for humans."""


@dataclass(frozen=True)
class LoadedImage:
    # What the model sees: RGB, EXIF orientation applied, thin pictures padded. None once the
    # image is prepared for the model (vacap.captioner.PreparedImage), whose inputs hold it.
    image: Image.Image | None
    width: int
    height: int
    sha256: str  # of the file bytes, so a record identifies exactly what was captioned


# --- discovery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """What discovery found: the files to caption, and the paths it could not search."""

    files: list[Path]
    problems: list[tuple[Path, str]]  # (path, reason): folders that could not be listed
    # The input root of each file (same order as files): the folder argument it was found
    # under; for a file named directly, the current folder when it lies under it, else its own.
    roots: list[Path] = field(default_factory=list)
    found: int | None = None  # after select: how many files discovery found before the filters

    def relative(self, index: int) -> str:
        """The path of file ``index`` inside its input root, with / separators."""
        return self.files[index].relative_to(self.roots[index]).as_posix()


def discover(paths: Sequence[str | Path], recursive: bool = True, listed: Sequence[str | Path] = ()) -> Listing:
    """Files to caption, in a stable order, and the folders that could not be searched.

    Files named explicitly are kept whatever their extension (the user asked for them; if they
    are not images they become error records). Folders contribute every entry with an image
    extension that is not itself a folder, skipping dot-names: a FIFO, a socket or a broken link
    named like an image is kept, so that loading it gives an error record instead of silence.
    Each argument's files are sorted, arguments keep their order, and a file reached twice (same
    resolved path) is kept the first time only. A named path that does not exist raises
    ``FileNotFoundError``; one that exists but cannot be looked at (a symbolic link loop, a
    folder above it that cannot be searched) is kept, to become an error record. ``listed``
    paths (from a list file, after ``paths``) are searched the same way, except that one that
    does not exist is kept too.
    """
    found: list[Path] = []
    roots: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    arguments = [(Path(arg), False) for arg in paths] + [(Path(arg), True) for arg in listed]
    for arg, missing_ok in arguments:
        for path, root in _expand(arg, recursive, problems, missing_ok):
            key = resolved(path)
            if key not in seen:
                seen.add(key)
                found.append(path)
                roots.append(root)
    return Listing(found, problems, roots)


def _expand(
    path: Path, recursive: bool, problems: list[tuple[Path, str]], missing_ok: bool = False
) -> list[tuple[Path, Path]]:
    """-> (file, its input root) for each file ``path`` stands for."""
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        if missing_ok or os.path.lexists(path):  # a broken link: loading names the problem
            return [(path, _file_root(path))]
        raise FileNotFoundError(f"no such file or directory: {path}") from None
    except OSError:
        # It is there but cannot be looked at (a link loop, too long a name, no permission on
        # a folder above it): loading it gives an error record with the system's own reason.
        return [(path, _file_root(path))]
    if not is_dir:
        return [(path, _file_root(path))]
    files = (path / rel for rel in _image_files_under(path, recursive, problems))
    return [(file, path) for file in sorted(files, key=lambda p: p.as_posix())]


def _file_root(path: Path) -> Path:
    """The input root of a file named directly: the current folder when the file lies under it
    (so a listed ``a/b.jpg`` keeps ``a/b.jpg`` as its path inside the root), else its folder."""
    if not path.is_absolute():
        return Path() if ".." not in path.parts else path.parent
    cwd = Path.cwd()
    return cwd if path.is_relative_to(cwd) else path.parent


def _image_files_under(root: Path, recursive: bool, problems: list[tuple[Path, str]]) -> Iterator[str]:
    """Relative paths of the image-named entries under root, hidden names skipped."""

    def unlisted(error: OSError) -> None:
        problems.append((Path(error.filename or root), f"cannot list folder: {error.strerror or error}"))

    # os.walk does not follow symlinked folders, so a link loop cannot hang discovery.
    for folder, dirs, files in os.walk(root, onerror=unlisted):
        if recursive:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        else:
            dirs.clear()
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield name if rel_folder == "." else os.path.join(rel_folder, name)


# --- choosing from the listing -----------------------------------------------------------------


def read_path_list(data: bytes) -> list[str]:
    """The paths of a ``--files-from`` list: one per line, blank lines and lines starting with
    ``#`` (after spaces) skipped, ``\r\n`` line ends accepted. Lines are file-system bytes, so
    any name (not valid UTF-8 included) comes back as the path it names."""
    paths = []
    for line in data.split(b"\n"):
        line = line.removesuffix(b"\r")
        if line.strip() and not line.lstrip().startswith(b"#"):
            paths.append(os.fsdecode(line))
    return paths


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), with 0 <= I < N; ValueError saying what is allowed."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    index, count = (int(match[1]), int(match[2])) if match else (None, None)
    if index is None or count < 1 or index >= count:
        raise ValueError(f"--shard must be I/N with 0 <= I < N, such as 0/4 (shards count from 0), got {text!r}")
    return index, count


def shard_of(relative: str, count: int) -> int:
    """The shard, of ``count``, that a path inside its input root belongs to: from its sha1,
    so every machine and Python process puts a path in the same shard (``hash()`` is salted)."""
    digest = hashlib.sha1(os.fsencode(relative), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") % count


def glob_matches(pattern: str, relative: str) -> bool:
    """Whether a glob pattern matches a path inside its input root (/ separators).

    ``*`` and ``?`` stay within one name, ``**`` crosses folders. A pattern without ``/``
    matches any one name on the path (the file's or a folder's: ``*.png``, ``raw``); one with a
    ``/`` matches from the root, the whole path or a folder on it (``raw/**``, ``raw/``,
    ``a/*.jpg``). A matched folder takes everything under it.
    """
    names = relative.split("/")
    if "/" not in pattern:
        regex = _glob_regex(pattern)
        return any(regex.fullmatch(name) for name in names)
    regex = _glob_regex(pattern.strip("/"))
    return any(regex.fullmatch("/".join(names[:end])) for end in range(1, len(names) + 1))


def _glob_regex(pattern: str) -> re.Pattern:
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] in "*?":
            parts.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and (close := pattern.find("]", i + 2)) > 0:
            members = pattern[i + 1 : close]
            negate = members.startswith("!")
            members = re.sub(r"([\\^\[])", r"\\\1", members[1:] if negate else members)
            parts.append(f"[{'^/' if negate else ''}{members}]")
            i = close + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts), re.DOTALL)


def select(
    listing: Listing,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    shard: tuple[int, int] | None = None,
    limit: int | None = None,
) -> Listing:
    """The part of ``listing`` a run takes, in its order: the files matching some ``include``
    pattern (when any is given) and no ``exclude`` pattern, then those of shard (I, N), then
    the first ``limit`` of those. Folders that could not be listed go to the shard their path
    hashes to, so that each is reported by one shard only."""
    chosen = []
    for index in range(len(listing.files)):
        relative = listing.relative(index)
        if include and not any(glob_matches(p, relative) for p in include):
            continue
        if any(glob_matches(p, relative) for p in exclude):
            continue
        if shard is not None and shard_of(relative, shard[1]) != shard[0]:
            continue
        chosen.append(index)
    chosen = chosen[:limit] if limit is not None else chosen
    problems = listing.problems
    if shard is not None:
        problems = [(path, why) for path, why in problems if shard_of(path.as_posix(), shard[1]) == shard[0]]
    files, roots = [listing.files[i] for i in chosen], [listing.roots[i] for i in chosen]
    return Listing(files, problems, roots, found=len(listing.files))



def choose(
    paths: Sequence[str | Path],
    *,
    recursive: bool = True,
    files_from: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    shard: str | None = None,
    limit: int | None = None,
) -> Listing:
    """The images a run takes: ``paths`` and the paths listed in the file ``files_from`` (``-``:
    stdin), filtered, sharded (``"I/N"``) and limited, as ``select`` does. A bad value, a list
    that cannot be read or a path that does not exist raises ValueError saying which."""
    chosen_shard = parse_shard(shard) if shard is not None else None
    listed: list[str] = []
    if files_from is not None:
        try:
            data = sys.stdin.buffer.read() if files_from == "-" else Path(files_from).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read --files-from {files_from}: {exc.strerror or exc}") from None
        listed = read_path_list(data)
    elif not paths:
        raise ValueError("give image files or folders, or --files-from FILE")
    try:
        listing = discover(paths, recursive=recursive, listed=listed)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    return select(listing, include=include, exclude=exclude, shard=chosen_shard, limit=limit)


def nothing_chosen(listing: Listing, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> str:
    """What a run that found nothing to caption says: how many images the filters left out, and
    how their patterns are matched, the usual cause when a filter keeps nothing."""
    if not listing.found:
        return "no images to caption"
    patterns = " and ".join(flag for flag, given in (("--include", include), ("--exclude", exclude)) if given)
    how = (
        f"; {patterns} patterns are matched against each image's path inside the folder it was found "
        "under (for dataset/cats/a.png found under dataset: cats/a.png, so cats/*.png or *.png)"
        if patterns
        else ""
    )
    return f"no images to caption: the {listing.found} images found were all left out by the filters{how}"


# --- loading ---------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """sha256 of a regular file's bytes; ``ImageError`` for anything else."""
    digest = hashlib.sha256()
    with _open_regular(Path(path)) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_image(path: Path) -> LoadedImage:
    """Decode one file into RGB; any problem with the file raises ``ImageError``.

    ``width`` and ``height`` are the picture's own; ``image`` is what the model is given, padded
    when the picture is extremely thin (see :func:`bound_aspect`).
    """
    with _open_regular(Path(path)) as f:
        _check_size(os.fstat(f.fileno()).st_size)
        # Read once: the hash and the decoded pixels then come from the very same bytes. One
        # byte past the limit tells a file that grew since its size was looked at.
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise ImageError(f"cannot read file: {e.strerror or e}") from None
    _check_size(len(data))
    if not data:
        raise ImageError("empty file")
    image = _decode(data)
    return LoadedImage(
        image=bound_aspect(image),
        width=image.width,
        height=image.height,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _check_size(size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise ImageError(
            f"file too large to be an image: {size} bytes, more than the {MAX_FILE_BYTES} bytes "
            f"({MAX_FILE_BYTES >> 30} GiB) vacap reads"
        )


def read_image(path: str) -> LoadedImage | str:
    """``load_image``, or the reason it failed, as the file's ``error`` record gives it. A local
    run reads on the Captioner's background thread, a Ray run in Ray tasks; both through here."""
    try:
        return load_image(Path(path))
    except ImageError as exc:
        return str(exc)


def _open_regular(path: Path) -> io.BufferedReader:
    """Open a regular file for reading, refusing FIFOs, sockets and devices without blocking."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever. It changes
        # nothing for a regular file, and the check below refuses everything else.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError("broken symbolic link" if os.path.islink(path) else "file not found") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError("symbolic link loop (too many levels of symbolic links)") from None
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise ImageError("is a directory, not an image file")
        raise ImageError(f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'special file')})")
    os.set_blocking(fd, True)
    try:
        return open(fd, "rb")
    except OSError as e:
        os.close(fd)
        raise ImageError(f"cannot read file: {e.strerror or e}") from None


def _decode(data: bytes) -> Image.Image:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a file that big is refused
    # just the same, rather than eating all memory on the way to the model.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                # A freshly opened file stands on its first frame, so animations and
                # multi-page files give that frame. Decoding now makes a truncated file fail
                # here rather than later, inside the model code.
                opened.load()
                return _to_rgb(ImageOps.exif_transpose(opened))
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError("not an image file (cannot identify format)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"image too large (decompression bomb check): {e}") from None
        except MemoryError:
            raise ImageError("image too large to decode (out of memory)") from None
        except Exception as e:  # plugins raise OSError, SyntaxError, ValueError, struct.error...
            raise ImageError(_decode_failure(e)) from None


def _decode_failure(error: Exception) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, EOFError) or "truncated" in text.lower():
        return f"truncated image ({text})"
    return f"cannot decode image: {text}"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_MODES:
        return _stretch_to_gray(image).convert("RGB")
    if image.mode == "La":  # premultiplied; Pillow converts it to nothing but LA
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Models have no notion of alpha; white is what viewers usually show behind it.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def bound_aspect(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """A picture thinner than ``max_ratio``:1 centred on white, padded along its short side to
    that ratio (and first scaled down to a long side of ``_THIN_MAX_SIDE`` if longer); any
    other picture unchanged."""
    long, short = max(image.size), min(image.size)
    if long <= max_ratio * short:
        return image
    if long > _THIN_MAX_SIDE:
        scale = _THIN_MAX_SIDE / long
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BOX)
        long = max(image.size)
    side = math.ceil(long / max_ratio)
    size = (image.width, side) if image.width >= image.height else (side, image.height)
    canvas = Image.new("RGB", size, _WHITE)
    canvas.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
    return canvas


def _stretch_to_gray(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float images mapped onto 0-255 by their real value range.

    Pillow's own conversion clips at 255, which turns most 16-bit scans plain white.
    """
    values = image.convert("F")
    low, high = values.getextrema()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ImageError("float image with non-finite pixel values")
    if high == low:  # no contrast to keep: a flat image stays flat
        return Image.new("L", image.size, 0)
    scale = 255.0 / (high - low)
    offset = 0.5 - low * scale  # the +0.5 makes the truncating conversion to L round
    return values.point(lambda v: v * scale + offset).convert("L")

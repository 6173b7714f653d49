"""Finding images on disk and loading them into plain RGB, whatever the file holds.

Every problem with one file becomes an ``ImageError`` carrying a readable reason, so the caller
can write an error record for that file and carry on with the rest of the folder.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Modes whose pixel values are not 0-255 and need rescaling before they can become RGB.
_WIDE_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = (255, 255, 255)


class ImageError(Exception):
    """A file that cannot be used as an image; the message is the reason, for humans."""


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # always mode RGB, EXIF orientation already applied
    width: int
    height: int
    sha256: str  # of the file bytes, so a record identifies exactly what was captioned


# --- discovery -------------------------------------------------------------------------------


def discover(paths: Sequence[str | Path], recursive: bool = True) -> list[Path]:
    """Files to caption, in a stable order.

    Files named explicitly are kept whatever their extension (the user asked for them; if they
    are not images they become error records). Folders contribute only image files, skipping
    dot-names. Each argument's files are sorted, arguments keep their order, and a file reached
    twice (same resolved path) is kept the first time only.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for arg in paths:
        for path in _expand(Path(arg), recursive):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(path)
    return found


def _expand(path: Path, recursive: bool) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if not path.is_dir():
        return [path]
    files = (path / rel for rel in _image_files_under(path, recursive))
    return sorted(files, key=lambda p: p.as_posix())


def _image_files_under(root: Path, recursive: bool) -> Iterator[str]:
    """Relative paths of the image files under root, hidden names skipped."""
    # os.walk does not follow symlinked folders, so a link loop cannot hang discovery.
    for folder, dirs, files in os.walk(root):
        if recursive:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        else:
            dirs.clear()
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            # Skips broken symlinks, fifos and sockets that merely have an image name.
            if os.path.isfile(os.path.join(folder, name)):
                yield name if rel_folder == "." else os.path.join(rel_folder, name)


# --- loading ---------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_image(path: Path) -> LoadedImage:
    """Decode one file into RGB; any problem with the file raises ``ImageError``."""
    data = _read_bytes(Path(path))
    image = _decode(data)
    return LoadedImage(
        image=image,
        width=image.width,
        height=image.height,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _read_bytes(path: Path) -> bytes:
    # Read once: the hash and the decoded pixels then come from the very same bytes.
    if path.is_dir():
        raise ImageError("is a directory, not an image file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None
    if not data:
        raise ImageError("empty file")
    return data


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

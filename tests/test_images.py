import hashlib
import os
from pathlib import Path

import pytest
from helpers import deep_folder
from PIL import Image, ImageChops

from vacap.images import (
    IMAGE_EXTENSIONS,
    MAX_ASPECT_RATIO,
    MAX_FILE_BYTES,
    ImageError,
    Listing,
    discover,
    file_sha256,
    load_image,
    read_image,
)

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "photos"
    for rel in [
        "z.jpg",
        "b.JPG",
        "a.png",
        "notes.txt",
        ".hidden.jpg",
        ".cache/thumb.jpg",
        "sub/c.jpeg",
        "sub/deeper/e.WebP",
        "sub/readme.md",
    ]:
        touch(root / rel)
    return root


def rel(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


# --- discovery -------------------------------------------------------------------------------


def test_discover_recursive_sorted_case_insensitive_and_hidden_skipped(tree):
    found = discover([tree]).files
    # Sorted by the whole path string: "sub/..." sorts before "z.jpg".
    assert rel(found, tree) == ["a.png", "b.JPG", "sub/c.jpeg", "sub/deeper/e.WebP", "z.jpg"]


def test_discover_not_recursive(tree):
    assert rel(discover([tree], recursive=False).files, tree) == ["a.png", "b.JPG", "z.jpg"]


def test_discover_keeps_explicit_files_whatever_their_name(tree):
    found = discover([tree / "notes.txt", tree / ".hidden.jpg"]).files
    assert found == [tree / "notes.txt", tree / ".hidden.jpg"]


def test_discover_keeps_argument_order_and_drops_duplicates(tree):
    found = discover([tree / "z.jpg", tree / "sub", tree, tree / "sub" / ".." / "a.png"]).files
    assert rel(found, tree) == ["z.jpg", "sub/c.jpeg", "sub/deeper/e.WebP", "a.png", "b.JPG"]


def test_discover_keeps_paths_relative_as_given(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    found = discover(["photos"], recursive=False).files
    assert found == [Path("photos/a.png"), Path("photos/b.JPG"), Path("photos/z.jpg")]
    assert not any(p.is_absolute() for p in found)


def test_discover_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        discover([missing])


def test_discover_empty_folder(tmp_path):
    assert discover([tmp_path]) == Listing([], [])


def test_folders_too_deep_to_list_are_reported_not_dropped(tmp_path):
    touch(tmp_path / "a.png")
    deep = deep_folder(tmp_path)
    listing = discover([tmp_path])
    assert listing.files == [tmp_path / "a.png"]
    [(folder, reason)] = listing.problems
    assert len(str(folder)) > 4096 and str(deep).startswith(str(folder))
    assert reason == "cannot list folder: File name too long"


def test_a_named_path_too_long_is_kept_and_fails_to_load_with_the_reason(tmp_path):
    deep = deep_folder(tmp_path)
    assert discover([deep]).files == [deep]
    with pytest.raises(ImageError, match="cannot read file: File name too long"):
        load_image(deep)


def test_special_files_named_like_images_are_kept_for_an_error_record(tmp_path):
    touch(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    assert rel(discover([tmp_path]).files, tmp_path) == ["a.png", "dangling.jpg", "pipe.png"]
    assert discover([tmp_path / "dangling.jpg"]).files == [tmp_path / "dangling.jpg"]
    with pytest.raises(ImageError, match="broken symbolic link"):
        load_image(tmp_path / "dangling.jpg")


def test_symbolic_link_loops_are_kept_and_fail_to_load_with_the_reason(tmp_path):
    touch(tmp_path / "good.png")
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    (tmp_path / "self.png").symlink_to("self.png")
    listing = discover([tmp_path, tmp_path / "self.png", tmp_path / "a.png" / "inside.png"])
    names = ["a.png", "b.png", "good.png", "self.png", "a.png/inside.png"]
    assert rel(listing.files, tmp_path) == names and listing.problems == []
    for name in ("a.png", "self.png", "a.png/inside.png"):
        with pytest.raises(ImageError, match=r"^symbolic link loop"):
            load_image(tmp_path / name)


def test_a_path_through_a_file_is_missing(tmp_path):
    # Not there at all (ENOTDIR, as ENOENT): a typo the user hears about before any work.
    touch(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="a.png/b.png"):
        discover([tmp_path / "a.png" / "b.png"])
    assert discover([], listed=[tmp_path / "a.png" / "b.png"]).files == [tmp_path / "a.png" / "b.png"]


def test_image_extensions_are_lowercase_with_dot():
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert {".jpg", ".png", ".webp"} <= IMAGE_EXTENSIONS


# --- loading ---------------------------------------------------------------------------------


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high with a red block at the stored top-left corner.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)

    loaded = load_image(path)

    assert (loaded.width, loaded.height) == (20, 40)
    assert loaded.image.size == (20, 40)
    # Turning clockwise carries the top-left corner to the top-right.
    red, _, blue = loaded.image.getpixel((15, 4))
    assert red > 200 and blue < 60
    red, _, blue = loaded.image.getpixel((4, 4))
    assert red < 60 and blue > 200


def test_rgba_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 255))
    loaded = load_image(save(image, tmp_path / "alpha.png"))
    assert loaded.image.mode == "RGB"
    assert loaded.image.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.image.getpixel((1, 0)) == (255, 0, 0)


def test_half_transparent_pixel_is_blended_with_white(tmp_path):
    loaded = load_image(save(Image.new("RGBA", (1, 1), (0, 0, 0, 128)), tmp_path / "half.png"))
    value = loaded.image.getpixel((0, 0))
    assert all(120 <= channel <= 135 for channel in value)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 200, 0, 0, 0, 200])  # index 0 green, index 1 blue
    image.putpixel((1, 0), 1)
    path = save(image, tmp_path / "palette.png", transparency=0)
    assert Image.open(path).mode == "P"

    loaded = load_image(path)
    assert loaded.image.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.image.getpixel((1, 0)) == (0, 0, 200)


def test_gray_with_alpha(tmp_path):
    image = Image.new("LA", (2, 1), (50, 0))
    image.putpixel((1, 0), (50, 255))
    loaded = load_image(save(image, tmp_path / "la.png"))
    assert loaded.image.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.image.getpixel((1, 0)) == (50, 50, 50)


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (2, 1), (255, 0, 0, 0))  # cyan
    image.putpixel((1, 0), (0, 0, 0, 255))  # black
    loaded = load_image(save(image, tmp_path / "cmyk.tif"))
    assert loaded.image.getpixel((0, 0)) == (0, 255, 255)
    assert loaded.image.getpixel((1, 0)) == (0, 0, 0)


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    red, green, blue = load_image(path).image.getpixel((8, 8))
    assert red > 200 and green < 60 and blue < 60


def test_16_bit_gray_keeps_its_contrast(tmp_path):
    image = Image.new("I;16", (2, 1))
    image.putpixel((0, 0), 1000)
    image.putpixel((1, 0), 3000)
    path = save(image, tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I;16")

    loaded = load_image(path)
    dark, bright = loaded.image.getpixel((0, 0)), loaded.image.getpixel((1, 0))
    # Plain clipping would make both (255, 255, 255).
    assert dark == (0, 0, 0)
    assert bright == (255, 255, 255)


def test_32_bit_integer_gray(tmp_path):
    image = Image.new("I", (3, 1))
    for x, value in enumerate((-5000, 0, 5000)):
        image.putpixel((x, 0), value)
    loaded = load_image(save(image, tmp_path / "int.tif"))
    assert [loaded.image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_image_is_scaled_by_its_range(tmp_path):
    image = Image.new("F", (3, 1))
    for x, value in enumerate((-1.0, 0.5, 2.0)):
        image.putpixel((x, 0), value)
    path = save(image, tmp_path / "float.tif")
    assert Image.open(path).mode == "F"

    pixels = [load_image(path).image.getpixel((x, 0)) for x in range(3)]
    assert pixels == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_flat_16_bit_image_does_not_crash(tmp_path):
    loaded = load_image(save(Image.new("I;16", (4, 4), 700), tmp_path / "flat.png"))
    assert loaded.image.mode == "RGB"
    assert loaded.image.getpixel((0, 0)) == (0, 0, 0)


FRAME_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.mark.parametrize("name", ["anim.gif", "anim.webp", "pages.tif"])
def test_first_frame_of_multi_frame_files(tmp_path, name):
    frames = [Image.new("RGB", (16, 16), colour) for colour in FRAME_COLOURS]
    path = tmp_path / name
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert Image.open(path).n_frames == 3

    loaded = load_image(path)
    assert loaded.image.getpixel((8, 8)) == FRAME_COLOURS[0]


def test_gif_with_transparent_background(tmp_path):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.putpixel((1, 0), 1)
    loaded = load_image(save(image, tmp_path / "t.gif", transparency=0))
    assert loaded.image.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.image.getpixel((1, 0)) == (255, 0, 0)


def test_truncated_jpeg(tmp_path):
    full = save(Image.effect_noise((64, 64), 60).convert("RGB"), tmp_path / "full.jpg")
    data = full.read_bytes()
    cut = touch(tmp_path / "cut.jpg", data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(cut)


def test_truncated_png(tmp_path):
    full = save(Image.effect_noise((64, 64), 60), tmp_path / "full.png")
    data = full.read_bytes()
    with pytest.raises(ImageError, match="truncated"):
        load_image(touch(tmp_path / "cut.png", data[: len(data) // 2]))


def test_empty_file(tmp_path):
    with pytest.raises(ImageError, match="empty file"):
        load_image(touch(tmp_path / "empty.jpg", b""))


def test_text_file_named_jpg(tmp_path):
    with pytest.raises(ImageError, match=r"not an image file \(cannot identify format\)"):
        load_image(touch(tmp_path / "fake.jpg", b"hello, I am text\n"))


def test_directory(tmp_path):
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(ImageError, match="directory"):
        load_image(folder)


def test_fifo_is_refused_at_once_instead_of_blocking(tmp_path):
    # Opening a FIFO that no process writes to blocks forever unless the loader refuses it.
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageError, match=r"not a regular file \(a FIFO\)"):
        load_image(tmp_path / "pipe.jpg")
    with pytest.raises(ImageError, match="not a regular file"):
        file_sha256(tmp_path / "pipe.jpg")


def test_character_device_is_refused():
    with pytest.raises(ImageError, match=r"not a regular file \(a character device\)"):
        load_image(Path("/dev/zero"))


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "gone.png")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path):
    path = save(Image.new("RGB", (4, 4)), tmp_path / "locked.png")
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("side", [40, 60])  # just over the limit (a warning in Pillow) and far over
def test_decompression_bomb(tmp_path, monkeypatch, side):
    path = save(Image.new("RGB", (side, side)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large"):
        load_image(path)


def test_a_file_larger_than_any_image_is_refused_without_reading_it(tmp_path):
    # Sparse: 40 GB on paper, nothing on disk. Read whole, it raised MemoryError.
    huge = tmp_path / ".png"
    with open(huge, "wb") as f:
        f.truncate(40 << 30)
    reason = read_image(str(huge))
    assert reason == (
        f"file too large to be an image: {40 << 30} bytes, more than the {MAX_FILE_BYTES} bytes "
        f"({MAX_FILE_BYTES >> 30} GiB) vacap reads"
    )
    assert MAX_FILE_BYTES > 2 * Image.MAX_IMAGE_PIXELS * 8, "a 16-bit RGBA picture Pillow decodes fits"


def test_sha256_is_of_the_file_bytes(tmp_path):
    path = save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "x.png")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_image(path).sha256 == expected
    assert file_sha256(path) == expected


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (700, 30)])
def test_thin_pictures_are_padded_so_the_model_input_stays_bounded(tmp_path, size):
    path = save(Image.new("RGB", size, (200, 0, 0)), tmp_path / "thin.png")
    loaded = load_image(path)
    assert (loaded.width, loaded.height) == size  # the record keeps the picture's own size
    long, short = max(loaded.image.size), min(loaded.image.size)
    assert long <= 4096 and long <= MAX_ASPECT_RATIO * short
    # The picture sits in the middle of a white canvas.
    white = Image.new("RGB", loaded.image.size, (255, 255, 255))
    left, top, right, bottom = ImageChops.difference(loaded.image, white).getbbox()
    assert abs((left + right) - loaded.image.width) <= 1 and abs((top + bottom) - loaded.image.height) <= 1
    assert loaded.image.getpixel((left, top)) == (200, 0, 0)


def test_pictures_within_the_aspect_limit_are_untouched(tmp_path):
    path = save(Image.new("RGB", (300, 30), (1, 2, 3)), tmp_path / "wide.png")
    assert load_image(path).image.size == (300, 30)


def test_loaded_image_is_independent_of_the_file(tmp_path):
    path = save(Image.new("RGB", (8, 8), (9, 8, 7)), tmp_path / "x.png")
    loaded = load_image(path)
    path.unlink()
    assert loaded.image.getpixel((0, 0)) == (9, 8, 7)


# --- committed samples -----------------------------------------------------------------------


def test_sample_images_load_and_vary():
    paths = discover([SAMPLES]).files
    # Six drawn pictures of varied formats and shapes, and four shapes-world test scenes.
    assert len(paths) == 10 and sum(p.name.startswith("scene_") for p in paths) == 4
    loaded = [load_image(p) for p in paths]
    assert all(item.image.mode == "RGB" for item in loaded)
    assert all(64 <= side <= 160 for item in loaded for side in (item.width, item.height))
    assert all(p.stat().st_size < 16_000 for p in paths)
    ratios = {(i.width > i.height) - (i.width < i.height) for i in loaded}
    assert ratios == {-1, 0, 1}  # tall, square and wide
    assert {p.suffix for p in paths} == {".jpg", ".png", ".webp"}

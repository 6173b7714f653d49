"""Draw the small demo images in sample_images/ (no downloads; seeded, so reruns match).

Different formats and aspect ratios on purpose: anyres models split wide, tall and square
images into different numbers of tiles, so the samples exercise different token counts.
Four scenes of the shapes world's test split (``vacap.demo.shapes``) join them: the pictures
the shipped demo model (``--model demo``) was made for.

    python scripts/make_sample_images.py [OUTPUT_DIR]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 20240601
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "sample_images"


def landscape(rng: random.Random) -> Image.Image:
    """Wide: sky fading to the horizon, a sun, green hills and a lake."""
    width, height = 160, 90
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon = 55
    for y in range(horizon):
        t = y / horizon
        draw.line([(0, y), (width, y)], fill=(int(90 + 120 * t), int(150 + 80 * t), 235))
    draw.ellipse([118, 10, 140, 32], fill=(255, 214, 60))
    draw.rectangle([0, horizon, width, height], fill=(70, 140, 60))
    for _ in range(3):
        x = rng.randint(0, width)
        draw.ellipse([x - 45, horizon - 14, x + 45, horizon + 20], fill=(55, 120, 50))
    draw.ellipse([20, 68, 90, 86], fill=(60, 110, 200))
    return image


def shapes(rng: random.Random) -> Image.Image:
    """Square: a red circle, a blue square and a yellow triangle on light grey."""
    image = Image.new("RGB", (128, 128), (225, 225, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse([12, 14, 58, 60], fill=(210, 40, 40))
    draw.rectangle([70, 20, 112, 62], fill=(40, 80, 200))
    draw.polygon([(40, 116), (64, 72), (88, 116)], fill=(240, 200, 30))
    return image


def stripes(rng: random.Random) -> Image.Image:
    """Tall: horizontal bands in a shuffled palette."""
    palette = [
        (230, 57, 70), (241, 250, 238), (168, 218, 220), (69, 123, 157), (29, 53, 87), (244, 162, 97)
    ]
    rng.shuffle(palette)
    image = Image.new("RGB", (72, 144))
    draw = ImageDraw.Draw(image)
    band = 144 // 12
    for i in range(12):
        draw.rectangle([0, i * band, 72, (i + 1) * band - 1], fill=palette[i % len(palette)])
    return image


def house(rng: random.Random) -> Image.Image:
    """Wide-ish: a house with a red roof, a door and a window, and a tree beside it."""
    image = Image.new("RGB", (120, 96), (150, 200, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 76, 120, 96], fill=(90, 160, 70))
    draw.rectangle([20, 44, 70, 80], fill=(235, 220, 180))
    draw.polygon([(14, 46), (45, 20), (76, 46)], fill=(180, 40, 35))
    draw.rectangle([40, 60, 52, 80], fill=(110, 70, 40))
    draw.rectangle([26, 52, 36, 62], fill=(120, 180, 230))
    draw.rectangle([92, 56, 98, 80], fill=(100, 65, 35))
    draw.ellipse([80, 30, 110, 62], fill=(40, 120, 45))
    return image


def dots(rng: random.Random) -> Image.Image:
    """Square: scattered coloured dots on a dark background."""
    image = Image.new("RGB", (96, 96), (25, 25, 35))
    draw = ImageDraw.Draw(image)
    for _ in range(18):
        x, y, r = rng.randint(6, 90), rng.randint(6, 90), rng.randint(3, 9)
        colour = (rng.randint(80, 255), rng.randint(80, 255), rng.randint(80, 255))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return image


def tower(rng: random.Random) -> Image.Image:
    """Tall: a lighthouse at dusk with a beam of light over the sea."""
    image = Image.new("RGB", (64, 140), (250, 170, 110))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 110, 64, 140], fill=(40, 70, 120))
    draw.polygon([(24, 110), (28, 40), (36, 40), (40, 110)], fill=(245, 245, 240))
    for y in (55, 75, 95):
        draw.rectangle([25, y, 39, y + 8], fill=(200, 30, 30))
    draw.rectangle([26, 32, 38, 40], fill=(255, 240, 120))
    draw.polygon([(38, 34), (64, 24), (64, 44)], fill=(255, 225, 150))
    return image


# name -> (drawing, save options); the format follows the extension.
SAMPLES = {
    "landscape_wide.jpg": (landscape, {"quality": 85}),
    "shapes_square.png": (shapes, {"optimize": True}),
    "stripes_tall.webp": (stripes, {"quality": 85}),
    "house.jpg": (house, {"quality": 85}),
    "dots_square.webp": (dots, {"quality": 85}),
    "lighthouse_tall.png": (tower, {"optimize": True}),
}


SCENE_SEED = 7


def main(output: Path) -> None:
    from vacap.demo.worlds import scenes

    output.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    for name, (draw, options) in SAMPLES.items():
        draw(rng).save(output / name, **options)
    for i, scene in enumerate(scenes(4, SCENE_SEED, "test"), start=1):
        scene.image.save(output / f"scene_{i}.png", optimize=True)
        print(f"scene_{i}.png: {scene.caption}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT)

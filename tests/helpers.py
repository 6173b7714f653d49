"""Shared pieces of the model tests: test images and Hugging Face references."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from PIL import Image

MAX_NEW = 12
PROMPT = "Describe the picture."
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


# Different sizes and aspect ratios: anyres models give them different image-token counts,
# so a batch of them is left padded.
IMAGES = [noise_image(40, 30, 1), noise_image(30, 44, 2), noise_image(32, 32, 3), noise_image(64, 60, 4)]


def hf_model(path, dtype: torch.dtype = torch.float32):
    """The checkpoint loaded by transformers alone: eager attention in the language model (what
    vacap's loop computes; it also gives output_attentions), and the vision tower's default
    attention, as vacap loads it (vacap runs the tower through transformers)."""
    config = transformers.AutoConfig.from_pretrained(path)
    attention = {"": "eager", "text_config": "eager", "vision_config": "sdpa"}
    model_class = getattr(transformers, config.architectures[0])
    return model_class.from_pretrained(path, attn_implementation=attention, dtype=dtype).eval()


def hf_greedy(path, inputs, max_new: int = MAX_NEW, dtype: torch.dtype = torch.float32) -> list[list[int]]:
    """Tokens of HF generate(do_sample=False, num_beams=1), cut after each row's EOS."""
    hf = hf_model(path, dtype)
    eos = hf.generation_config.eos_token_id
    out = hf.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new)
    rows = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        rows.append(row[:cut])
    return rows


def deep_folder(root: Path, levels: int = 22) -> Path:
    """A folder whose path is longer than PATH_MAX (4096), made level by level through dir fds,
    with an image inside it. Returns the image's (too long) path."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir("d" * 200, dir_fd=fd)
            inner = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        image = os.open("deep.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        os.write(image, (SAMPLES / "scene_1.png").read_bytes())
        os.close(image)
    finally:
        os.close(fd)
    return root.joinpath(*["d" * 200] * levels, "deep.png")

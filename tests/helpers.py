"""Shared pieces of the model tests: test images and Hugging Face references."""

from __future__ import annotations

import math
import os
import re
from decimal import Decimal
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

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


def hf_model(path, dtype: torch.dtype = torch.float32, attention: str = "eager"):
    """The checkpoint loaded by transformers alone. The language model's attention is eager by
    default (it gives output_attentions), or "sdpa", what transformers picks by default and a
    user runs; the vision tower keeps its default attention, as vacap loads it (vacap runs the
    tower through transformers)."""
    config = transformers.AutoConfig.from_pretrained(path)
    implementation = {"": attention, "text_config": attention, "vision_config": "sdpa"}
    model_class = getattr(transformers, config.architectures[0])
    return model_class.from_pretrained(path, attn_implementation=implementation, dtype=dtype).eval()


def hf_greedy(path, inputs, max_new: int = MAX_NEW, dtype: torch.dtype = torch.float32) -> list[list[int]]:
    """Tokens of HF generate(do_sample=False, num_beams=1) with its default (SDPA) attention,
    cut after each row's EOS."""
    hf = hf_model(path, dtype, attention="sdpa")
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


def positions(inputs) -> torch.Tensor:
    """Positions as vacap numbers a left-padded batch: from 0 at each row's first real token."""
    return (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)


def extended(inputs: dict, tokens: torch.Tensor) -> dict:
    """The prepared inputs with the tokens # (B, n) appended to every row, as real tokens."""
    ones = torch.ones(tokens.shape, dtype=inputs["attention_mask"].dtype)
    return {
        **inputs,
        "input_ids": torch.cat([inputs["input_ids"], tokens], 1),
        "attention_mask": torch.cat([inputs["attention_mask"], ones], 1),
    }


@torch.no_grad()
def hf_states(hf, inputs):
    """HF's own forward: ``hidden_states[l]`` is the input of decoder layer l, ``attentions[l]``
    its eager attention probabilities # (B, H, T, T)."""
    return hf(**inputs, position_ids=positions(inputs), output_attentions=True, output_hidden_states=True)


@torch.no_grad()
def hf_layer_qkv(hf, hidden: torch.Tensor, pos: torch.Tensor, layer: int):
    """Queries, keys and values of decoder layer ``layer`` from its input ``hidden`` # (B, T, hidden),
    through HF's modules and rotary function: q # (B, H, T, D), k and v # (B, Hkv, T, D)."""
    lm = hf.model.language_model
    block = lm.layers[layer]
    h = block.input_layernorm(hidden)
    B, T, _ = h.shape
    attn = block.self_attn
    D = attn.head_dim
    q, k, v = (proj(h).view(B, T, -1, D).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    cos, sin = lm.rotary_emb(h, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def hf_layer_logits(hf, hidden: torch.Tensor, pos: torch.Tensor, layer: int) -> torch.Tensor:
    """Raw attention logits s = q.k * scaling of every query and key # (B, H, T, T), no mask."""
    q, k, _ = hf_layer_qkv(hf, hidden, pos, layer)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    return (q @ k.transpose(2, 3)).float() * hf.model.language_model.layers[layer].self_attn.scaling


def image_mass(attentions: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """v of the contract: attention each query gave to image slots, averaged over heads # (B, T)."""
    return (attentions.float() * image[:, None, None, :]).sum(-1).mean(1)


def numpy_dpc_knn(points: np.ndarray, n_clusters: int, k: int) -> tuple[list[int], list[int]]:
    """The textbook algorithm, literally, with plain loops: rho = exp(.) and score = rho * dist,
    distances divided by sqrt(D) (TCFormer's DPC-KNN, contract revision 2).

    rho is a Decimal, whose exponent range holds exp(-1e4) that float64 would flush to 0."""
    N, D = points.shape
    if N <= n_clusters:
        return list(range(N)), list(range(N))
    d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)) / math.sqrt(D)
    k = max(1, min(k, N - 1))
    rho = []
    for i in range(N):
        nearest = sorted(float(d[i, j]) for j in range(N) if j != i)[:k]
        rho.append(Decimal(-sum(x * x for x in nearest) / k).exp())
    order = sorted(range(N), key=lambda i: (-rho[i], i))
    position = {i: r for r, i in enumerate(order)}
    dist = []
    for i in range(N):
        denser = [d[i, j] for j in range(N) if position[j] < position[i]]
        dist.append(min(denser) if denser else d.max())  # the densest: the largest distance of all
    score = [rho[i] * Decimal(float(dist[i])) for i in range(N)]
    centres = sorted(sorted(range(N), key=lambda i: (-score[i], i))[:n_clusters])
    assign = [
        centres.index(i) if i in centres else min(range(n_clusters), key=lambda c: (d[i, centres[c]], c))
        for i in range(N)
    ]
    return assign, centres


def summary_counts(stderr: str) -> str:
    """The counts of a run's end-of-run summary ("captioned 3 of 5 images ...; 1 already done;
    1 failed:") as "3 ok, 1 error, 1 skipped", the line read whole even where it wrapped."""
    text = " ".join(stderr.split())
    start = text.rindex("captioned ")
    line = text[start:]
    ok = int(re.match(r"captioned (\d+) of", line)[1])
    done = re.match(r"[^;]*(?:; (\d+) already done)?", line)[1]
    failed = re.match(r"[^;]*(?:; \d+ already done)?(?:; (\d+) failed)?", line)[1]
    return f"{ok} ok, {int(failed or 0)} error, {int(done or 0)} skipped"

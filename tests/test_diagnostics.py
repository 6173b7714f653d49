"""Attention diagnostics against HF eager attentions; `vacap show` and `vacap compare` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import hf_greedy, hf_model
from PIL import Image

from vacap import Captioner
from vacap.diagnostics import decode_grid
from vacap.images import load_image

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
IMAGE = SAMPLES / "house.jpg"
MAX_NEW = 6


def vacap(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "vacap.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


@pytest.mark.parametrize("arch", ["llava-llama", "llava-qwen2"])
def test_token_diagnostics_match_hf_eager_attentions(tiny_model, arch):
    path = tiny_model(arch)
    captioner = Captioner(str(path), dtype="fp32", method="greedy", max_new_tokens=MAX_NEW, diagnostics="tokens")
    record = captioner.caption([IMAGE])[0]
    details = record["token_diagnostics"]
    assert len(details) == record["tokens"] >= 2

    # The same greedy tokens from transformers, then one eager forward over prompt + caption.
    inputs = captioner.model.prepare([load_image(IMAGE).image], captioner.config.prompt)
    generated = hf_greedy(path, inputs, MAX_NEW)[0][: len(details)]
    ids = torch.cat([inputs["input_ids"], torch.tensor([generated[:-1]])], 1)
    hf = hf_model(path)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=inputs["pixel_values"], output_attentions=True)
    T = inputs["input_ids"].shape[1]
    image = (ids[0] == captioner.model.image_token_id).float()
    start = captioner.config.start_layer
    for i, entry in enumerate(details):
        rows = torch.stack([a[0, :, T - 1 + i] for a in out.attentions[start:]])  # (layers, H, keys)
        assert entry["image_attention"] == pytest.approx(float((rows * image).sum(-1).mean()), abs=2e-4)
        assert entry["sink_attention"] == pytest.approx(float(rows[:, :, 0].mean()), abs=2e-4)
        logprob = out.logits[0, T - 1 + i].float().log_softmax(-1)[generated[i]]
        assert entry["logprob"] == pytest.approx(float(logprob), abs=2e-4)
        assert entry["contrast_changed"] is False
        text_so_far = captioner.model.tokenizer.decode(generated[: i + 1], skip_special_tokens=True)
        assert text_so_far.strip().endswith("".join(e["token"] for e in details[: i + 1]).strip())
        grid = decode_grid(entry["patch_attention"], record["diagnostics"]["grid"])
        best = int(grid.flatten().argmax())
        assert [best // grid.shape[0], best % grid.shape[0]] in entry["top_patches"]
    assert "".join(e["token"] for e in details) == record["caption"]
    summary = record["diagnostics"]
    mean_share = sum(e["image_attention"] for e in details) / len(details)
    assert summary["image_attention"] == pytest.approx(mean_share, abs=1e-3)
    assert summary["kept_fraction"] == 1.0 and summary["contrast_changed"] == 0


def test_selection_and_contrast_show_up_in_the_summary(tiny_model):
    captioner = Captioner(str(tiny_model("llava-llama")), dtype="fp32", max_new_tokens=12, diagnostics="summary")
    default = captioner.caption([IMAGE, SAMPLES / "shapes_square.png"])
    for record in default:
        summary = record["diagnostics"]
        # Sparsity 0.5 keeps about half of the slots on every step after the first.
        assert 0.5 <= summary["kept_fraction"] < 0.65
        assert 0 <= summary["sink_ratio"] <= 1 and "token_diagnostics" not in record
    strong = captioner.with_settings(alpha=3.0, sparsity=0.0).caption([IMAGE, SAMPLES / "shapes_square.png"])
    assert sum(r["diagnostics"]["contrast_changed"] for r in strong) > 0
    budget = captioner.with_settings(kv_budget=0.5).caption([IMAGE])[0]
    assert budget["diagnostics"]["patch_attention"] is None, "a compacted cache has no patch map"


def test_show_and_heatmap(tiny_model, tmp_path):
    model = tiny_model("llava-llama")
    records = tmp_path / "records.jsonl"
    out = vacap("caption", IMAGE, SAMPLES / "shapes_square.png", "--model", model, "--max-new-tokens", "5",
                "--diagnostics", "tokens", "-o", records)  # fmt: skip
    assert out.returncode == 0, out.stderr
    record = json.loads(records.read_text().splitlines()[0])

    heat = tmp_path / "heat.png"
    shown = vacap("show", records, "--image", "house.jpg", "--heatmap", heat, "--token", "1")
    assert shown.returncode == 0, shown.stderr
    assert "".join(e["token"] for e in record["token_diagnostics"]) == record["caption"]
    assert record["caption"] in shown.stdout
    original = load_image(IMAGE).image
    with Image.open(heat) as picture:
        assert picture.format == "PNG" and picture.size == original.size
        changed = sum(a != b for a, b in zip(picture.convert("RGB").tobytes(), original.tobytes()))
    assert changed > 0, "the overlay must mark the attended patches"

    assert vacap("show", records, "--image", "nothing-like-this").returncode == 2
    assert vacap("show", records, "--image", "house.jpg", "--heatmap", heat, "--token", "99").returncode == 1


def test_compare_writes_every_setting_and_a_table(tiny_model, tmp_path):
    model = tiny_model("llava-next")
    output = tmp_path / "compare.jsonl"
    images = [IMAGE, SAMPLES / "stripes_tall.webp"]
    out = vacap("compare", *images, "--model", model, "--methods", "greedy,vasparse,fastv", "--sparsity", "0.3,0.7",
                "--max-new-tokens", "6", "--dtype", "fp32", "-o", output)  # fmt: skip
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    labels = ["greedy", "vasparse sparsity=0.3", "vasparse sparsity=0.7", "fastv"]
    assert sorted((r["setting"], Path(r["path"]).name) for r in records) == sorted(
        (label, p.name) for label in labels for p in images
    )
    assert {r["params"]["sparsity"] for r in records if r["method"] == "vasparse"} == {0.3, 0.7}
    for label in labels:
        assert label in out.stderr
    # compare's greedy captions are caption's greedy captions.
    alone = vacap("caption", *images, "--model", model, "--method", "greedy", "--max-new-tokens", "6",
                  "--dtype", "fp32")  # fmt: skip
    greedy = {r["path"]: r["caption"] for r in records if r["setting"] == "greedy"}
    assert {r["path"]: r["caption"] for r in map(json.loads, alone.stdout.splitlines())} == greedy
    assert vacap("compare", IMAGE, "--methods", "greedy,beam").returncode == 2


def test_token_texts_keep_the_spaces_between_words(tiny_model):
    """SentencePiece marks a word's leading space on its first token; decoded alone it is lost."""
    from transformers import AutoTokenizer

    from vacap.diagnostics import token_texts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("llava-llama"))
    sentence = "a red heart and a yellow ring at the bottom."
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    texts = token_texts(tokenizer, ids)
    assert len(texts) == len(ids) and texts[-1] == ""
    assert "".join(texts) == sentence
    assert any(text.startswith(" ") for text in texts)


def test_show_prints_the_words_with_their_spaces(tmp_path):
    """The demo model writes real words: `vacap show` must print them as the caption has them."""
    records = tmp_path / "records.jsonl"
    scene = SAMPLES / "scene_2.png"
    out = vacap("caption", scene, "--model", "demo", "--dtype", "fp32", "--method", "greedy",
                "--max-new-tokens", "8", "--diagnostics", "tokens", "-o", records)  # fmt: skip
    assert out.returncode == 0, out.stderr
    record = json.loads(records.read_text())
    assert record["caption"].count(" ") >= 3
    assert "".join(e["token"] for e in record["token_diagnostics"]) == record["caption"]
    shown = vacap("show", records, "--image", scene.name)
    assert shown.returncode == 0, shown.stderr
    assert record["caption"] in shown.stdout


def _backgrounds(record: dict, color_system: str) -> dict[str, str]:
    """Token text -> the SGR codes it is printed with on a terminal of ``color_system``."""
    import io
    import re

    from rich.console import Console

    from vacap.show import render

    console = Console(file=io.StringIO(), color_system=color_system, force_terminal=True, width=200)
    console.print(render(record, console.color_system))
    tokens = {e["token"] for e in record["token_diagnostics"]}
    found = re.findall(r"\x1b\[([0-9;]+)m([^\x1b]+)", console.file.getvalue())
    return {text: codes for codes, text in found if text in tokens}


@pytest.mark.parametrize("color_system, distinct", [("truecolor", 5), ("256", 5), ("standard", 4)])
def test_show_shades_differ_without_true_colour(color_system, distinct):
    # High, close shares, as a small model gives them: on a plain grey-to-red gradient they all
    # came out the same red on 8-colour terminals and in two reds on 256-colour ones.
    shares = [0.80, 0.84, 0.88, 0.92, 0.96]
    record = {
        "path": "a.png", "status": "ok", "method": "greedy", "caption": "w0 w1 w2 w3 w4",
        "token_diagnostics": [{"token": f" w{i}" if i else "w0", "image_attention": s} for i, s in enumerate(shares)],
        "diagnostics": {"image_attention": 0.88},
    }  # fmt: skip
    shades = _backgrounds(record, color_system)
    assert len(shades) == len(shares)
    assert len(set(shades.values())) >= distinct
    assert shades["w0"] != shades[" w4"]

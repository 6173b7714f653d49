"""The static-shape decode step (``vacap.decode.static_step``) and ``--compile``.

The static step must give the dynamic loop's tokens, and so Hugging Face's, with positions and
slots held on the device; compiled, it must never recompile while a caption grows.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PROMPT, hf_greedy, noise_image

from vacap.config import DecodeConfig
from vacap.decode import Steering, _compile_cache_per_isa, generate
from vacap.diagnostics import Diagnostics
from vacap.methods import steering_for
from vacap.model import load_model

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
MAX_NEW = 32
# Sizes chosen so that, on the anyres tiny models, the batch is left padded and its captions
# end at different steps, some by EOS and some by length.
IMAGES = [noise_image(20 + 7 * i, 30, 10 + i) for i in range(6)]


def tokens(model, inputs, steering, steps: str, max_new: int = MAX_NEW) -> list[list[int]]:
    return [g.tokens for g in generate(model, inputs, steering, max_new, steps=steps)]


@pytest.fixture(scope="module")
def onevision(tiny_model):
    """Qwen2 text model with grouped-query attention, anyres images (so left padding)."""
    path = tiny_model("llava-onevision")
    return path, load_model(str(path), dtype="fp32", device="cpu")


@pytest.mark.dtype
@pytest.mark.parametrize("arch", ["llava-next", "llava-onevision"])
def test_static_step_gives_the_dynamic_loop_and_hf_greedy_tokens(tiny_model, arch):
    path = tiny_model(arch)
    model = load_model(str(path), dtype="fp32", device="cpu")
    inputs = model.prepare(IMAGES, PROMPT)
    padding = (~inputs["attention_mask"].bool()).sum(-1)
    assert len(set(padding.tolist())) > 2, "rows must be left padded by different amounts"

    static = tokens(model, inputs, Steering(), "static")
    assert static == tokens(model, inputs, Steering(), "dynamic")
    assert static == hf_greedy(path, inputs, MAX_NEW)
    lengths = {len(row) for row in static}
    assert len(lengths) > 2 and MAX_NEW in lengths, "captions must end at different steps"


@pytest.mark.dtype
@pytest.mark.parametrize("method", ["fastv", "vcd"])
def test_methods_whose_steps_are_plain_attention_run_static(onevision, method, caplog):
    """FastV's steps attend over a cache compacted from its K-th layer on (so the layers hold
    different numbers of slots and write at different slots); VCD's run a doubled batch."""
    _, model = onevision
    inputs = model.prepare(IMAGES, PROMPT)
    config = DecodeConfig(method=method)
    with caplog.at_level(logging.WARNING, logger="vacap"):
        static = tokens(model, inputs, steering_for(model, config), "static")
    assert not caplog.records, "the static step must really run, not fall back"
    assert static == tokens(model, inputs, steering_for(model, config), "dynamic")
    assert static != tokens(model, inputs, Steering(), "static"), "the method must change something here"


def test_steps_that_need_attention_fall_back_to_the_dynamic_step_once(onevision, caplog):
    _, model = onevision
    inputs = model.prepare(IMAGES[:2], PROMPT)
    vasparse = DecodeConfig(method="vasparse")
    with caplog.at_level(logging.WARNING, logger="vacap"):
        for _ in range(2):
            fallback = tokens(model, inputs, steering_for(model, vasparse), "static", 8)
        diagnosed = Diagnostics(Steering(), model, vasparse.start_layer)
        tokens(model, inputs, diagnosed, "static", 8)
    assert fallback == tokens(model, inputs, steering_for(model, vasparse), "dynamic", 8)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2, notes
    assert notes[0].startswith("VASparse decoding") and notes[1].startswith("Diagnostics decoding")
    assert all("runs the dynamic step" in note for note in notes)


def test_an_unknown_steps_kind_is_refused(onevision):
    _, model = onevision
    with pytest.raises(ValueError, match="steps must be one of dynamic, static, compiled"):
        generate(model, model.prepare(IMAGES[:1], PROMPT), Steering(), 4, steps="graph")


# CI runs this test, with a warm compile cache, again under ATEN_CPU_CAPABILITY=avx2: before
# the cache was kept per instruction set, that rerun was served the AVX512 step and gave garbage.
@pytest.mark.dtype
@pytest.mark.compile  # torch.compile: a first compilation takes 10 to 40 s on a small CPU
def test_compiled_step_gives_hf_tokens_and_never_recompiles_as_captions_grow(tiny_model):
    path = tiny_model("llava-onevision")
    model = load_model(str(path), dtype="fp32", device="cpu")
    inputs = model.prepare(IMAGES, PROMPT)
    shorter = model.prepare(IMAGES[3:] + IMAGES[:3], "Say it.")
    assert shorter["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    # A recompilation would mean that something changing per step, or per prompt length within
    # a capacity bucket, reached the compiled region; the first compilation is not one. Dynamo
    # keeps compiled code per function, so another test's model compiled in this process first
    # would make this model's first compilation count as a recompilation: start from none.
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = tokens(model, inputs, Steering(), "compiled")
        again = tokens(model, shorter, Steering(), "compiled")
    assert compiled == hf_greedy(path, inputs, MAX_NEW)
    assert again == tokens(model, shorter, Steering(), "dynamic")
    assert list(model.compiled) == ["static"], "one compiled step per loaded model"


def test_each_instruction_set_compiles_into_its_own_cache(monkeypatch, tmp_path):
    # transformers' models, imported first as in a run, write inductor's default into the variable.
    script = (
        "import os, transformers.models.llava; from vacap.decode import _compile_cache_per_isa as c; "
        "c(); print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    plain = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    _compile_cache_per_isa()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] != plain.stdout.strip()

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    _compile_cache_per_isa()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path), "a cache the user chose is left alone"


def test_compile_stays_out_of_the_records_params():
    config = DecodeConfig(method="greedy", compile=True)
    assert "compile" not in config.as_params()
    assert config.as_params() == DecodeConfig(method="greedy").as_params()
    with pytest.raises(ValueError, match="compile needs diagnostics none"):
        DecodeConfig(compile=True, diagnostics="summary")


# --- the CLI ---------------------------------------------------------------------------------


def vacap(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    command = [sys.executable, "-m", "vacap.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quant", "8bit"], "--compile cannot be used with --quant 8bit"),
        (["--diagnostics", "summary"], "compile needs diagnostics none"),
    ],
)
def test_compile_with_what_it_cannot_serve_exits_2(args, message):
    out = vacap("caption", SAMPLES, "--compile", *args)
    assert out.returncode == 2
    assert message in " ".join(out.stderr.split()), out.stderr


@pytest.mark.dtype
@pytest.mark.compile  # runs torch.compile in a fresh process
def test_caption_with_compile_end_to_end(tiny_model, tmp_path):
    model_dir = tiny_model("llava-llama")
    images = [SAMPLES / "house.jpg", SAMPLES / "shapes_square.png"]
    common = ["--model", model_dir, "--dtype", "fp32", "--max-new-tokens", "10"]
    plain = vacap("caption", *images, *common, "--method", "greedy")
    output = tmp_path / "compiled.jsonl"
    compiled = vacap("caption", *images, *common, "--method", "greedy", "--compile", "-o", output)
    assert plain.returncode == 0 and compiled.returncode == 0, compiled.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    expected = [json.loads(line) for line in plain.stdout.splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert [r["caption"] for r in records] == [r["caption"] for r in expected]
    assert [r["params"] for r in records] == [r["params"] for r in expected]
    assert "dynamic step" not in compiled.stderr

    fallback = vacap("caption", *images, *common, "--method", "vasparse", "--compile")
    assert fallback.returncode == 0
    assert fallback.stderr.count("VASparse decoding needs attention inside every step") == 1, fallback.stderr
    assert len(fallback.stdout.splitlines()) == 2

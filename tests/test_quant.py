"""bitsandbytes quantization through the real loading code, on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


@pytest.fixture(scope="module")
def quantizable(tiny_model) -> Path:
    # bitsandbytes on CPU needs in_features % 64 == 0 and out_features % 32 == 0.
    return tiny_model("llava-llama", quantizable=True)


@pytest.mark.dtype
@pytest.mark.parametrize("quant, layer_class", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_language_model_is_quantized_and_the_rest_is_not(quantizable, quant, layer_class):
    from vacap.config import DecodeConfig
    from vacap.decode import generate
    from vacap.methods import steering_for
    from vacap.model import load_model

    model = load_model(str(quantizable), quant=quant, device="cpu")
    attn = model.layers[0].self_attn
    assert type(attn.q_proj).__name__ == layer_class and type(model.layers[-1].mlp.down_proj).__name__ == layer_class
    assert type(model.lm_head).__name__ == "Linear"
    assert type(model.hf.model.multi_modal_projector.linear_1).__name__ == "Linear"
    vision_linears = [m for m in model.hf.model.vision_tower.modules() if "Linear" in type(m).__name__]
    assert vision_linears and all(type(m).__name__ == "Linear" for m in vision_linears)

    from PIL import Image

    inputs = model.prepare([Image.open(SAMPLES / "house.jpg").convert("RGB")], "Describe.")
    out = generate(model, inputs, steering_for(model, DecodeConfig(max_new_tokens=6)), 6)
    assert 1 <= len(out[0].tokens) <= 6


@pytest.mark.dtype
@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_4bit_computes_in_the_runs_dtype(quantizable, dtype, torch_dtype):
    import torch

    from vacap.model import load_model

    model = load_model(str(quantizable), quant="4bit", dtype=dtype, device="cpu")
    expected = getattr(torch, torch_dtype)
    layers = [m for m in model.hf.model.language_model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and {m.compute_dtype for m in layers} == {expected}
    # The dequantized product itself comes out in that dtype.
    proj = model.layers[0].self_attn.q_proj
    assert proj(torch.ones(1, proj.in_features, dtype=expected)).dtype == expected


@pytest.mark.dtype
def test_cli_quant_4bit_writes_ok_records(quantizable):
    out = subprocess.run(
        [sys.executable, "-m", "vacap.cli", "caption", str(SAMPLES), "--model", str(quantizable), "--quant", "4bit",
         "--max-new-tokens", "5", "--batch-size", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == len(list(SAMPLES.iterdir()))
    assert all(r["status"] == "ok" and r["params"]["quant"] == "4bit" for r in records)


def test_missing_bitsandbytes_is_a_clear_usage_error(quantizable):
    # An interpreter in which `import bitsandbytes` fails, as on a machine without it.
    program = "import sys; sys.modules['bitsandbytes'] = None; from vacap.cli import app; app()"
    out = subprocess.run(
        [sys.executable, "-c", program, "caption", str(SAMPLES / "house.jpg"), "--model", str(quantizable),
         "--quant", "8bit"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip
    assert out.returncode == 2
    assert "--quant 8bit needs bitsandbytes" in out.stderr and 'pip install ".[quant]" in vacap\'s checkout' in out.stderr

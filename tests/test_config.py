"""Decode settings as records state them: each method's effective values, the user's honoured."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import SAMPLES

from vacap.config import DecodeConfig


@pytest.mark.parametrize(
    "method, alpha, used",
    [("vasparse", None, 0.1), ("vasparse", 0.7, 0.7), ("vcd", None, 1.0), ("vcd", 0.3, 0.3), ("greedy", 0.7, 0.0)],
)
def test_alpha_is_the_users_or_the_methods_own(method, alpha, used):
    assert DecodeConfig(method=method, alpha=alpha).as_params()["alpha"] == used


def test_vcd_keeps_the_users_plausibility_cut_off():
    assert DecodeConfig(method="vcd", apc_beta=0.3).as_params()["apc_beta"] == 0.3


def test_cli_records_the_alpha_vcd_used(tiny_model):
    model = tiny_model("llava-llama")
    params = []
    for extra in ([], ["--alpha", "0.5"]):
        out = subprocess.run(
            [sys.executable, "-m", "vacap.cli", "caption", str(SAMPLES / "house.jpg"), "--model", str(model),
             "--method", "vcd", "--max-new-tokens", "2", *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        params.append(json.loads(out.stdout)["params"])
    assert [p["alpha"] for p in params] == [1.0, 0.5]


def test_help_states_each_methods_alpha():
    # Typer renders help with rich markup, which would swallow a "[default: ...]" written by hand.
    out = subprocess.run([sys.executable, "-m", "vacap.cli", "caption", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "250"}, timeout=60)  # fmt: skip
    assert "Default: 0.1 for vasparse and pai, 1 for vcd" in out.stdout

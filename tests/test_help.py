"""Every command's --help reads whole in an 80-column terminal, grouped into panels."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import typer.main

from vacap.cli import app

COMMANDS = [
    [], ["caption"], ["compare"], ["show"], ["export"], ["doctor"],
    ["eval"], ["eval", "chair"], ["eval", "pope"], ["eval", "shapes"],
]  # fmt: skip
BOX = "│╭╮╰╯─"


def render(command: list[str], columns: int) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "TERMINAL_WIDTH": str(columns)}
    out = subprocess.run(
        [sys.executable, "-m", "vacap.cli", *command, "-h"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def words(text: str) -> list[str]:
    return text.translate({ord(c): " " for c in BOX}).split()


def click_command(path: list[str]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "vacap")
def test_help_fits_80_columns_and_cuts_nothing(command):
    narrow, wide = render(command, 80), render(command, 250)
    assert max(map(len, narrow.splitlines())) <= 80
    assert "…" not in narrow
    # The same words in the same order as where nothing needs wrapping: no default, choice or
    # word is cut short or broken across lines ("greed y").
    assert words(narrow) == words(wide)
    for param in getattr(click_command(command), "params", []):
        for name in param.opts:
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", narrow), (name, narrow)


def panels(text: str) -> dict[str, str]:
    """Each option's panel, by the panel title above it."""
    found, panel = {}, None
    for line in text.splitlines():
        title = re.match(r"╭─ (.+?) ─", line)
        if title:
            panel = title[1]
        row = re.match(r"│ (--[a-z][a-z-]*)", line)
        if row:
            found.setdefault(row[1], panel)
    return found


def test_caption_help_is_grouped_into_panels():
    found = panels(render(["caption"], 80))
    expected = {
        "Input": ["--recursive", "--files-from", "--include", "--exclude", "--limit", "--shard"],
        "Output and caption files": ["--output", "--overwrite", "--sidecar", "--sidecar-dir", "--existing"],
        "Caption text": ["--prefix", "--suffix", "--clean", "--trim-incomplete"],
        "Model": ["--model", "--dtype", "--device", "--threads", "--quant", "--batch-size", "--compile"],
        "Decoding": ["--method", "--prompt", "--prompt-file", "--max-new-tokens", "--seed"],
        "VASparse": ["--sparsity", "--lam", "--alpha", "--apc-beta", "--sink-beta", "--start-layer",
                     "--contrast-layers", "--mask-rate", "--kv-budget"],
        "VISTA (--method vista)": ["--vista-lambda", "--vista-gamma", "--vista-window-start", "--vista-window-end"],
        "VAR (--method var)": ["--var-p", "--var-rho", "--var-tau", "--var-image-floor", "--var-start-layer",
                               "--var-dims"],
        "PAI (--method pai)": ["--pai-alpha", "--pai-start-layer"],
        "Sampling": ["--temperature", "--top-p", "--repetition-penalty", "--no-repeat-ngram"],
        "Diagnostics": ["--diagnostics", "--verbose"],
        "Scale-out": ["--ray", "--ray-address", "--workers", "--gpus-per-worker"],
    }  # fmt: skip
    assert {option: found.get(option) for options in expected.values() for option in options} == {
        option: panel for panel, options in expected.items() for option in options
    }


def test_caption_help_says_what_a_new_user_needs():
    text = " ".join(words(render(["caption"], 80)))
    assert "or demo (the small model shipped with vacap)" in text
    assert "[default: llava-hf/llava-1.5-7b-hf]" in text
    assert 'pip install ".[ray]" in vacap\'s checkout' in text
    assert "Decoding method: vasparse, greedy, vcd, fastv, vista, var or pai." in text
    for command in (["caption"], ["compare"], ["eval", "pope"], ["eval", "shapes"]):
        batch = " ".join(words(render(command, 250)))
        assert re.search(r"--batch-size N \[x>=1\] \w+ decoded together\. \d+ by default[:,] ", batch), command

"""The README's offline commands, run as a user pastes them, against the output it shows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# What a record holds that depends on the machine, not on vacap: the time, and the dtype that
# --dtype auto picks (bf16 where the CPU has native bf16, else fp32).
MACHINE_KEYS = {"seconds"}


def block(marker: str) -> str:
    """The code block right after ``<!-- README marker -->``."""
    found = re.search(rf"<!-- README {re.escape(marker)} -->\n```\n(.*?)```", README, re.S)
    assert found, f"README has no block marked {marker!r}"
    return found.group(1)


def run_block(commands: str, cwd: Path) -> subprocess.CompletedProcess:
    """The block's lines in bash, stopping at the first that fails, with this environment's
    `vacap` and `python` first on PATH, and caches inside the test folder."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HOME": str(cwd / "hf-home"),
        "HF_DATASETS_OFFLINE": "1",
    }
    # A copy, not a link: `cp -r` copies a link as a link, and the recipe would then write its
    # caption files into the repository's own sample_images.
    shutil.copytree(ROOT / "sample_images", cwd / "sample_images")
    return subprocess.run(
        ["bash", "-e", "-c", commands], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.dtype
def test_quick_start_prints_the_record_the_readme_shows(tmp_path):
    out = run_block(block("run: quick start"), tmp_path)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    got, shown = json.loads(line), json.loads(block("sample: quick start"))
    assert got["params"].pop("dtype") in ("bf16", "fp32")
    shown["params"].pop("dtype")
    assert list(got) == list(shown)  # the README shows every key, in the order vacap writes them
    assert {k: v for k, v in got.items() if k not in MACHINE_KEYS} == {
        k: v for k, v in shown.items() if k not in MACHINE_KEYS
    }


@pytest.mark.dtype
def test_recipe_writes_the_caption_file_the_readme_shows_and_datasets_loads_it(tmp_path):
    out = run_block(block("run: recipe"), tmp_path)
    assert out.returncode == 0, out.stderr
    printed = out.stdout.splitlines()
    caption_file = block("sample: recipe caption file").strip()
    assert printed[0] == caption_file
    assert (tmp_path / "dataset" / "scene_2.txt").read_text(encoding="utf-8") == caption_file + "\n"
    # The last line is the first caption the imagefolder loader gives: one of the run's captions,
    # with the trigger word.
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(r["status"] == "ok" for r in records) and len(records) == 10
    assert printed[-1] in {r["caption"] for r in records}
    assert printed[-1].startswith("ohwx, ")
    metadata = (tmp_path / "dataset" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(metadata) == len(records)

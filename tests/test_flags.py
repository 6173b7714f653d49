"""One rule for a flag that changes nothing, one style per kind of error, and the same input flags
on caption and compare."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vacap.config import DecodeConfig

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
NO_MODEL = "/nonexistent/model"  # reaching the model load proves the flags were accepted


def vacap(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "vacap.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def said(out: subprocess.CompletedProcess) -> str:
    return " ".join(out.stderr.replace("│", " ").split())


@pytest.mark.parametrize(
    "settings, given, unused",
    [
        (dict(method="greedy"), ["sparsity", "alpha", "lam", "kv_budget", "max_new_tokens"],
         ["sparsity", "alpha", "lam", "kv_budget"]),
        (dict(method="vcd"), ["alpha", "apc_beta", "seed", "sparsity", "mask_rate"], ["sparsity", "mask_rate"]),
        (dict(method="fastv"), ["seed", "temperature", "top_p"], ["seed", "top_p"]),
        (dict(method="fastv", temperature=0.7), ["seed", "top_p"], []),
        (dict(method="vasparse"), ["sparsity", "lam", "mask_rate", "seed", "contrast_layers"], ["mask_rate", "seed"]),
        (dict(method="vasparse", contrast_layers=2), ["mask_rate", "seed"], []),
        (dict(method="vasparse", contrast_layers=2, alpha=0.0), ["mask_rate", "contrast_layers", "apc_beta"],
         ["mask_rate", "contrast_layers", "apc_beta"]),
        (dict(method="vasparse", sparsity=0.0), ["lam"], ["lam"]),
        (dict(method="vasparse", sparsity=0.0, kv_budget=0.5), ["lam"], []),
        (dict(method="vasparse"), ["vista_lambda", "var_p", "var_dims"], ["vista_lambda", "var_p", "var_dims"]),
        (dict(method="vista", vista_gamma=0.0), ["vista_lambda", "vista_window_start"], ["vista_window_start"]),
        (dict(method="var", var_p=1.0), ["var_p", "var_tau", "var_dims"], ["var_tau", "var_dims"]),
        (dict(method="greedy"), ["pai_alpha", "pai_start_layer"], ["pai_alpha", "pai_start_layer"]),
        (dict(method="pai", pai_alpha=0.0), ["pai_alpha", "pai_start_layer", "alpha"], ["pai_start_layer"]),
    ],
)  # fmt: skip
def test_unused_names_exactly_the_settings_that_change_nothing(settings, given, unused):
    assert list(DecodeConfig(**settings).unused(given)) == unused


def test_a_flag_the_method_ignores_is_refused_before_anything_loads(tmp_path):
    out = vacap("caption", SAMPLES, "--model", NO_MODEL, "--method", "greedy", "--sparsity", "0.7", "--alpha", "0.5",
                "-o", tmp_path / "out.jsonl")  # fmt: skip
    assert out.returncode == 2
    assert (
        "given but changing nothing with --method greedy: --sparsity (acts only with --method vasparse), "
        "--alpha (acts only with --method vasparse, vcd or pai); leave them out" in said(out)
    )
    assert "Usage: " in out.stderr and not (tmp_path / "out.jsonl").exists()


def test_a_flag_given_at_its_default_value_counts_as_given(tmp_path):
    # --sparsity 0.5 is vasparse's default, yet the user asked for it: greedy refuses it too.
    greedy = vacap("caption", SAMPLES, "--model", NO_MODEL, "--method", "greedy", "--sparsity", "0.5")
    assert greedy.returncode == 2 and "--sparsity (acts only with --method vasparse)" in said(greedy)
    used = vacap("caption", SAMPLES, "--model", NO_MODEL, "--sparsity", "0.5", "-o", tmp_path / "out.jsonl")
    assert used.returncode == 2 and "no such model folder" in used.stderr and "changing nothing" not in used.stderr


@pytest.mark.parametrize(
    "command, refused",
    [
        (["compare", SAMPLES, "--methods", "greedy,fastv", "--seed", "3"], "--seed"),
        (["compare", SAMPLES, "--methods", "greedy,vasparse", "--top-p", "0.9"], "--top-p"),
        (["eval", "pope", SAMPLES, "--instances", "x.json", "--method", "greedy", "--sparsity", "0.3"], "--sparsity"),
    ],
)
def test_every_command_refuses_a_flag_no_setting_uses(command, refused):
    out = vacap(*command, "--model", NO_MODEL)
    assert out.returncode == 2 and f"changing nothing with --method" in said(out) and refused in said(out)


def test_other_methods_flags_reach_their_settings_and_records(tmp_path):
    out_file = tmp_path / "out.jsonl"
    out = vacap("caption", SAMPLES / "scene_1.png", "--model", "demo", "--method", "var", "--var-dims", "3,5",
                "--var-tau", "2", "--max-new-tokens", "4", "-o", out_file)  # fmt: skip
    assert out.returncode == 0, out.stderr
    params = json.loads(out_file.read_text(encoding="utf-8").splitlines()[0])["params"]
    assert params["var_dims"] == [3, 5] and params["var_tau"] == 2.0 and "vista_lambda" not in params
    bad = vacap("caption", SAMPLES, "--model", NO_MODEL, "--method", "var", "--var-dims", "3,x")
    assert bad.returncode == 2 and "'3,x' is not a comma-separated list of whole numbers" in said(bad)
    idle = vacap("caption", SAMPLES, "--model", NO_MODEL, "--method", "greedy", "--vista-lambda", "0.1")
    assert idle.returncode == 2 and "--vista-lambda (acts only with --method vista)" in said(idle)
    pai = vacap("caption", SAMPLES / "scene_1.png", "--model", "demo", "--method", "pai", "--pai-alpha", "0.3",
                "--pai-start-layer", "1", "--max-new-tokens", "4", "-o", tmp_path / "pai.jsonl")  # fmt: skip
    assert pai.returncode == 0, pai.stderr
    params = json.loads((tmp_path / "pai.jsonl").read_text(encoding="utf-8").splitlines()[0])["params"]
    assert (params["pai_alpha"], params["pai_start_layer"], params["alpha"]) == (0.3, 1, 0.1)
    assert "var_p" not in params and "vista_lambda" not in params
    idle = vacap("caption", SAMPLES, "--model", NO_MODEL, "--method", "vcd", "--pai-alpha", "0.1")
    assert idle.returncode == 2 and "--pai-alpha (acts only with --method pai)" in said(idle)


def test_compare_takes_a_flag_that_one_of_its_methods_uses():
    out = vacap("compare", SAMPLES, "--methods", "greedy,vcd", "--seed", "3", "--model", NO_MODEL)
    assert out.returncode == 2 and "no such model folder" in out.stderr


@pytest.mark.parametrize(
    "command, message",
    [
        (["show", "x.jsonl", "--image", "a.png", "--token", "3"], "--token chooses what --heatmap draws"),
        (["show", "x.jsonl", "--image", "a.png", "--by", "risk", "--heatmap", "h.png"], "--heatmap draws attention"),
        (["export", "x.jsonl", "--format", "txt", "--to", "o", "--mark-risk"], "a txt caption file has no place"),
    ],
)  # fmt: skip
def test_other_flags_that_would_change_nothing_are_refused(command, message):
    out = vacap(*command)
    assert out.returncode == 2 and message in said(out)


@pytest.mark.parametrize(
    "command, flag, value, allowed",
    [
        ("caption", "--method", "greed", "vasparse, greedy, vcd, fastv, vista, var, pai"),
        ("caption", "--dtype", "fp8", "auto, bf16, fp16, fp32"),
        ("caption", "--sidecar", "md", "txt, caption"),
        ("caption", "--existing", "merge", "skip, overwrite, append, prepend"),
        ("caption", "--quant", "2bit", "none, 8bit, 4bit"),
        ("compare", "--diagnostics", "none", "summary, tokens"),
    ],
)
def test_a_bad_choice_says_what_is_allowed_without_library_prefixes(command, flag, value, allowed):
    out = vacap(command, SAMPLES, flag, value, "--model", NO_MODEL)
    assert out.returncode == 2
    assert f"Invalid value for '{flag}': '{value}' is not one of {allowed}" in said(out)
    assert "Value error" not in out.stderr


def test_usage_errors_show_the_usage_box_and_runtime_errors_one_line(tmp_path):
    usage = vacap("caption", tmp_path / "missing", "--model", NO_MODEL)
    assert usage.returncode == 2 and "Usage:" in usage.stderr and "no such file or directory" in said(usage)
    assert "Try 'vacap caption -h' for help." in usage.stderr.replace("python -m vacap.cli", "vacap")
    runtime = vacap("caption", SAMPLES / "house.jpg", "--model", NO_MODEL, "-o", tmp_path / "out.jsonl")
    lines = [line for line in runtime.stderr.splitlines() if line.strip()]
    assert runtime.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no such model folder")
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    unwritable = vacap("caption", SAMPLES / "house.jpg", "--model", NO_MODEL, "-o", folder)
    lines = [line for line in unwritable.stderr.splitlines() if line.strip()]
    assert unwritable.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), unwritable.stderr


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """compare with caption's input flags: a path list, filters, a limit and a prompt file."""
    root = tmp_path_factory.mktemp("compare")
    listing = root / "list.txt"
    listing.write_text(f"{SAMPLES / 'house.jpg'}\n{SAMPLES / 'scene_1.png'}\n", encoding="utf-8")
    prompt = root / "prompt.txt"
    prompt.write_text("Describe {filename}.\n", encoding="utf-8")
    out = vacap(
        "compare", SAMPLES, "--files-from", listing, "--include", "scene_*", "--exclude", "scene_4*",
        "--limit", "2", "--prompt-file", prompt, "--methods", "greedy,fastv", "--model", "demo",
        "--max-new-tokens", "4", "--dtype", "fp32", "--device", "cpu",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out, [json.loads(line) for line in out.stdout.splitlines()]


def test_compare_takes_the_same_input_flags_as_caption(compared):
    out, records = compared
    # The filters see each path inside the folder it was found under; the list's files are their own roots.
    assert sorted({Path(r["path"]).name for r in records}) == ["scene_1.png", "scene_2.png"]
    assert {r["setting"] for r in records} == {"greedy", "fastv"} and len(records) == 4
    assert {r["params"]["prompt"] for r in records} == {"Describe {filename}."}


def test_the_summary_reads_plainly(compared):
    out, _ = compared
    line = next(line for line in out.stderr.splitlines() if line.startswith("captioned "))
    assert re.fullmatch(r"captioned 4 of 4 captions \(2 images x 2 settings\) in [\d.]+ s \([\d.]+ s each\)", line)

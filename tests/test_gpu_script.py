"""benchmarks/gpu.py in --dry-run: every section runs on the CPU with tiny models and writes
results whose figures agree with each other (issue 28: the GPU run must not be where it is debugged)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vacap.model import SUPPORTED_ARCHITECTURES

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("speed", "parity", "speed-long", "caption", "methods", "quant", "speed-32")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(out / "results.json")
    return json.loads((out / "results.json").read_text(encoding="utf-8")), out


def _rows(data: dict, section: str) -> list[dict]:
    return data["sections"][section]["rows"]


def test_every_section_ran_and_the_table_was_written(results):
    data, out = results
    assert list(data["sections"]) == list(SECTIONS)
    for name, section in data["sections"].items():
        assert section["status"] == "done", (name, section.get("error"), section["skipped"])
        assert section["rows"], name
        assert section["seconds"] > 0
    table = (out / "results.md").read_text(encoding="utf-8")
    assert all(f"## {name} (done" in table for name in SECTIONS)
    assert data["meta"]["dry_run"] is True and data["meta"]["device"] == "cpu"


def test_speed_figures_follow_from_the_measured_calls(results):
    data, _ = results
    short, long = data["meta"]["new_tokens"]
    for section in ("speed", "speed-long", "speed-32"):
        rows = _rows(data, section)
        by_batch = {}
        for row in rows:
            by_batch.setdefault(row["batch"], set()).add((row["setting"], row["steps"]))
            total, prefill, batch = row[f"call_{long}_s"], row["prefill_s"], row["batch"]
            assert total > 0 and prefill > 0 and row[f"call_{short}_s"] > 0
            assert row["tokens_per_s"] == pytest.approx(batch * long / total)
            assert row["images_per_s"] == pytest.approx(batch / total)
            steps = max(total - prefill, 1e-9)
            assert row["ms_per_step"] == pytest.approx(1000 * steps / (long - 1))
            assert row["decode_tokens_per_s"] == pytest.approx(batch * (long - 1) / steps)
            assert (row["compile_s"] is not None) == (row["steps"] == "compiled")
            assert row["prefill_peak_mb"] is None  # measured on CUDA only
        expected = {("hf", "-"), ("greedy", "dynamic"), ("greedy", "static"), ("greedy", "compiled"),
                    ("vasparse", "dynamic")}  # fmt: skip
        assert all(settings == expected for settings in by_batch.values()), by_batch
    assert sorted({row["batch"] for row in _rows(data, "speed")}) == data["meta"]["batches"]
    # The long prompt is longer (anyres) than the short one.
    assert min(r["prompt"] for r in _rows(data, "speed-long")) > max(r["prompt"] for r in _rows(data, "speed"))


def test_parity_rows_report_agreement_and_fp32_on_cpu_agrees_fully(results):
    data, _ = results
    rows = [row for row in _rows(data, "parity") if "agreement" in row]
    assert {row["shape"] for row in rows} >= {"llava-1.5-7b", "llava-next-7b"}
    assert {row["dtype"] for row in rows} == {"fp32", "bf16"}
    for row in rows:
        ours, theirs = row["tokens"], row["hf_tokens"]
        first = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        assert row["first_diverging_step"] == first
        assert 0.0 <= row["agreement"] <= 1.0
        assert row["agreement"] == (len(ours) if first is None else first) / len(ours)
        assert (row["logit_margin"] is None) == (first is None)
        if row["dtype"] == "fp32":
            assert row["agreement"] == 1.0, row
    # Batches are left padded: the rows of a batch have prompts of different lengths.
    for shape in ("llava-1.5-7b", "llava-next-7b"):
        batch = [row["prompt"] for row in rows if row["shape"] == shape and row["dtype"] == "fp32" and row["batch"] > 1]
        assert len(set(batch)) > 1
    qwen = [row for row in _rows(data, "parity") if row["shape"].startswith("qwen")]
    if "Qwen2_5_VLForConditionalGeneration" not in SUPPORTED_ARCHITECTURES:
        assert [row["status"] for row in qwen] == [data["meta"]["qwen"]]
        assert qwen[0]["status"].startswith("not supported by this vacap")


def test_methods_compare_each_row_alone_and_in_the_batch(results):
    data, _ = results
    rows = _rows(data, "methods")
    assert {row["method"] for row in rows} == {"vasparse", "vcd", "fastv", "greedy-risk", "vasparse-risk"}
    for row in rows:
        same = [a == b for a, b in zip(row["tokens"], row["alone_tokens"])]
        assert row["rows"] == len(same) == len(row["tokens"]) == row["batch"] > 1
        assert row["same_rows"] == sum(same) and row["same"] == all(same)


def test_quant_loads_through_load_model(results):
    data, _ = results
    rows = _rows(data, "quant")
    assert [row["quant"] for row in rows] == ["4bit", "8bit"]
    for row, layer in zip(rows, ("Linear4bit", "Linear8bitLt")):
        assert row["status"] == "ok", row.get("error")
        assert row["quantized_layers"] == [layer]
        assert [len(tokens) for tokens in row["tokens"]] == [row["max_new_tokens"]] * 2


def test_caption_runs_the_real_command(results):
    data, _ = results
    (row,) = _rows(data, "caption")
    assert row["returncode"] == 0, row["stderr_tail"]
    assert row["records"] == row["ok"] == row["images"]
    assert row["utilisation_source"] == "none" and row["utilisation_mean"] is None  # no GPU


def test_goals_are_judged_from_their_figures(results):
    data, _ = results
    goals = data["goals"]
    assert len(goals) >= 10
    for name, goal in goals.items():
        if goal["figure"] is None:
            assert goal["met"] is None, name
        else:
            met = goal["figure"] >= goal["threshold"] if goal["rule"] == ">=" else goal["figure"] > goal["threshold"]
            assert goal["met"] == met, name
    speed = {(r["batch"], r["setting"], r["steps"]): r for r in _rows(data, "speed")}
    one = data["meta"]["batches"][0]
    ratio = speed[(one, "greedy", "compiled")]["tokens_per_s"] / speed[(one, "hf", "-")]["tokens_per_s"]
    assert goals["greedy --compile vs HF tokens/s, batch 1"]["figure"] == pytest.approx(ratio)
    # No bandwidth on a CPU, no utilisation without a GPU: not measured, not failed.
    assert goals["greedy --compile decode vs bandwidth limit, batch 1"]["met"] is None


@pytest.mark.parametrize("flags", [["--new-tokens", "5"], ["--sections", "speed,nope"]])
def test_bad_flags_exit_2_saying_what_is_allowed(tmp_path, flags):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(tmp_path / "out"), *flags],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert "whole numbers" in done.stderr or "choose from" in done.stderr
    assert not (tmp_path / "out").exists()

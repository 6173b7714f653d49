"""`vacap caption` as a user runs it: real subprocesses, real files, JSONL parsed back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from vacap.config import DecodeConfig
from vacap.records import RECORD_KEYS

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
VACAP = [sys.executable, "-m", "vacap.cli"]


def vacap(*args, timeout=300) -> subprocess.CompletedProcess:
    # A wide terminal keeps rich from wrapping the messages the tests look for.
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([*VACAP, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def parse(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model("llava-llama")


@pytest.fixture
def odd_folder(tmp_path) -> Path:
    """Good images in odd modes next to broken files, in nested folders."""
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    Image.new("CMYK", (40, 30), (0, 120, 200, 10)).save(folder / "cmyk.jpg")
    Image.new("P", (33, 20), 5).save(folder / "palette.png")
    Image.new("I;16", (24, 24), 40000).save(folder / "nested" / "sixteen.png")
    Image.new("RGBA", (30, 30), (255, 0, 0, 100)).save(folder / "nested" / "alpha.PNG")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a picture", encoding="utf-8")
    good = (SAMPLES / "house.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return folder


def test_help_is_fast_and_imports_no_torch():
    probe = "import sys, vacap.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
    out = vacap("caption", "--help")
    assert out.returncode == 0
    for flag in ("--sparsity", "--lam", "--alpha", "--apc-beta", "--sink-beta", "--start-layer",
                 "--contrast-layers", "--mask-rate", "--kv-budget", "--method", "--quant", "--no-recursive"):  # fmt: skip
        assert flag in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["--kv-budget", "0"], "kv_budget must be in (0, 1]"),
        (["--alpha", "-1"], "alpha must be a finite number >= 0"),
        (["--method", "beam"], "'beam' is not one of"),
        (["--dtype", "fp8"], "'fp8' is not one of"),
        (["--quant", "2bit"], "'2bit' is not one of"),
        (["--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
        (["--max-new-tokens", "0"], "greater than or equal to 1"),
    ],
)
def test_bad_flags_exit_2_and_say_what_is_allowed(args, message):
    out = vacap("caption", str(SAMPLES), *args)
    assert out.returncode == 2
    assert message in " ".join(out.stderr.split()), out.stderr


def test_layer_settings_are_checked_against_the_model(model_dir):
    out = vacap("caption", SAMPLES / "house.jpg", "--model", model_dir, "--start-layer", "4")
    assert out.returncode == 2
    assert "start_layer must be below the model's 4 decoder layers, got 4" in " ".join(out.stderr.split())


def test_missing_path_and_unsupported_model_exit_2(tmp_path):
    out = vacap("caption", tmp_path / "nowhere")
    assert out.returncode == 2 and "nowhere" in out.stderr
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    out = vacap("caption", SAMPLES / "house.jpg", "--model", bert)
    assert out.returncode == 2
    assert "unsupported architecture BertModel" in out.stderr and "LlavaForConditionalGeneration" in out.stderr


def test_caption_folder_with_odd_and_broken_files(model_dir, odd_folder, tmp_path):
    output = tmp_path / "out" / "captions.jsonl"
    out = vacap("caption", odd_folder, "--model", model_dir, "-o", output, "--max-new-tokens", "8", "--batch-size", "2")
    assert out.returncode == 1, out.stderr  # some files are broken
    assert out.stdout == ""
    records = parse(output.read_text(encoding="utf-8"))
    by_name = {Path(r["path"]).name: r for r in records}
    assert sorted(by_name) == sorted(p.name for p in odd_folder.rglob("*") if p.is_file())
    for name in ("cmyk.jpg", "palette.png", "sixteen.png", "alpha.PNG"):
        record = by_name[name]
        assert record["status"] == "ok" and record["error"] is None
        assert record["tokens"] >= 1 and isinstance(record["caption"], str)
    assert by_name["cmyk.jpg"]["width"] == 40 and by_name["cmyk.jpg"]["height"] == 30
    assert "empty" in by_name["empty.jpg"]["error"]
    assert "not an image" in by_name["notes.jpg"]["error"]
    assert "truncated" in by_name["truncated.jpg"]["error"]
    for record in records:
        assert list(record)[: len(RECORD_KEYS)] == list(RECORD_KEYS)
        assert record["method"] == "vasparse" and record["params"]["sparsity"] == DecodeConfig().sparsity
        assert set(DecodeConfig().as_params()) <= set(record["params"])
    assert "4 ok, 3 error, 0 skipped" in out.stderr


def test_stdout_output_and_no_recursive(model_dir, odd_folder):
    out = vacap("caption", odd_folder, "--no-recursive", "--model", model_dir, "--max-new-tokens", "4",
                "--method", "greedy")  # fmt: skip
    records = parse(out.stdout)
    assert {Path(r["path"]).parent.name for r in records} == {"images"}
    assert len(records) == 5 and "captioning" in out.stderr
    assert all(r["params"]["sparsity"] == 0.0 for r in records), "greedy records state the settings used"


def test_resume_after_kill_captions_every_image_exactly_once(model_dir, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(10):
        shutil.copy(SAMPLES / "house.jpg", folder / f"img{i:02d}.jpg")
        Image.open(folder / f"img{i:02d}.jpg").rotate(i * 30).save(folder / f"img{i:02d}.jpg")
    output = tmp_path / "captions.jsonl"
    args = [*VACAP, "caption", str(folder), "--model", str(model_dir), "-o", str(output), "--max-new-tokens", "48"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not output.exists() or output.read_text().count("\n") < 2):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = parse(output.read_text())
    assert 2 <= len(first) < 10, "the kill should land mid-run"
    with output.open("a", encoding="utf-8") as f:
        f.write('{"path": "half a rec')  # a line cut short by the kill

    out = vacap("caption", folder, "--model", model_dir, "-o", output, "--max-new-tokens", "48")
    assert out.returncode == 0, out.stderr
    records = parse(output.read_text())
    assert sorted(Path(r["path"]).name for r in records) == [f"img{i:02d}.jpg" for i in range(10)]
    assert all(r["status"] == "ok" for r in records)
    assert f"{10 - len(first)} ok, 0 error, {len(first)} skipped" in " ".join(out.stderr.split())

    # Different settings are a different job: nothing is skipped; --overwrite starts afresh.
    out = vacap("caption", folder, "--model", model_dir, "-o", output, "--max-new-tokens", "4", "--overwrite")
    records = parse(output.read_text())
    assert len(records) == 10 and all(r["params"]["max_new_tokens"] == 4 for r in records)


def test_python_api_matches_cli(model_dir):
    from vacap import Captioner

    images = [SAMPLES / "house.jpg", SAMPLES / "shapes_square.png", SAMPLES / "missing.png"]
    records = Captioner(str(model_dir), dtype="fp32", method="greedy", max_new_tokens=6).caption(images)
    assert [r["status"] for r in records] == ["ok", "ok", "error"]
    out = vacap("caption", *images[:2], "--model", model_dir, "--dtype", "fp32", "--method", "greedy",
                "--max-new-tokens", "6")  # fmt: skip
    assert [r["caption"] for r in parse(out.stdout)] == [r["caption"] for r in records[:2]]

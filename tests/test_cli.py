"""`vacap caption` as a user runs it: real subprocesses, real files, JSONL parsed back."""

from __future__ import annotations

import base64
import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import summary_counts
from PIL import Image

from vacap.config import DecodeConfig
from vacap.records import RECORD_KEYS

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
VACAP = [sys.executable, "-m", "vacap.cli"]


def vacap(*args, timeout=300, text=True, **run) -> subprocess.CompletedProcess:
    # A wide terminal keeps rich from wrapping the messages the tests look for.
    env = {**os.environ, "COLUMNS": "250"}
    command = [*VACAP, *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(command, capture_output=True, text=text, timeout=timeout, env=env, **run)


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
    assert "4 ok, 3 error, 0 skipped" == summary_counts(out.stderr)


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
    assert f"{10 - len(first)} ok, 0 error, {len(first)} skipped" == summary_counts(out.stderr)

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


# --- the output file ---------------------------------------------------------------------------


@pytest.fixture
def unloadable_model(tmp_path) -> Path:
    """A model folder that cannot load: any run that gets as far as loading exits 2 saying so."""
    folder = tmp_path / "no_model_here"
    folder.mkdir()
    return folder


def one_error_line(stderr: str) -> str:
    """The run's only stderr line, which must be an error message (no traceback, no loading)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_names_that_are_not_utf8_are_captioned_recorded_and_resumed(model_dir, tmp_path):
    folder = tmp_path / "odd names"
    folder.mkdir()
    raw_folder = os.fsencode(folder)
    good, bad = raw_folder + b"/caf\xe9.png", raw_folder + b"/bad\xff\xfe.png"
    Image.open(SAMPLES / "house.jpg").save(os.fsdecode(good), format="PNG")
    with open(bad, "wb") as f:
        f.write(b"not a picture")
    shutil.copy(SAMPLES / "shapes_square.png", folder / "zebra.png")
    output = tmp_path / "out.jsonl"
    args = ["--model", model_dir, "--max-new-tokens", "4", "--method", "greedy"]

    def check(records):
        assert [r["status"] for r in records] == ["error", "ok", "ok"]
        by_bytes = {base64.b64decode(r["path_bytes"]): r for r in records if "path_bytes" in r}
        assert sorted(by_bytes) == [bad, good], "each odd name keeps its exact bytes"
        assert by_bytes[good]["path"] == f"{folder}/caf\\xe9.png"
        assert "not an image" in by_bytes[bad]["error"]
        assert records[2]["path"] == str(folder / "zebra.png") and "path_bytes" not in records[2]

    to_file = vacap("caption", folder, "-o", output, *args)
    assert to_file.returncode == 1, to_file.stderr  # the bad file, nothing else
    data = output.read_bytes()
    assert b"\\ud" not in data  # no surrogate escapes, which strict JSON readers reject
    check(parse(data.decode("utf-8")))
    assert "bad\\xff\\xfe.png: not an image" in to_file.stderr

    to_stdout = vacap("caption", folder, *args, text=False)
    assert to_stdout.returncode == 1
    assert b"\\ud" not in to_stdout.stdout
    check(parse(to_stdout.stdout.decode("utf-8")))

    again = vacap("caption", folder, "-o", output, *args)
    assert again.returncode == 1
    assert "0 ok, 1 error, 2 skipped" == summary_counts(again.stderr), again.stderr
    assert output.read_bytes().startswith(data)
    assert [r["status"] for r in parse(output.read_text(encoding="utf-8"))] == ["error", "ok", "ok", "error"]


@pytest.mark.parametrize("command", ["caption", "compare"])
def test_an_output_that_is_not_vacap_records_is_refused_untouched(command, unloadable_model, tmp_path):
    table = tmp_path / "table.csv"
    table.write_bytes(b"file,caption\nhouse.jpg,a house\nshapes.png,some shapes")  # no final newline
    picture = tmp_path / "house.jpg"
    shutil.copy(SAMPLES / "house.jpg", picture)
    for target in (table, picture):
        before = target.read_bytes()
        out = vacap(command, picture, "--model", unloadable_model, "-o", target)
        assert out.returncode == 2
        message = one_error_line(out.stderr)
        assert str(target) in message and "other than vacap records" in message and "--overwrite" in message
        assert target.read_bytes() == before


def drop_write_override():
    """In the child: root without CAP_DAC_OVERRIDE obeys permission bits like any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.fixture
def read_only_mount(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root and mount rights)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("problem", ["directory", "read-only file system", "no write permission", "parent is a file"])
def test_output_problems_exit_2_before_the_model_loads(problem, unloadable_model, tmp_path, request):
    # The model cannot load: had loading come first, the message would be about the model.
    run = {}
    if problem == "directory":
        output, reason = tmp_path, "Is a directory"
    elif problem == "read-only file system":
        output, reason = request.getfixturevalue("read_only_mount") / "out.jsonl", "Read-only file system"
    elif problem == "no write permission":
        output, reason = tmp_path / "locked.jsonl", "Permission denied"
        output.write_bytes(b"")
        output.chmod(0o444)
        if os.geteuid() == 0:
            run["preexec_fn"] = drop_write_override
    else:
        (tmp_path / "plain").write_text("x")
        output, reason = tmp_path / "plain" / "out.jsonl", "Not a directory"
    out = vacap("caption", SAMPLES / "house.jpg", "--model", unloadable_model, "-o", output, **run)
    assert out.returncode == 2
    assert one_error_line(out.stderr) == f"error: cannot write to {output}: {reason}"


def test_a_full_disk_mid_run_stops_cleanly_and_the_next_run_repairs_and_resumes(model_dir, tmp_path):
    folder = tmp_path / "four"
    folder.mkdir()
    for i in range(4):
        Image.open(SAMPLES / "house.jpg").rotate(i * 40).save(folder / f"img{i}.png")
    args = ["--model", model_dir, "--max-new-tokens", "6", "--method", "greedy"]
    reference = tmp_path / "reference.jsonl"
    assert vacap("caption", folder, "-o", reference, *args).returncode == 0
    sizes = [len(line) for line in reference.read_bytes().splitlines(keepends=True)]
    # Room for two records and half the third: the third write fails part way, as on a full disk.
    limit = sizes[0] + sizes[1] + sizes[2] // 2

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    output = tmp_path / "out.jsonl"
    full = vacap("caption", folder, "-o", output, *args, preexec_fn=small_disk)
    assert full.returncode == 1
    assert "Traceback" not in full.stderr
    message = one_error_line("\n".join(line for line in full.stderr.splitlines() if line.startswith("error")))
    assert message.startswith(f"error: cannot write to {output}: File too large")
    data = output.read_bytes()
    written = parse(data[: data.rindex(b"\n")].decode())
    expected = parse(reference.read_text())[:2]
    assert [(r["path"], r["caption"]) for r in written] == [(r["path"], r["caption"]) for r in expected]
    assert not data.endswith(b"\n")  # the torn third record

    resumed = vacap("caption", folder, "-o", output, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "removed a broken last line" in resumed.stderr and "2 ok, 0 error, 2 skipped" == summary_counts(resumed.stderr)
    assert [r["path"] for r in parse(output.read_text())] == [str(folder / f"img{i}.png") for i in range(4)]


def test_a_second_run_on_the_same_output_is_refused_until_the_first_dies(model_dir, unloadable_model, tmp_path):
    folder = tmp_path / "six"
    folder.mkdir()
    for i in range(6):
        Image.open(SAMPLES / "house.jpg").rotate(i * 30).save(folder / f"img{i}.png")
    output = tmp_path / "captions.jsonl"
    args = [str(folder), "--model", str(model_dir), "-o", str(output), "--max-new-tokens", "48"]
    first = subprocess.Popen([*VACAP, "caption", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not output.exists() or output.read_bytes().count(b"\n") < 1):
            time.sleep(0.05)
        second = vacap("caption", folder, "--model", unloadable_model, "-o", output)
        assert first.poll() is None, "the first run should still be going"
        assert second.returncode == 2
        assert f"is being written by process {first.pid}" in one_error_line(second.stderr)
    finally:
        first.kill()  # SIGKILL: the lock goes with the process
        first.wait()
    done = len(parse(output.read_text()))
    assert done < 6
    third = vacap("caption", *args[:-2], "--max-new-tokens", "48")
    assert third.returncode == 0, third.stderr
    assert sorted(Path(r["path"]).name for r in parse(output.read_text())) == [f"img{i}.png" for i in range(6)]


def test_nothing_to_do_exits_0_without_loading_the_model(model_dir, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    output = tmp_path / "out.jsonl"
    out = vacap("caption", empty, "--model", tmp_path / "no such model", "-o", output)
    assert out.returncode == 0 and out.stderr.strip() == "no images to caption"
    assert not output.exists(), "a run with nothing to write leaves no file"

    folder = tmp_path / "three"
    folder.mkdir()
    for name in ("house.jpg", "shapes_square.png", "scene_1.png"):
        shutil.copy(SAMPLES / name, folder / name)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    args = ["--model", model, "-o", output, "--max-new-tokens", "4"]
    assert vacap("caption", folder, *args).returncode == 0
    before = output.read_bytes()

    # The same model name, now impossible to load: only a run that never loads it succeeds.
    (model / "config.json").rename(model / "config.json.away")
    out = vacap("caption", folder, *args)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "all 3 images already captioned with these settings"
    assert output.read_bytes() == before
    assert vacap("caption", folder, *args[:-1], "5").returncode == 2, "other settings do need the model"

    (model / "config.json.away").rename(model / "config.json")
    Image.open(folder / "scene_1.png").rotate(90).save(folder / "scene_1.png")  # changed since
    out = vacap("caption", folder, *args)
    assert out.returncode == 0 and "1 ok, 0 error, 2 skipped" == summary_counts(out.stderr), out.stderr
    assert [Path(r["path"]).name for r in parse(output.read_text())] == [
        "house.jpg", "scene_1.png", "shapes_square.png", "scene_1.png"
    ]


def test_the_summary_names_the_failed_files(model_dir, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(7):
        (folder / f"broken{i}.png").write_bytes(b"" if i % 2 else b"junk")
    out = vacap("caption", folder, "--model", model_dir, "-o", tmp_path / "out.jsonl")
    assert out.returncode == 1
    summary = out.stderr[out.stderr.index("captioned 0 of 7 images") :].splitlines()
    assert summary[0].endswith("; 7 failed:") and summary[1:] == [
        f"  {folder}/broken0.png: not an image file (cannot identify format)",
        f"  {folder}/broken1.png: empty file",
        f"  {folder}/broken2.png: not an image file (cannot identify format)",
        f"  {folder}/broken3.png: empty file",
        f"  {folder}/broken4.png: not an image file (cannot identify format)",
        "  and 2 more (see the records)",
    ]

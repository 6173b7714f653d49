"""Inputs that once stopped or hung a run: FIFOs, paths longer than the system allows, folders
given to the Python API. Each becomes records, never a hang, a traceback or silence."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SAMPLES, deep_folder


def caption(*args) -> subprocess.CompletedProcess:
    # A FIFO used to block the run forever: the timeout turns that into a failure, not a hang.
    command = [sys.executable, "-m", "vacap.cli", "caption", *map(str, args), "--max-new-tokens", "3"]
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def records_of(out: subprocess.CompletedProcess) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in map(json.loads, out.stdout.splitlines())}


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model("llava-llama")


def test_a_fifo_named_before_a_good_file_gets_an_error_record_at_once(model_dir, tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    out = caption(tmp_path / "pipe.jpg", SAMPLES / "house.jpg", "--model", model_dir)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    records = records_of(out)
    assert records["pipe.jpg"]["status"] == "error"
    assert records["pipe.jpg"]["error"] == "not a regular file (a FIFO)"
    assert records["house.jpg"]["status"] == "ok"


def test_walk_errors_and_overlong_names_become_error_records(model_dir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.png").write_bytes((SAMPLES / "scene_1.png").read_bytes())
    (folder / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    deep = deep_folder(folder)
    out = caption(folder, deep, "--model", model_dir)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    by_status = {r["path"]: (r["status"], r["error"]) for r in records}
    assert by_status[str(folder / "good.png")] == ("ok", None)
    assert by_status[str(folder / "dangling.png")] == ("error", "broken symbolic link")
    # The folder the walk could not enter, and the image named by a path that is too long.
    unlisted = [path for path, (_, error) in by_status.items() if error == "cannot list folder: File name too long"]
    assert len(unlisted) == 1 and str(deep).startswith(unlisted[0])
    assert by_status[str(deep)] == ("error", "cannot read file: File name too long")
    assert len(records) == 4


def test_python_api_treats_folders_as_the_cli_does(model_dir, tmp_path):
    from vacap import Captioner

    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for name in ("b.png", "nested/a.png"):
        (folder / name).write_bytes((SAMPLES / "scene_2.png").read_bytes())
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    captioner = Captioner(str(model_dir), dtype="fp32", method="greedy", max_new_tokens=3)
    records = captioner.caption([folder, SAMPLES / "house.jpg"])
    assert [r["path"] for r in records] == [str(folder / "b.png"), str(folder / "nested" / "a.png"),
                                            str(SAMPLES / "house.jpg")]  # fmt: skip
    assert all(r["status"] == "ok" for r in records)
    flat = list(captioner.records([folder], recursive=False))
    assert [r["path"] for r in flat] == [str(folder / "b.png")]


def test_images_read_in_another_process_give_the_records_of_the_paths(model_dir, tmp_path):
    """records_of, what a Ray actor runs: images read by read_image in a separate process and
    pickled across, as Ray hands them over, give the records captioning the paths gives."""
    from vacap import Captioner

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths = [str(SAMPLES / "house.jpg"), str(broken), str(SAMPLES / "scene_1.png")]
    code = "import pickle, sys; from vacap.images import read_image\n"
    code += "sys.stdout.buffer.write(pickle.dumps([read_image(p) for p in sys.argv[1:]]))"
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, timeout=120, check=True)
    captioner = Captioner(str(model_dir), dtype="fp32", method="greedy", max_new_tokens=3, batch_size=2)
    read = list(zip(paths, pickle.loads(out.stdout)))
    assert [type(image).__name__ for _, image in read] == ["LoadedImage", "str", "LoadedImage"]
    from_reads = by_path(captioner.records_of(read))
    assert from_reads == by_path(captioner.records(paths))
    assert [from_reads[path][0] for path in paths] == ["ok", "error", "ok"]


def by_path(records) -> dict[str, tuple]:
    return {r["path"]: (r["status"], r["caption"], r["error"], r["sha256"], r["width"]) for r in records}

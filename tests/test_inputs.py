"""Inputs that once stopped or hung a run: FIFOs, paths longer than the system allows, folders
given to the Python API, symbolic link loops, huge files, names holding special tokens or bytes
that are not UTF-8, prompts longer than the model's context, files replaced by folders, paths
that cannot be read. Each becomes records (or, for a prompt that can never fit, a usage error),
never a hang, a traceback or silence."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers import SAMPLES, deep_folder


def caption(*args, wrap: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """``vacap caption ARGS``, run by the command ``wrap`` when given (setpriv, say)."""
    # A FIFO used to block the run forever: the timeout turns that into a failure, not a hang.
    command = [*wrap, *caption_command(*args)]
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def caption_command(*args) -> list[str]:
    return [sys.executable, "-m", "vacap.cli", "caption", *map(str, args), "--max-new-tokens", "3"]


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


# --- odd names, odd files, odd prompts: the demo model --------------------------------------------

DEMO = ["--model", "demo", "--dtype", "fp32", "--method", "greedy"]


def test_link_loops_and_a_huge_file_get_error_records(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.png").write_bytes((SAMPLES / "scene_1.png").read_bytes())
    (folder / "a.png").symlink_to("b.png")
    (folder / "b.png").symlink_to("a.png")
    (tmp_path / "self.png").symlink_to("self.png")
    huge = tmp_path / ".png"  # sparse: 40 GB on paper; read whole, it raised MemoryError
    with open(huge, "wb") as f:
        f.truncate(40 << 30)
    out = caption(folder, tmp_path / "self.png", huge, *DEMO)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    records = records_of(out)
    assert {name: r["status"] for name, r in records.items()} == {
        "a.png": "error", "b.png": "error", "good.png": "ok", "self.png": "error", ".png": "error",
    }  # fmt: skip
    assert records["self.png"]["error"] == records["a.png"]["error"]
    assert records["self.png"]["error"].startswith("symbolic link loop")
    assert f"{40 << 30} bytes" in records[".png"]["error"]


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory) -> Path:
    """A plain name, names holding the demo model's special tokens, and one that is not UTF-8."""
    folder = tmp_path_factory.mktemp("names")
    image = (SAMPLES / "scene_1.png").read_bytes()
    for name in (b"plain.png", b"<image>.png", b"<s><pad><unk> <image>.png", b"caf\xe9.png"):
        (folder / os.fsdecode(name)).write_bytes(image)
    return folder


def test_names_with_special_tokens_add_no_token_to_the_prompt(odd_names):
    from vacap.captioner import prepare_read
    from vacap.images import read_image
    from vacap.model import Preparer

    preparer = Preparer.load("demo")
    tokenizer = preparer.tokenizer
    # The unknown token stands for any word the demo's small vocabulary lacks, a name's included.
    special = {*tokenizer.all_special_ids, *tokenizer.get_added_vocab().values()} - {tokenizer.unk_token_id}

    def specials(name: str) -> list[int]:
        path = str(odd_names / name)
        ids = prepare_read(preparer, path, read_image(path), "Describe {stem} ({filename}).").inputs["input_ids"]
        return sorted(i for i in ids[0].tolist() if i in special)

    # The image token once per image slot and the template's own tokens, whatever the name holds.
    expected = specials("plain.png")
    assert expected.count(preparer.processor.image_token_id) > 0
    for name in ("<image>.png", "<s><pad><unk> <image>.png", os.fsdecode(b"caf\xe9.png")):
        assert specials(name) == expected, name


def test_odd_names_in_a_prompt_caption_and_resume(odd_names, tmp_path):
    output = tmp_path / "out.jsonl"
    args = [odd_names, "-o", output, *DEMO, "--prompt", "Describe {stem} ({filename}) in {folder}."]
    out = caption(*args)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    again = caption(*args)  # the resume reads every name back, and finds all of them done
    assert again.returncode == 0 and "all 4 images already captioned" in again.stderr, again.stderr


def test_a_prompt_longer_than_the_context_is_refused_with_the_numbers(tmp_path):
    from transformers import AutoConfig

    from vacap.demo import MODEL_DIR

    context = AutoConfig.from_pretrained(MODEL_DIR).text_config.max_position_embeddings
    good = tmp_path / "good.png"
    good.write_bytes((SAMPLES / "scene_1.png").read_bytes())
    out = caption(good, *DEMO, "--prompt", "word " * context)
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    message = " ".join(out.stderr.split())
    assert "prompt too long for the model" in message and f"context of {context} tokens" in message
    assert "3 new tokens (--max-new-tokens)" in message


def test_a_name_that_makes_one_prompt_too_long_gets_an_error_record(tmp_path):
    from transformers import AutoConfig

    from vacap.demo import MODEL_DIR

    context = AutoConfig.from_pretrained(MODEL_DIR).text_config.max_position_embeddings
    good, wordy = tmp_path / "good.png", tmp_path / ("w " * 120 + ".png")
    for path in (good, wordy):
        path.write_bytes((SAMPLES / "scene_1.png").read_bytes())
    # The template leaves room for a short name, not for 120 more words.
    room = context - 64 - 3 - 60
    out = caption(good, wordy, *DEMO, "--prompt", "word " * room + "{stem}")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    records = records_of(out)
    assert records["good.png"]["status"] == "ok"
    assert records[wordy.name]["status"] == "error"
    assert records[wordy.name]["error"].startswith("prompt too long for the model: ")
    assert records[wordy.name]["error"].endswith(f"more than the model's context of {context} tokens")


def test_a_listed_file_replaced_by_a_folder_before_it_is_read_gets_an_error_record(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes((SAMPLES / "scene_1.png").read_bytes())
    output = tmp_path / "out.jsonl"
    env = {**os.environ, "COLUMNS": "250"}
    run = subprocess.Popen(caption_command(folder, "-o", output, *DEMO), stderr=subprocess.PIPE, text=True, env=env)
    # The output is opened once the images are listed, and the model loads after that (seconds,
    # torch imported first): b.png becomes a folder holding an image between the two.
    while not output.exists() and run.poll() is None:
        time.sleep(0.001)
    (folder / "b.png").unlink()
    (folder / "b.png").mkdir()
    (folder / "b.png" / "inside.png").write_bytes((SAMPLES / "scene_1.png").read_bytes())
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1 and "Traceback" not in stderr, stderr
    records = {Path(r["path"]).name: r for r in map(json.loads, output.read_text(encoding="utf-8").splitlines())}
    assert {name: r["status"] for name, r in records.items()} == {"a.png": "ok", "b.png": "error", "c.png": "ok"}
    assert records["b.png"]["error"] == "is a directory, not an image file"
    assert "3/3" in stderr


def unprivileged() -> list[str]:
    """A command prefix under which chmod 000 keeps this user out: none for a plain user; for
    root, setpriv without the capabilities that let root read anything."""
    if os.geteuid() != 0:
        return []
    drop = [shutil.which("setpriv") or "setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    try:
        subprocess.run([*drop, "true"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("running as root, and setpriv cannot drop root's right to read anything here")
    return drop


def test_unreadable_paths_named_on_the_command_line_get_error_records(tmp_path):
    wrap = unprivileged()
    good, sealed, locked = tmp_path / "good.png", tmp_path / "sealed.png", tmp_path / "locked"
    locked.mkdir()
    for path in (good, sealed, locked / "inside.png"):
        path.write_bytes((SAMPLES / "scene_1.png").read_bytes())
    sealed.chmod(0)
    locked.chmod(0)
    try:
        out = caption(sealed, locked, good, *DEMO, wrap=wrap)
    finally:
        locked.chmod(0o755)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    records = records_of(out)
    assert {name: (r["status"], r["error"]) for name, r in records.items()} == {
        "sealed.png": ("error", "permission denied"),
        "locked": ("error", "cannot list folder: Permission denied"),
        "good.png": ("ok", None),
    }

"""Caption files beside the images (`--sidecar`), as a dataset user runs them: real subprocesses
with the demo model, the files and JSONL read back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import summary_counts
from PIL import Image

from vacap.sidecars import join_captions

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
VACAP = [sys.executable, "-m", "vacap.cli"]
DEMO = ["--model", "demo", "--dtype", "fp32", "--method", "greedy", "--max-new-tokens", "16"]
# image inside the dataset -> the sample it is a copy of
LAYOUT = {
    "a.png": "scene_1.png",
    "sub/b.png": "scene_2.png",
    "sub/deep/c.jpg": "house.jpg",
    "raw/d.png": "scene_3.png",
    "e.webp": "dots_square.webp",
}
PREFIX, SUFFIX = "ohwx, ", ", photo"


def vacap(*args, cwd=None, timeout=300, **run) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    command = [*VACAP, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, **run)


def parse(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def make_dataset(folder: Path, names=LAYOUT) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / LAYOUT[name], folder / name)
    return folder


def caption_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.suffix == ".txt"}


def summary(out: subprocess.CompletedProcess) -> str:
    return " ".join(out.stderr.split())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A dataset with one hand-written caption file, captioned with a trigger word into caption
    files and a JSONL."""
    folder = make_dataset(tmp_path_factory.mktemp("first") / "data")
    written = folder / "sub" / "b.txt"
    written.write_bytes(b"hand\r\nwritten, tags")
    os.utime(written, ns=(10**18, 10**18))
    output = folder.parent / "out.jsonl"
    args = [folder, *DEMO, "--sidecar", "txt", "-o", output, "--prefix", PREFIX, "--suffix", SUFFIX]
    out = vacap("caption", *args)
    assert out.returncode == 0, out.stderr
    return folder, output, args, out


def test_caption_files_hold_the_records_captions_and_skip_leaves_existing_ones(first_run):
    folder, output, _, out = first_run
    assert out.stdout == ""
    assert "4 ok, 0 error, 1 skipped" == summary_counts(out.stderr)
    records = {Path(r["path"]).relative_to(folder).as_posix(): r for r in parse(output.read_text("utf-8"))}
    assert sorted(records) == sorted(set(LAYOUT) - {"sub/b.png"}), "an image with a caption file is not captioned"
    assert (folder / "sub" / "b.txt").read_bytes() == b"hand\r\nwritten, tags"
    assert (folder / "sub" / "b.txt").stat().st_mtime_ns == 10**18
    for name, record in records.items():
        caption = record["caption"]
        assert record["status"] == "ok" and record["stop"] in ("eos", "length")
        assert caption.startswith(PREFIX) and caption.endswith(SUFFIX) and len(caption) > len(PREFIX + SUFFIX)
        assert (folder / name).with_suffix(".txt").read_text("utf-8") == caption + "\n"
        shaping = {k: record["params"].get(k) for k in ("prefix", "suffix", "clean", "trim_incomplete")}
        assert shaping == {"prefix": PREFIX, "suffix": SUFFIX, "clean": True, "trim_incomplete": True}


def test_a_second_run_does_nothing_and_restores_a_missing_caption_file(first_run):
    folder, output, args, _ = first_run
    files, jsonl = caption_files(folder), output.read_bytes()
    stamps = {name: (folder / name).stat().st_mtime_ns for name in files}
    (folder / "a.txt").unlink()  # done in the JSONL, caption file gone: written from the record
    out = vacap("caption", *args)
    assert out.returncode == 0, out.stderr
    assert "all 5 images already captioned" in out.stderr and "Loading" not in out.stderr
    assert caption_files(folder) == files and output.read_bytes() == jsonl
    assert all((folder / name).stat().st_mtime_ns == stamps[name] for name in files if name != "a.txt")


def test_other_shaping_is_another_job_and_overwrite_replaces_the_files(first_run, tmp_path):
    folder, output, _, _ = first_run
    copy = tmp_path / "data"
    shutil.copytree(folder, copy)
    moved = tmp_path / "out.jsonl"
    shutil.copy(output, moved)
    args = [copy / "a.png", copy / "sub", *DEMO, "--sidecar", "txt", "-o", moved, "--prefix", "zzz, "]
    out = vacap("caption", *args, "--existing", "overwrite")
    assert out.returncode == 0 and "3 ok, 0 error, 0 skipped" == summary_counts(out.stderr), out.stderr
    old = {Path(r["path"]).name: r["caption"] for r in parse(output.read_text("utf-8"))}
    new = [r for r in parse(moved.read_text("utf-8")) if r["params"].get("prefix") == "zzz, "]
    assert sorted(Path(r["path"]).name for r in new) == ["a.png", "b.png", "c.jpg"]
    for record in new:
        image = Path(record["path"])
        assert Path(image).with_suffix(".txt").read_text("utf-8") == record["caption"] + "\n"
        if image.name in old:  # same tokens, other trigger word and no suffix
            assert record["caption"] == "zzz, " + old[image.name][len(PREFIX) : -len(SUFFIX)]


def test_append_joins_the_caption_to_the_existing_file(first_run, tmp_path):
    folder = make_dataset(tmp_path, ["a.png"])
    (folder / "a.txt").write_text("tag1, tag2,\n", encoding="utf-8")
    out = vacap("caption", folder / "a.png", *DEMO, "--sidecar", "txt", "--existing", "append", "-o", "-")
    assert out.returncode == 0, out.stderr
    (record,) = parse(out.stdout)  # `-o -`: the records on stdout too
    caption = record["caption"]
    assert (folder / "a.txt").read_text("utf-8") == f"tag1, tag2, {caption}\n"
    reference = parse(first_run[1].read_text("utf-8"))
    assert PREFIX + caption + SUFFIX in [r["caption"] for r in reference]


@pytest.mark.parametrize(
    "existing, caption, where, joined",
    [
        # A tag list gets one more tag.
        ("tag1, tag2,\n", "A cat.", "append", "tag1, tag2, A cat."),
        ("tag1, tag2\r\n", "A cat.", "prepend", "A cat, tag1, tag2"),
        (", tag1", "a cat", "prepend", "a cat, tag1"),
        # Prose gets one more sentence: never "ring., a black square".
        ("A red ring.\n", "a black square", "append", "A red ring. A black square"),
        ("A red ring!", "a black square.", "prepend", "A black square. A red ring!"),
        ("Is it a ring?", "a black square", "prepend", "A black square. Is it a ring?"),
        (" \n\n", "A cat.", "append", "A cat."),
    ],
)
def test_join_captions(existing, caption, where, joined):
    assert join_captions(existing, caption, where) == joined


def test_sidecar_dir_mirrors_each_input_root(first_run, tmp_path):
    make_dataset(tmp_path / "data")
    listing = "data/a.png\n# a comment, then a blank line\n\ndata/gone.png\n"
    args = ["caption", "data/sub", *DEMO, "--files-from", "-", "--sidecar", "txt", "--sidecar-dir", "captions"]
    out = vacap(*args, cwd=tmp_path, input=listing)
    assert out.returncode == 1 and summary_counts(out.stderr).startswith("3 ok, 1 error"), out.stderr
    assert out.stdout == "", "without -o the caption files are the output"
    # The folder argument data/sub is the root of its images; a listed file under the current
    # folder keeps its path from there. The missing file's error record writes nothing.
    assert sorted(caption_files(tmp_path / "captions")) == ["b.txt", "data/a.txt", "deep/c.txt"]
    assert not list((tmp_path / "data").rglob("*.txt"))
    reference = {Path(r["path"]).name: r["caption"] for r in parse(first_run[1].read_text("utf-8"))}
    for name, image in (("data/a.txt", "a.png"), ("deep/c.txt", "c.jpg")):  # (b.png was not in first_run)
        assert (tmp_path / "captions" / name).read_text("utf-8") == reference[image][len(PREFIX) : -len(SUFFIX)] + "\n"


def test_a_kill_mid_run_leaves_only_whole_caption_files(first_run, tmp_path):
    folder, output, _, _ = first_run
    # Copies of the images first_run captioned: each caption file's whole text is known.
    expected = {}
    for record in parse(output.read_text("utf-8")):
        for copy in range(3):
            name = f"{copy}-{Path(record['path']).stem}"
            shutil.copy(record["path"], tmp_path / f"{name}{Path(record['path']).suffix}")
            expected[f"{name}.txt"] = (record["caption"][len(PREFIX) : -len(SUFFIX)] + "\n").encode()
    args = [*VACAP, "caption", str(tmp_path), *DEMO, "--sidecar", "txt", "-o", str(tmp_path / "out.jsonl")]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(tmp_path.glob("*.txt"))) < 2:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = caption_files(tmp_path)
    assert 2 <= len(killed) < len(expected), "the kill should land mid-run"
    assert all(expected[name] == text for name, text in killed.items())
    # Temporary files of a write cut short are dot-files: discovery and training tools pass them by.
    made = [p.name for p in tmp_path.iterdir() if p.name != "out.jsonl" and Path(p.name).stem not in
            {Path(n).stem for n in expected}]  # fmt: skip
    assert all(name.startswith(".") and name.endswith(".tmp") for name in made), made

    resumed = vacap(*args[3:])
    assert resumed.returncode == 0, resumed.stderr
    assert caption_files(tmp_path) == expected


def test_images_that_would_share_a_caption_file_are_refused_before_the_model_loads(tmp_path):
    # Seven stems with a .png and a .jpg each: a.png and a.jpg both map to a.txt beside them.
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(7):
        shutil.copy(SAMPLES / "scene_1.png", folder / f"s{i}.png")
        shutil.copy(SAMPLES / "house.jpg", folder / f"s{i}.jpg")
    shutil.copy(SAMPLES / "scene_2.png", folder / "alone.png")
    out = vacap("caption", "pics", *DEMO, "--sidecar", "txt", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Loading" not in out.stderr and "captioning" not in out.stderr
    assert "7 caption files would be shared by more than one image" in summary(out)
    assert "pics/s0.txt: pics/s0.jpg, pics/s0.png" in out.stderr and "and 2 more" in out.stderr
    assert "--exclude" in out.stderr and "rename" in out.stderr
    assert not list(tmp_path.rglob("*.txt"))


def test_same_names_under_two_roots_share_the_mirror_and_are_refused(tmp_path):
    for root in ("r1", "r2"):
        make_dataset(tmp_path / root, ["a.png"])
    out = vacap("caption", "r1", "r2", *DEMO, "--sidecar-dir", "caps", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "1 caption file would be shared by more than one image" in summary(out)
    assert "caps/a.txt: r1/a.png, r2/a.png" in out.stderr and "Loading" not in out.stderr
    assert not (tmp_path / "caps").exists()


def test_a_sidecar_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path):
    make_dataset(tmp_path / "data", ["a.png"])
    (tmp_path / "caps").write_text("not a folder\n", encoding="utf-8")
    for given, why in (("caps", "is a file"), ("caps/sub", "lies under caps, which is a file")):
        out = vacap("caption", "data", *DEMO, "--sidecar-dir", given, cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        assert f"--sidecar-dir {given} {why}, not a folder" in summary(out) and "Loading" not in out.stderr
    assert (tmp_path / "caps").read_text(encoding="utf-8") == "not a folder\n"


def test_a_link_in_the_sidecar_dir_that_leads_out_of_it_is_refused(tmp_path):
    make_dataset(tmp_path / "data", ["a.png", "sub/b.png"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "caps").mkdir()
    (tmp_path / "caps" / "sub").symlink_to(outside)
    out = vacap("caption", "data", *DEMO, "--sidecar-dir", "caps", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "1 caption file would be written outside --sidecar-dir caps" in summary(out)
    assert "caps/sub/b.txt (for data/sub/b.png)" in out.stderr and "Loading" not in out.stderr
    assert not list(outside.iterdir()) and not (tmp_path / "caps" / "a.txt").exists()


def test_paths_with_dotdot_and_links_inside_the_mirror_stay_inside_sidecar_dir(tmp_path):
    work = tmp_path / "work"
    make_dataset(work / "imgs", ["a.png"])
    make_dataset(work / "more", ["sub/b.png"])
    make_dataset(work / "data", ["sub/deep/c.jpg"])
    make_dataset(tmp_path / "imgs", ["e.webp"])
    (work / "w").mkdir()
    (work / "caps" / "elsewhere").mkdir(parents=True)
    (work / "caps" / "sub").symlink_to(work / "caps" / "elsewhere")  # a link that stays inside is followed
    # Named with a ``..``: relative (its own folder is its root), absolute under the current folder
    # (its path from there climbs out and back in: w/../more/sub) and absolute leading out of it.
    named = ["w/../imgs/a.png", f"{work}/w/../more/sub/b.png", f"{work}/w/../../imgs/e.webp"]
    out = vacap("caption", *named, "data", *DEMO, "--sidecar-dir", "caps", cwd=work)
    assert out.returncode == 0 and summary_counts(out.stderr) == "4 ok, 0 error, 0 skipped", out.stderr
    written = [os.path.relpath(os.path.join(folder, name), tmp_path) for folder, _, names in os.walk(tmp_path)
               for name in names if name.endswith(".txt")]  # fmt: skip
    assert sorted(written) == ["work/caps/a.txt", "work/caps/e.txt", "work/caps/elsewhere/deep/c.txt",
                               "work/caps/more/sub/b.txt"]  # fmt: skip


def test_a_caption_file_beside_an_image_goes_where_the_image_is_even_through_a_linked_folder(tmp_path):
    make_dataset(tmp_path / "data", ["a.png"])
    shutil.copy(SAMPLES / "house.jpg", tmp_path / "data" / "a.jpg")
    (tmp_path / "linked").symlink_to(tmp_path / "data")
    # The link is only another way to the same folder: linked/a.png and data/a.jpg share data/a.txt.
    clash = vacap("caption", "linked/a.png", "data/a.jpg", *DEMO, "--sidecar", "txt", cwd=tmp_path)
    assert clash.returncode == 2 and "linked/a.txt: linked/a.png, data/a.jpg" in clash.stderr, clash.stderr
    out = vacap("caption", "linked", *DEMO, "--sidecar", "txt", "--exclude", "*.jpg", "-o", "-", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (record,) = parse(out.stdout)
    assert record["path"] == "linked/a.png"
    assert (tmp_path / "data" / "a.txt").read_text("utf-8") == record["caption"] + "\n"
    assert (tmp_path / "linked").is_symlink() and sorted(os.listdir(tmp_path)) == ["data", "linked"]


def test_append_leaves_a_linked_or_fifo_caption_file_untouched_with_an_error_record(tmp_path):
    """A caption file that is a link to a private file, or a FIFO, is neither read through (the
    secret copied into a new world-readable caption file) nor waited on (a run hung forever)."""
    folder = make_dataset(tmp_path / "data", ["a.png", "sub/b.png", "e.webp"])
    secret = tmp_path / "secret"
    secret.write_text("private key\n", encoding="utf-8")
    secret.chmod(0o600)
    (folder / "a.txt").symlink_to(secret)
    os.mkfifo(folder / "sub" / "b.txt")
    (folder / "e.txt").write_text("tag1, tag2,\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    out = vacap("caption", folder, *DEMO, "--sidecar", "txt", "--existing", "append", "-o", output, timeout=120)
    assert out.returncode == 1 and summary_counts(out.stderr).startswith("1 ok, 2 error"), out.stderr
    records = {Path(r["path"]).name: r for r in parse(output.read_text("utf-8"))}
    assert "a.txt cannot be read: it is a symbolic link" in records["a.png"]["error"]
    assert "b.txt cannot be read: it is not a regular file" in records["b.png"]["error"]
    assert all("caption_file" not in records[name] for name in ("a.png", "b.png"))
    assert os.readlink(folder / "a.txt") == str(secret) and secret.read_text("utf-8") == "private key\n"
    assert (folder / "sub" / "b.txt").is_fifo()
    assert (folder / "e.txt").read_text("utf-8") == f"tag1, tag2, {records['e.webp']['caption']}\n"
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != secret]
    assert not [p for p in files if b"private key" in p.read_bytes()], "the secret was copied"


def test_resume_writes_an_append_its_run_stopped_before_once_and_leaves_edited_files(tmp_path):
    """The record of an appended caption holds the file's whole text and the hash of what was
    there before. A run stopped between a record and its file leaves the old content: the resume
    writes the record's text, so the caption is added once. A file changed since is left, and
    the run says so."""
    folder = make_dataset(tmp_path / "data", ["a.png", "sub/b.png", "e.webp"])
    for name in ("a.txt", "sub/b.txt", "e.txt"):
        (folder / name).write_text("tag1, tag2,\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    args = ["caption", folder, *DEMO, "--sidecar", "txt", "--existing", "append", "-o", output]
    out = vacap(*args)
    assert out.returncode == 0, out.stderr
    records = {Path(r["path"]).name: r for r in parse(output.read_text("utf-8"))}
    before = hashlib.sha256(b"tag1, tag2,\n").hexdigest()
    for image, name in (("a.png", "a.txt"), ("b.png", "sub/b.txt"), ("e.webp", "e.txt")):
        text = f"tag1, tag2, {records[image]['caption']}\n"
        assert records[image]["caption_file"] == {"path": str(folder / name), "text": text, "before": before}
        assert (folder / name).read_text("utf-8") == text
    (folder / "a.txt").write_text("tag1, tag2,\n", encoding="utf-8")  # as if stopped before the file
    (folder / "sub" / "b.txt").unlink()
    (folder / "e.txt").write_text("edited by hand\n", encoding="utf-8")
    jsonl = output.read_bytes()
    out = vacap(*args)
    assert out.returncode == 0, out.stderr
    assert "all 3 images already captioned" in out.stderr and output.read_bytes() == jsonl
    assert (folder / "a.txt").read_text("utf-8") == records["a.png"]["caption_file"]["text"]
    assert (folder / "sub" / "b.txt").read_text("utf-8") == records["b.png"]["caption_file"]["text"]
    assert (folder / "e.txt").read_text("utf-8") == "edited by hand\n"
    said = summary(out)
    assert "1 caption file holds neither what its record says was written nor what was there before" in said
    assert f"left as it is: {folder / 'e.txt'}" in said


def test_a_mirror_folder_turned_into_a_link_during_the_run_is_not_written_through(tmp_path):
    """The mirror is checked where each file is written, not only when the run was planned: a
    folder of it replaced by a link that leads out gets the image an error record."""
    from vacap.records import RecordWriter, make_record
    from vacap.sidecars import SidecarRun, Sidecars

    data = make_dataset(tmp_path / "data", ["a.png", "sub/b.png"])
    caps, outside = tmp_path / "caps", tmp_path / "outside"
    (caps / "sub").mkdir(parents=True)
    outside.mkdir()
    files = [data / "a.png", data / "sub" / "b.png"]
    run = SidecarRun(Sidecars("txt", caps), files, [data, data])
    assert run.refusal() is None
    (caps / "sub").rmdir()
    (caps / "sub").symlink_to(outside)
    with RecordWriter(tmp_path / "out.jsonl") as log:
        made = [make_record(path=f, status="ok", caption=f"caption {f.stem}", model="m", method="greedy", params={})
                for f in files]  # fmt: skip
        results = {Path(r["path"]).name: r for r in run.logged(made, log)}
    assert results["a.png"]["status"] == "ok" and (caps / "a.txt").read_text("utf-8") == "caption a\n"
    assert results["b.png"]["status"] == "error" and "outside" in results["b.png"]["error"]
    assert list(outside.iterdir()) == []
    written = parse((tmp_path / "out.jsonl").read_text("utf-8"))
    assert [(Path(r["path"]).name, r["status"]) for r in written] == [("a.png", "ok"), ("b.png", "ok"), ("b.png", "error")]

"""`vacap export` as a user runs it: records from a real `vacap caption --model demo` run, each
format read back by what reads it in the wild (csv module, pyarrow, datasets' imagefolder)."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vacap.demo import MODEL_DIR
from vacap.records import settings_key

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").exists(), reason="demo model not trained (python -m vacap.demo.train)"
)


def vacap(*args, cwd: Path, python: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(python or [sys.executable, "-m", "vacap.cli"]), *map(str, args)]
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def parse(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A folder captioned twice into one records file, run from the folder above it (so records
    hold relative paths): between the runs one image's content changes, so it is captioned again
    and its first ok record is superseded; a corrupt file gets an error record each time."""
    work = tmp_path_factory.mktemp("export")
    images = work / "imgs"
    (images / "sub").mkdir(parents=True)
    shutil.copy(SAMPLES / "scene_1.png", images / "scene_1.png")
    shutil.copy(SAMPLES / "shapes_square.png", images / "shapes_square.png")
    shutil.copy(SAMPLES / "scene_3.png", images / "sub" / "scene_3.png")
    (images / "broken.png").write_bytes(b"not a picture")
    caption = ("caption", "imgs", "--model", "demo", "--max-new-tokens", "8", "-o", "records.jsonl")
    first = vacap(*caption, cwd=work)
    assert first.returncode == 1, first.stderr  # the corrupt file
    shutil.copy(SAMPLES / "scene_4.png", images / "sub" / "scene_3.png")
    second = vacap(*caption, cwd=work)
    assert second.returncode == 1, second.stderr
    records = parse(work / "records.jsonl")
    ok = [r for r in records if r["status"] == "ok"]
    changed = [r for r in ok if r["path"] == "imgs/sub/scene_3.png"]
    assert len(ok) == 4 and len(changed) == 2 and changed[0]["sha256"] != changed[1]["sha256"]
    assert changed[0]["caption"] != changed[1]["caption"]  # else "last wins" could not be told from "first wins"
    last_ok = {r["path"]: r for r in ok}
    return work, last_ok


def test_csv_has_the_last_ok_record_of_each_image(run, tmp_path):
    work, last_ok = run
    out = vacap("export", "records.jsonl", "--format", "csv", "--to", tmp_path / "csv", cwd=work)
    assert out.returncode == 0, out.stderr
    assert "exported 3 captions" in out.stderr
    assert "left out: 1 images with only error records" in out.stderr
    assert "left out: 1 earlier ok records superseded by a later one" in out.stderr
    with open(tmp_path / "csv" / "captions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["path"] for row in rows) == sorted(last_ok)
    for row in rows:
        record = last_ok[row["path"]]
        assert row["caption"] == record["caption"]
        for column in ("width", "height", "tokens"):
            assert row[column] == str(record[column])
        assert row["sha256"] == record["sha256"] and row["method"] == "vasparse" and row["model"] == "demo"
        assert json.loads(row["params"]) == record["params"]
        assert settings_key(record["model"], record["params"]).startswith(row["settings"])


def test_parquet_reads_back_with_pyarrow(run, tmp_path):
    import pyarrow.parquet as pq

    work, last_ok = run
    out = vacap("export", "records.jsonl", "--format", "parquet", "--to", tmp_path, cwd=work)
    assert out.returncode == 0, out.stderr
    table = pq.read_table(tmp_path / "captions.parquet")
    assert str(table.schema.field("tokens").type) == "int64" and str(table.schema.field("seconds").type) == "double"
    rows = table.to_pylist()
    assert sorted(row["path"] for row in rows) == sorted(last_ok)
    for row in rows:
        record = last_ok[row["path"]]
        assert row["caption"] == record["caption"]
        assert (row["tokens"], row["seconds"], row["width"], row["height"]) == (
            record["tokens"], record["seconds"], record["width"], record["height"],
        )  # fmt: skip


def test_txt_mirrors_the_image_tree(run, tmp_path):
    work, last_ok = run
    out = vacap("export", "records.jsonl", "--format", "txt", "--to", tmp_path, cwd=work)
    assert out.returncode == 0, out.stderr
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["scene_1.txt", "shapes_square.txt", "sub/scene_3.txt"]
    for path, record in last_ok.items():
        sidecar = tmp_path / Path(path).relative_to("imgs").with_suffix(".txt")
        assert sidecar.read_bytes() == (record["caption"] + "\n").encode("utf-8")  # as a caption file ends


def test_hf_metadata_refuses_images_outside_the_folder(run, tmp_path):
    work, _ = run
    out = vacap("export", "records.jsonl", "--format", "hf-metadata", "--to", tmp_path / "ds", cwd=work)
    assert out.returncode == 2
    assert "3 of the 3 images are not inside" in out.stderr and "--copy-images" in out.stderr
    assert not (tmp_path / "ds").exists()


def _load_imagefolder(folder: Path, cache: Path) -> list[dict]:
    from datasets import load_dataset

    return list(load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(cache)))


def test_hf_metadata_with_copied_images_loads_as_an_imagefolder(run, tmp_path):
    work, last_ok = run
    folder = tmp_path / "ds"
    out = vacap("export", "records.jsonl", "--format", "hf-metadata", "--to", folder, "--copy-images", cwd=work)
    assert out.returncode == 0, out.stderr
    assert "3 images copied" in out.stderr
    lines = parse(folder / "metadata.jsonl")
    assert sorted(line["file_name"] for line in lines) == ["scene_1.png", "shapes_square.png", "sub/scene_3.png"]
    for line in lines:
        source = work / "imgs" / line["file_name"]
        assert (folder / line["file_name"]).read_bytes() == source.read_bytes()
    rows = _load_imagefolder(folder, tmp_path / "cache")
    by_text = {row["text"]: row["image"] for row in rows}
    assert len(rows) == 3 and len(by_text) == 3
    for record in last_ok.values():
        assert by_text[record["caption"]].size == (record["width"], record["height"])


def test_hf_metadata_in_place_when_the_images_are_inside(run, tmp_path):
    """Relative record paths are found from the current folder; nothing is copied."""
    work, last_ok = run
    shutil.copytree(work / "imgs", tmp_path / "imgs")
    shutil.copy(work / "records.jsonl", tmp_path / "records.jsonl")
    before = sorted(p for p in (tmp_path / "imgs").rglob("*"))
    out = vacap("export", "records.jsonl", "--format", "hf-metadata", "--to", "imgs", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(p for p in (tmp_path / "imgs").rglob("*")) == sorted([*before, tmp_path / "imgs" / "metadata.jsonl"])
    rows = _load_imagefolder(tmp_path / "imgs", tmp_path / "cache")  # broken.png has no metadata: not loaded
    assert sorted(row["text"] for row in rows) == sorted(r["caption"] for r in last_ok.values())


def test_several_settings_are_refused_until_one_is_chosen(run, tmp_path):
    """A file resumed with another flag holds two sets of settings; export names both."""
    work, last_ok = run
    other = []
    for record in last_ok.values():
        params = {**record["params"], "sparsity": 0.3}
        other.append({**record, "params": params, "caption": "other settings: " + record["caption"]})
    mixed = tmp_path / "mixed.jsonl"
    text = (work / "records.jsonl").read_text(encoding="utf-8")
    mixed.write_text(text + "".join(json.dumps(r) + "\n" for r in other), encoding="utf-8")
    key = settings_key("demo", other[0]["params"])[:12]

    out = vacap("export", mixed, "--format", "csv", "--to", tmp_path / "a", cwd=work)
    assert out.returncode == 2 and not (tmp_path / "a").exists()
    assert "2 different settings" in out.stderr and key in out.stderr and "sparsity=0.3" in out.stderr

    ambiguous = vacap("export", mixed, "--format", "csv", "--to", tmp_path / "a", "--settings", "vasparse", cwd=work)
    assert ambiguous.returncode == 2 and "matches 2 settings" in ambiguous.stderr

    chosen = vacap("export", mixed, "--format", "txt", "--to", tmp_path / "b", "--settings", key, cwd=work)
    assert chosen.returncode == 0, chosen.stderr
    assert "left out: 6 records of other settings" in chosen.stderr  # 4 ok and 2 error records of the first
    captions = sorted(p.read_text(encoding="utf-8") for p in (tmp_path / "b").rglob("*.txt"))
    assert captions == sorted(r["caption"] + "\n" for r in other)


def test_settings_asks_for_at_least_four_hex_digits(tmp_path):
    records = [
        {"path": "a.png", "status": "ok", "error": None, "model": "demo", "method": "greedy", "params": {"p": p},
         "caption": f"caption {p}"} for p in ("one", "two")
    ]  # fmt: skip
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    key = settings_key("demo", records[0]["params"])
    short = vacap("export", "r.jsonl", "--format", "csv", "--to", "out", "--settings", key[:3], cwd=tmp_path)
    assert short.returncode == 2 and not (tmp_path / "out").exists()
    assert f"--settings '{key[:3]}' is too short for a fingerprint: give at least 4 of its hex digits" in " ".join(
        short.stderr.replace("│", " ").split()
    )
    chosen = vacap("export", "r.jsonl", "--format", "csv", "--to", "out", "--settings", key[:4], cwd=tmp_path)
    assert chosen.returncode == 0, chosen.stderr
    with open(tmp_path / "out" / "captions.csv", newline="", encoding="utf-8") as f:
        assert [row["caption"] for row in csv.DictReader(f)] == ["caption one"]


def test_txt_leaves_out_images_whose_caption_files_clash(tmp_path):
    record = {"status": "ok", "error": None, "model": "demo", "method": "greedy", "params": {"prompt": "p"}}
    lines = [
        {"path": "pics/a.png", **record, "caption": "a png"},
        {"path": "pics/a.jpg", **record, "caption": "a jpg"},
        {"path": "pics/b.png", **record, "caption": "b – ünïcode, \"quoted\"\nsecond line"},
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), "utf-8")
    out = vacap("export", "r.jsonl", "--format", "txt", "--to", "out", cwd=tmp_path)
    assert out.returncode == 1
    assert "left out: 2 images whose caption files clash: pics/a.png, pics/a.jpg" in out.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.txt"]
    assert (tmp_path / "out" / "b.txt").read_text(encoding="utf-8") == lines[2]["caption"] + "\n"
    # The same records through csv: quoting keeps the comma, quotes and newline in one field.
    assert vacap("export", "r.jsonl", "--format", "csv", "--to", "out", cwd=tmp_path).returncode == 0
    with open(tmp_path / "out" / "captions.csv", newline="", encoding="utf-8") as f:
        assert [row["caption"] for row in csv.DictReader(f)] == [line["caption"] for line in lines]


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["missing.jsonl", "--format", "csv"], "missing.jsonl: no such file"),
        ("notes", ["notes.jsonl", "--format", "csv"], "notes.jsonl is not a vacap records file (line 1 is not JSON)"),
        ("json", ["other.jsonl", "--format", "csv"], "line 1 is JSON but not a vacap record"),
        ("records", ["r.jsonl", "--format", "xml"], "'xml' is not one of"),
        ("records", ["r.jsonl", "--format", "txt", "--copy-images"], "--copy-images goes with --format hf-metadata"),
        ("records", ["r.jsonl", "--format", "csv", "--settings", "beam"], "--settings 'beam' matches no settings"),
    ],
)
def test_bad_input_exits_2_saying_what_is_wrong(tmp_path, setup, args, message):
    (tmp_path / "notes.jsonl").write_text("these are notes\n", encoding="utf-8")
    (tmp_path / "other.jsonl").write_text('{"name": "not a record"}\n', encoding="utf-8")
    record = {"path": "a.png", "status": "ok", "caption": "c", "model": "demo", "params": {}}
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    out = vacap("export", *args, "--to", "out", cwd=tmp_path)
    assert out.returncode == 2
    assert message in " ".join(out.stderr.replace("│", " ").split())
    assert not (tmp_path / "out").exists()


def test_parquet_without_pyarrow_says_how_to_install(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"path": "a.png", "status": "ok", "caption": "c"}\n', encoding="utf-8")
    # pyarrow made unimportable in the CLI's own process, as in an install without the extra.
    block = "import sys; sys.modules['pyarrow'] = None; from vacap.cli import app; app()"
    out = vacap("export", "r.jsonl", "--format", "parquet", "--to", "out", cwd=tmp_path,
                python=[sys.executable, "-c", block])  # fmt: skip
    assert out.returncode == 2
    assert 'pip install ".[parquet]" in vacap\'s checkout' in " ".join(out.stderr.replace("│", " ").split())
    assert not (tmp_path / "out").exists()


# --- an export is whole or absent, and written only inside --to ------------------------------------

VERSIONS = ("A", "B")
IMAGES = 200


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two exports of the same images: records A and B caption them differently, and B's copy of
    every other image has other bytes, so moving B in over A replaces some images and keeps the
    rest. Records hold absolute paths; the files are small, not decoded by export."""
    work = tmp_path_factory.mktemp("versions")
    for version in VERSIONS:
        folder = work / f"src{version}"
        folder.mkdir()
        lines = []
        for i in range(IMAGES):
            kept = "A" if i % 2 else version
            (folder / f"img_{i:03}.png").write_bytes(f"image {i} bytes {kept}\n".encode() * 8)
            record = {"path": str(folder / f"img_{i:03}.png"), "status": "ok", "caption": f"caption {i} {version}"}
            lines.append(json.dumps({**record, "model": "demo", "method": "greedy", "params": {"prompt": "p"}}) + "\n")
        (work / f"{version}.jsonl").write_text("".join(lines), encoding="utf-8")
    return work


def export_args(version: str, fmt: str, to: Path) -> list:
    copy = ["--copy-images"] if fmt == "hf-metadata" else []
    return ["export", f"{version}.jsonl", "--format", fmt, "--to", to, *copy]


def export_version(work: Path, version: str, fmt: str, to: Path, python=None) -> subprocess.CompletedProcess:
    return vacap(*export_args(version, fmt, to), cwd=work, python=python)


def whole_version(work: Path, fmt: str, to: Path) -> str | None:
    """Which export ``to`` holds whole ("A" or "B"), "absent" for no metadata.jsonl, or None for
    anything else; the staging folder is not looked at. hf-metadata is whole when each
    file_name's bytes are those of that version's image."""
    if fmt == "hf-metadata":
        if not (to / "metadata.jsonl").exists():
            return "absent"
        lines = parse(to / "metadata.jsonl")
        for version in VERSIONS:
            expected = [{"file_name": f"img_{i:03}.png", "text": f"caption {i} {version}"} for i in range(IMAGES)]
            source = work / f"src{version}"
            if lines == expected and all((to / n).read_bytes() == (source / n).read_bytes() for n in _names()):
                return version
        return None
    captions = {p.name: p.read_text(encoding="utf-8") for p in to.glob("*.txt")}
    for version in VERSIONS:
        if captions == {f"img_{i:03}.txt": f"caption {i} {version}\n" for i in range(IMAGES)}:
            return version
    return None


def _names() -> list[str]:
    return [f"img_{i:03}.png" for i in range(IMAGES)]


def leftovers(to: Path) -> list[str]:
    return sorted(str(p) for p in to.rglob("*") if p.name.endswith(".tmp") or ".vacap-export" in p.parts)


@pytest.mark.parametrize("fmt", ["hf-metadata", "txt"])
def test_a_killed_export_leaves_the_previous_export_or_the_new_one_whole(versions, tmp_path, fmt):
    """Exports of A and B in turn, each killed (SIGKILL) after a seeded random delay within one
    export's duration: after every kill the folder holds one export whole, unless the kill came
    after the staged export was made ready; then the next export into the folder moves it in
    first. hf-metadata also never has a metadata.jsonl naming an image with other bytes."""
    work, to = versions, tmp_path / "out"
    started = time.monotonic()
    assert export_version(work, "A", fmt, to).returncode == 0 and whole_version(work, fmt, to) == "A"
    duration = time.monotonic() - started  # a whole export; the first part of it is Python starting
    rng = random.Random(23)
    previous = {"A"}  # the export the folder holds whole, or either when one was left ready
    for attempt in range(4):
        version = VERSIONS[(attempt + 1) % 2]
        command = [sys.executable, "-m", "vacap.cli", *map(str, export_args(version, fmt, to))]
        process = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3 * duration, duration))
        process.kill()
        process.wait()
        state = whole_version(work, fmt, to)
        if (to / ".vacap-export" / "ready").exists():  # made, not yet all moved in: no check for txt
            if fmt == "hf-metadata":
                assert state in (*VERSIONS, "absent"), f"attempt {attempt}: metadata.jsonl names other images"
            previous = set(VERSIONS)
        else:
            assert state in previous | {version}, f"attempt {attempt}: the folder holds {state}, not an export whole"
            previous = {state}
    out = export_version(work, "B", fmt, to)
    assert out.returncode == 0, out.stderr
    assert whole_version(work, fmt, to) == "B" and leftovers(to) == []


def test_an_export_killed_while_moving_in_is_finished_by_the_next_one(versions, tmp_path):
    """A run killed at its third rename into place (os.replace made to SIGKILL the process) has
    made B ready: no metadata.jsonl names an image it does not describe meanwhile, and the next
    export into the folder, even of another format, moves B in whole before its own."""
    work, to = versions, tmp_path / "ds"
    first = export_version(work, "A", "hf-metadata", to)
    assert f"{IMAGES} images copied, 0 already there with the same bytes" in first.stderr
    again = export_version(work, "A", "hf-metadata", to)
    assert f"0 images copied, {IMAGES} already there with the same bytes" in again.stderr
    block = (
        "import os, signal, sys\nreplaced = []\n"
        "def replace(*args):\n    replaced.append(args)\n"
        "    if len(replaced) == 3: os.kill(os.getpid(), signal.SIGKILL)\n    real(*args)\n"
        "real, os.replace = os.replace, replace\nfrom vacap.cli import app\napp()"
    )
    killed = export_version(work, "B", "hf-metadata", to, python=[sys.executable, "-c", block])
    assert killed.returncode == -9
    assert (to / ".vacap-export" / "ready").is_dir() and whole_version(work, "hf-metadata", to) == "absent"
    changed = sum((to / n).read_bytes() == (work / "srcB" / n).read_bytes() != (work / "srcA" / n).read_bytes()
                  for n in _names())  # fmt: skip
    assert changed == 2
    out = export_version(work, "A", "csv", to)
    assert out.returncode == 0, out.stderr
    assert f"finished first the export a stopped run had left ready in {to}" in out.stderr
    assert whole_version(work, "hf-metadata", to) == "B" and (to / "captions.csv").exists() and leftovers(to) == []
    rerun = export_version(work, "B", "hf-metadata", to)
    assert f"0 images copied, {IMAGES} already there with the same bytes" in rerun.stderr


def test_csv_cells_that_spreadsheets_run_as_formulas_are_escaped(tmp_path):
    """OWASP's rule: a cell starting with = + - @ tab or CR gets a leading '; parquet stays raw."""
    import pyarrow.parquet as pq

    captions = ['=HYPERLINK("http://x.example","click")', "+1+2", "-3", "@SUM(A1)", "\tx", "\rx", "a = b"]
    record = {"status": "ok", "model": "demo", "method": "greedy", "params": {"prompt": "p"}}
    lines = [{**record, "path": f"-{i}.png", "caption": caption} for i, caption in enumerate(captions)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    for fmt in ("csv", "parquet"):
        out = vacap("export", "r.jsonl", "--format", fmt, "--to", "out", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
    with open(tmp_path / "out" / "captions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["caption"] for row in rows] == ["'" + c for c in captions[:-1]] + ["a = b"]
    assert [row["path"] for row in rows] == [f"'-{i}.png" for i in range(len(captions))]
    table = pq.read_table(tmp_path / "out" / "captions.parquet").to_pylist()
    assert [row["caption"] for row in table] == captions
    assert [row["path"] for row in table] == [r["path"] for r in lines]


def test_a_record_naming_no_file_writes_nothing_outside(tmp_path):
    """A records file whose path is / once gave out.txt beside out, and a traceback with --to ."""
    record = {"status": "ok", "model": "demo", "method": "greedy", "params": {"prompt": "p"}}
    lines = [{**record, "path": "/", "caption": "root"}, {**record, "path": "pics/a.png", "caption": "a"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    for to in ("out", "."):
        out = vacap("export", "r.jsonl", "--format", "txt", "--to", to, cwd=tmp_path)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert "left out: 1 files that cannot be written: / (names no file)" in out.stderr
        assert (tmp_path / to / "a.txt").read_text(encoding="utf-8") == "a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out", "r.jsonl"]


def test_copy_images_never_write_through_a_link_in_the_folder(tmp_path):
    """A link in --to to a folder elsewhere is not written through (its image is left out), and
    a link where an image goes is replaced, even when its target has the image's bytes."""
    source, to, elsewhere = tmp_path / "src", tmp_path / "ds", tmp_path / "elsewhere"
    (source / "sub").mkdir(parents=True)
    (elsewhere / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        (source / name).write_bytes(name.encode())
    (elsewhere / "a.png").write_bytes(b"a.png")
    (elsewhere / "sub" / "c.png").write_bytes(b"sub/c.png")  # same bytes: still not named through the link
    (elsewhere / "b.png").write_bytes(b"not yours")
    to.mkdir()
    for name in ("sub", "a.png", "b.png"):
        (to / name).symlink_to(elsewhere / name)
    (elsewhere / "staged").mkdir()
    (to / ".vacap-export").symlink_to(elsewhere / "staged")  # where vacap stages: the link is removed
    record = {"status": "ok", "model": "demo", "method": "greedy", "params": {"prompt": "p"}}
    lines = [{**record, "path": str(source / name), "caption": name} for name in ("a.png", "b.png", "sub/c.png")]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    out = vacap("export", "r.jsonl", "--format", "hf-metadata", "--copy-images", "--to", to, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"left out: 1 files that cannot be written: {source / 'sub/c.png'} (" in out.stderr
    assert "would be written outside" in out.stderr
    assert list((elsewhere / "sub").iterdir()) == [elsewhere / "sub" / "c.png"]
    assert (elsewhere / "b.png").read_bytes() == b"not yours" and list((elsewhere / "staged").iterdir()) == []
    assert not os.path.lexists(to / ".vacap-export")
    for name in ("a.png", "b.png"):
        assert not (to / name).is_symlink() and (to / name).read_bytes() == name.encode()
    assert [line["file_name"] for line in parse(to / "metadata.jsonl")] == ["a.png", "b.png"]


def test_file_names_at_the_length_limit(tmp_path):
    """A 255-byte image name exports (its caption file and copy are 255 bytes too) with no
    temporary left; an image whose caption file name would pass 255 bytes is left out, saying so."""
    record = {"status": "ok", "model": "demo", "method": "greedy", "params": {"prompt": "p"}}
    long_name, longer = "x" * 251 + ".png", "y" * 255
    (tmp_path / "pics").mkdir()
    for name in (long_name, longer):
        (tmp_path / "pics" / name).write_bytes(name.encode())
    lines = [{**record, "path": f"pics/{name}", "caption": name[:4]} for name in (long_name, longer)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    out = vacap("export", "r.jsonl", "--format", "txt", "--to", "out", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"left out: 1 files that cannot be written: pics/{longer} (File name too long)" in out.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x" * 251 + ".txt"]
    out = vacap("export", "r.jsonl", "--format", "hf-metadata", "--copy-images", "--to", "ds", cwd=tmp_path)
    assert out.returncode == 0 and "2 images copied" in out.stderr
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted([long_name, longer, "metadata.jsonl"])
    assert leftovers(tmp_path) == []


def test_an_export_into_a_folder_another_export_holds_is_refused(tmp_path):
    """While another process holds the folder's lock (an export running), an export into it
    exits 2 saying so, and leaves that export's staging folder alone."""
    import fcntl

    record = {"path": "a.png", "status": "ok", "caption": "c", "model": "demo", "params": {}}
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    staged = tmp_path / "out" / ".vacap-export" / "new"
    staged.mkdir(parents=True)
    (staged / "a.txt").write_text("being written", encoding="utf-8")
    fd = os.open(tmp_path / "out", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        out = vacap("export", "r.jsonl", "--format", "txt", "--to", "out", cwd=tmp_path)
    finally:
        os.close(fd)
    assert out.returncode == 2 and "another vacap export is writing into out" in out.stderr
    assert (staged / "a.txt").read_text(encoding="utf-8") == "being written"
    out = vacap("export", "r.jsonl", "--format", "txt", "--to", "out", cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "out" / "a.txt").read_text(encoding="utf-8") == "c\n"
    assert leftovers(tmp_path / "out") == []

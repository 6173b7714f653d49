"""`vacap export` as a user runs it: records from a real `vacap caption --model demo` run, each
format read back by what reads it in the wild (csv module, pyarrow, datasets' imagefolder)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
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
        assert sidecar.read_bytes() == record["caption"].encode("utf-8")


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
    assert captions == sorted(r["caption"] for r in other)


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
    assert (tmp_path / "out" / "b.txt").read_text(encoding="utf-8") == lines[2]["caption"]
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
    assert "pip install 'vacap[parquet]'" in " ".join(out.stderr.replace("│", " ").split())
    assert not (tmp_path / "out").exists()

"""The consumers of a record's ``risk`` object (``vacap caption --risk``): ``vacap export
--max-risk/--mark-risk`` and ``vacap show --by risk``, run as a user runs them on records
written by hand for real images, each format read back by what reads it in the wild."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
SIGNALS = {"entropy": 1.2, "neg_logprob": 0.9, "neg_margin": -0.3, "branch_log_ratio": -1.1}
BASE = {"status": "ok", "error": None, "model": "demo", "method": "greedy", "params": {"prompt": "Describe."}}


def vacap(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vacap.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)  # fmt: skip


def flat(text: str) -> str:
    """stderr with click's usage box taken apart, so a message wrapped in it reads as one line."""
    return " ".join(text.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def mention(caption: str, word: str, obj: str, score: float | None, token: int) -> dict:
    start = caption.index(word)
    return {"text": word, "start": start, "end": start + len(word), "object": obj, "score": score, "token": token,
            "signals": SIGNALS}  # fmt: skip


def scored(path: str, caption: str, *mentions: tuple) -> dict:
    """An ok record whose risk object has ``mentions`` (word, object, score); its score is the
    highest mention score, or None when none has one, as vacap writes it."""
    entries = [mention(caption, word, obj, score, i) for i, (word, obj, score) in enumerate(mentions)]
    scores = [m["score"] for m in entries if m["score"] is not None]
    return {**BASE, "path": path, "caption": caption, "risk": {"score": max(scores, default=None), "mentions": entries}}


# Caption scores: 0.83, 0.5, null (no known object word), 0.1 (one mention has no score), 0.5001.
RECORDS = [
    scored("imgs/scene_1.png", "A dog sits beside a red car.", ("dog", "dog", 0.83), ("car", "car", 0.2)),
    scored("imgs/scene_2.png", "A cat on a sofa.", ("cat", "cat", 0.5), ("sofa", "couch", 0.125)),
    scored("imgs/scene_3.png", "Blue sky over green hills."),
    scored("imgs/scene_4.png", "A person holds an umbrella.", ("person", "person", 0.1), ("umbrella", "umbrella", None)),
    scored("imgs/sub/house.jpg", "A house with a bench.", ("bench", "bench", 0.5001)),
]
SCORES = {r["path"]: r["risk"]["score"] for r in RECORDS}
UNSCORED = {**BASE, "path": "imgs/shapes_square.png", "caption": "A black square."}  # captioned without --risk
ERROR = {**BASE, "path": "imgs/broken.png", "status": "error", "error": "cannot identify image", "caption": None}


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def work(tmp_path) -> Path:
    """Real images under imgs/ and records.jsonl beside it: the scored records, one captioned
    without --risk, and an error record."""
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for record in [*RECORDS, UNSCORED]:
        name = Path(record["path"]).name
        shutil.copy(SAMPLES / name, tmp_path / record["path"])
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a picture")
    write(tmp_path / "records.jsonl", [*RECORDS, UNSCORED, ERROR])
    return tmp_path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --- export --max-risk ---------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0.5, 0.1, 0.0, 1.0])
def test_max_risk_keeps_exactly_the_captions_at_or_below_it(work, limit):
    out = vacap("export", "records.jsonl", "--format", "csv", "--to", "out", "--max-risk", limit, cwd=work)
    assert out.returncode == 0, out.stderr
    kept = {path for path, score in SCORES.items() if score is None or score <= limit}
    rows = read_csv(work / "out" / "captions.csv")
    assert {row["path"] for row in rows} == kept
    assert "risk" not in rows[0]  # the column is --mark-risk's
    above = sum(score is not None and score > limit for score in SCORES.values())
    lines = out.stderr.splitlines()
    assert f"exported {len(kept)} captions to out/captions.csv" in lines
    assert ("left out: %d captions with a risk score above %s" % (above, limit) in lines) == (above > 0)
    assert "left out: 1 captions with no risk score (captioned without --risk)" in lines
    assert "kept: 1 captions with a null risk score (they name no known object)" in lines
    assert "left out: 1 images with only error records" in lines


def test_max_risk_boundary_is_kept(work):
    """A caption scored exactly X stays; one a hair above it goes."""
    out = vacap("export", "records.jsonl", "--format", "csv", "--to", "out", "--max-risk", "0.5", cwd=work)
    assert out.returncode == 0, out.stderr
    paths = {row["path"] for row in read_csv(work / "out" / "captions.csv")}
    assert "imgs/scene_2.png" in paths and "imgs/sub/house.jpg" not in paths
    assert "left out: 2 captions with a risk score above 0.5" in out.stderr.splitlines()


def test_max_risk_with_txt_writes_only_the_kept_caption_files(work):
    out = vacap("export", "records.jsonl", "--format", "txt", "--to", "out", "--max-risk", "0.3", cwd=work)
    assert out.returncode == 0, out.stderr
    written = sorted(p.relative_to(work / "out").as_posix() for p in (work / "out").rglob("*") if p.is_file())
    assert written == ["scene_3.txt", "scene_4.txt"]
    assert (work / "out" / "scene_4.txt").read_text(encoding="utf-8") == "A person holds an umbrella.\n"


def test_max_risk_leaving_nothing_says_why(work):
    only = write(work / "only.jsonl", [RECORDS[0], RECORDS[1], ERROR])
    out = vacap("export", only, "--format", "csv", "--to", "out", "--max-risk", "0.2", cwd=work)
    assert out.returncode == 1 and not (work / "out").exists()
    assert out.stderr.splitlines() == [
        "error: no ok caption to export (2 captions have a risk score above --max-risk 0.2, "
        "1 images have only error records)"
    ]


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "high"])
def test_max_risk_outside_zero_to_one_is_a_usage_error(work, value):
    out = vacap("export", "records.jsonl", "--format", "csv", "--to", "out", "--max-risk", value, cwd=work)
    assert out.returncode == 2 and not (work / "out").exists()
    message = "--max-risk must be in [0, 1]" if value != "high" else "Invalid value for '--max-risk'"
    assert message in flat(out.stderr)


@pytest.mark.parametrize("flags", [["--max-risk", "0.5"], ["--mark-risk"], ["--max-risk", "0.5", "--mark-risk"]])
def test_records_without_any_risk_are_a_usage_error(work, flags):
    plain = write(work / "plain.jsonl", [{k: v for k, v in r.items() if k != "risk"} for r in RECORDS])
    out = vacap("export", plain, "--format", "csv", "--to", "out", *flags, cwd=work)
    assert out.returncode == 2 and not (work / "out").exists()
    named = " and ".join(flag for flag in flags if flag.startswith("--"))
    assert f"{named} needs risk scores, and none of the 5 captions to export has one: caption with vacap " \
        "caption --risk first" in flat(out.stderr)  # fmt: skip


def test_without_risk_flags_records_without_risk_export_as_before(work):
    out = vacap("export", "records.jsonl", "--format", "csv", "--to", "out", cwd=work)
    assert out.returncode == 0, out.stderr
    assert len(read_csv(work / "out" / "captions.csv")) == len(RECORDS) + 1
    assert "risk" not in out.stderr


def test_a_malformed_risk_object_is_refused(work):
    bad = write(work / "bad.jsonl", [RECORDS[0], {**RECORDS[1], "risk": {"score": "high", "mentions": []}}])
    out = vacap("export", bad, "--format", "csv", "--to", "out", "--max-risk", "0.5", cwd=work)
    assert out.returncode == 2 and not (work / "out").exists()
    assert "the risk object of imgs/scene_2.png is not one vacap writes (score 'high')" in flat(out.stderr)


# --- export --mark-risk --------------------------------------------------------------------------


def test_mark_risk_csv_column(work):
    out = vacap("export", "records.jsonl", "--format", "csv", "--to", "out", "--mark-risk", cwd=work)
    assert out.returncode == 0, out.stderr
    with open(work / "out" / "captions.csv", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header[:3] == ["path", "caption", "risk"]
    rows = read_csv(work / "out" / "captions.csv")
    assert {row["path"]: row["risk"] for row in rows} == {
        path: "" if score is None else repr(score) for path, score in SCORES.items()
    }
    assert "left out: 1 captions with no risk score (captioned without --risk)" in out.stderr.splitlines()
    assert "kept: 1 captions with a null risk score (they name no known object)" in out.stderr.splitlines()


def test_mark_risk_parquet_column(work):
    import pyarrow.parquet as pq

    out = vacap("export", "records.jsonl", "--format", "parquet", "--to", "out", "--mark-risk", "--max-risk", "0.5",
                cwd=work)  # fmt: skip
    assert out.returncode == 0, out.stderr
    table = pq.read_table(work / "out" / "captions.parquet")
    assert str(table.schema.field("risk").type) == "double"
    assert table.column_names[:3] == ["path", "caption", "risk"]
    assert {row["path"]: row["risk"] for row in table.to_pylist()} == {
        path: score for path, score in SCORES.items() if score is None or score <= 0.5
    }


def test_parquet_without_mark_risk_has_no_risk_column(work):
    import pyarrow.parquet as pq

    out = vacap("export", "records.jsonl", "--format", "parquet", "--to", "out", cwd=work)
    assert out.returncode == 0, out.stderr
    assert "risk" not in pq.read_table(work / "out" / "captions.parquet").column_names


def test_mark_risk_hf_metadata_loads_as_an_imagefolder_column(work):
    from datasets import load_dataset
    from PIL import Image

    out = vacap("export", "records.jsonl", "--format", "hf-metadata", "--to", "imgs", "--mark-risk", cwd=work)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in (work / "imgs" / "metadata.jsonl").read_text("utf-8").splitlines()]
    assert {line["file_name"]: line["risk"] for line in lines} == {
        Path(path).relative_to("imgs").as_posix(): score for path, score in SCORES.items()
    }
    rows = list(load_dataset("imagefolder", data_dir=str(work / "imgs"), split="train", cache_dir=str(work / "cache")))
    by_text = {row["text"]: row["risk"] for row in rows}
    assert by_text == {r["caption"]: r["risk"]["score"] for r in RECORDS}
    with Image.open(work / "imgs" / "sub" / "house.jpg") as house:
        assert [row["image"].size for row in rows if row["text"] == RECORDS[4]["caption"]] == [house.size]


def test_mark_risk_with_txt_is_a_usage_error(work):
    out = vacap("export", "records.jsonl", "--format", "txt", "--to", "out", "--mark-risk", cwd=work)
    assert out.returncode == 2 and not (work / "out").exists()
    assert "Usage:" in out.stderr
    assert "--mark-risk writes a risk score beside each caption, and a txt caption file has no place for it" in flat(
        out.stderr
    )


# --- show --by risk ------------------------------------------------------------------------------


def render(record: dict, color_system: str) -> str:
    from rich.console import Console

    from vacap.show import render as show

    console = Console(file=io.StringIO(), color_system=color_system, force_terminal=True, width=200)
    console.print(show(record, console.color_system, by="risk"))
    return console.file.getvalue()


def shaded(line: str) -> list[tuple[str, str]]:
    """(text, SGR codes) of each piece of ``line`` printed with a background."""
    return [(text, codes) for codes, text in re.findall(r"\x1b\[([0-9;]+)m([^\x1b]*)", line) if codes != "0"]


def codes(style: str, color_system: str) -> str:
    """The SGR codes a terminal of ``color_system`` gets for text in ``style``."""
    from rich.console import Console
    from rich.text import Text

    console = Console(file=io.StringIO(), color_system=color_system, force_terminal=True)
    console.print(Text("x", style=style), end="")
    return shaded(console.file.getvalue())[0][1]


@pytest.mark.parametrize("color_system", ["truecolor", "256", "standard"])
def test_show_by_risk_shades_exactly_the_object_words(color_system):
    from vacap.show import _shade

    record = RECORDS[0]  # dog 0.83, car 0.2
    caption_line = render(record, color_system).splitlines()[1]
    assert re.sub(r"\x1b\[[0-9;]*m", "", caption_line) == record["caption"]
    expected = [(m["text"], codes(_shade(m["score"], color_system), color_system)) for m in record["risk"]["mentions"]]
    assert shaded(caption_line) == expected
    assert expected[0][1] != expected[1][1]  # 0.83 and 0.2 differ on every ramp


def test_show_by_risk_spans_with_rich_text():
    from vacap.show import _shade, render as show

    record = RECORDS[3]  # person 0.1, umbrella with no score
    text = show(record, "truecolor", by="risk")
    header = len(f"{record['path']}  [greedy]\n")
    spans = [(s.start - header, s.end - header, str(s.style)) for s in text.spans if s.style and s.start >= header]
    caption_spans = [s for s in spans if s[1] <= len(record["caption"])]
    start = record["caption"].index("person")
    assert caption_spans == [(start, start + len("person"), _shade(0.1, "truecolor"))]  # umbrella: unshaded


def test_show_by_risk_lists_the_mentions(work):
    out = vacap("show", "records.jsonl", "--image", "scene_4.png", "--by", "risk", cwd=work)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert ["A", "person", "holds", "an", "umbrella."] in lines
    assert ["caption", "risk", "0.100", "(its", "highest", "object", "word)"] in lines
    assert ["person", "person", "0.100"] in lines and ["umbrella", "umbrella", "none"] in lines
    two = vacap("show", "records.jsonl", "--image", "scene_2.png", "--by", "risk", cwd=work)
    assert ["cat", "cat", "0.500"] in [line.split() for line in two.stdout.splitlines()]
    assert ["sofa", "couch", "0.125"] in [line.split() for line in two.stdout.splitlines()]
    none = vacap("show", "records.jsonl", "--image", "scene_3.png", "--by", "risk", cwd=work)
    assert "caption risk: none (no known object word in this caption)" in none.stdout


def test_show_by_risk_without_risk_is_one_error_line(work):
    out = vacap("show", "records.jsonl", "--image", "shapes_square.png", "--by", "risk", cwd=work)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "error: the record of imgs/shapes_square.png [greedy] has no risk scores: caption with --risk to score "
        "its object words"
    ]
    # The attention view of the same record is unchanged.
    assert vacap("show", "records.jsonl", "--image", "shapes_square.png", cwd=work).returncode == 0


def test_show_by_risk_with_heatmap_is_a_usage_error(work):
    out = vacap("show", "records.jsonl", "--image", "scene_1.png", "--by", "risk", "--heatmap", "h.png", cwd=work)
    assert out.returncode == 2 and "Usage:" in out.stderr
    assert "--heatmap draws attention, not risk" in flat(out.stderr)
    assert not (work / "h.png").exists()
    bad = vacap("show", "records.jsonl", "--image", "scene_1.png", "--by", "words", cwd=work)
    assert bad.returncode == 2 and "'words' is not one of attention, risk" in flat(bad.stderr)


def test_show_by_risk_refuses_a_span_that_misses_its_word(work):
    record = json.loads(json.dumps(RECORDS[0]))
    record["risk"]["mentions"][0]["start"] += 1
    write(work / "edited.jsonl", [record])
    out = vacap("show", "edited.jsonl", "--image", "scene_1.png", "--by", "risk", cwd=work)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [
        "error: the risk object of imgs/scene_1.png is not one vacap writes for its caption (at mention 'dog', "
        "characters 3 to 5); was the file edited?"
    ]

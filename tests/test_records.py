import base64
import json
import logging
import os
import subprocess
import sys

import pytest

import vacap
from vacap.records import RECORD_KEYS, NotRecords, OutputError, RecordWriter, make_record, scan, settings_key

MODEL = "llava-hf/llava-1.5-7b-hf"
PARAMS = {"method": "vasparse", "sparsity": 0.5, "max_new_tokens": 128}


def record(path="a.jpg", status="ok", sha256="aaa", params=PARAMS, model=MODEL, **fields):
    if status == "ok":
        fields.setdefault("caption", "A cat.")
    elif status == "error":
        fields.setdefault("error", "boom")
    return make_record(
        path=path, status=status, model=model, method="vasparse", params=params, sha256=sha256, **fields
    )


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- records ---------------------------------------------------------------------------------


def test_record_key_order_and_extras_last():
    rec = make_record(
        path="x.png", status="ok", model=MODEL, method="greedy", params={}, diagnostics={"n": 1}
    )
    assert list(rec) == [*RECORD_KEYS, "diagnostics"]
    assert rec["vacap_version"] == vacap.__version__
    assert rec["tokens"] is None and rec["width"] is None


def test_record_rejects_unknown_status_and_clashing_extras():
    with pytest.raises(ValueError, match="status"):
        make_record(path="x", status="done", model=MODEL, method="greedy", params={})
    with pytest.raises(ValueError, match="vacap_version"):
        make_record(path="x", status="ok", model=MODEL, method="greedy", params={}, vacap_version="9")


def test_settings_key_is_canonical():
    assert settings_key(MODEL, {"a": 1, "b": 0.5}) == settings_key(MODEL, {"b": 0.5, "a": 1})
    assert settings_key(MODEL, {"a": 1}) != settings_key(MODEL, {"a": 2})
    assert settings_key(MODEL, {"a": 1}) != settings_key("other/model", {"a": 1})
    assert len(settings_key(MODEL, {})) == 64


# --- writing ---------------------------------------------------------------------------------


def test_round_trip_with_unicode(tmp_path):
    out = tmp_path / "out.jsonl"
    caption = "Ein Bär läuft über die Straße 🐻 — 猫"
    with RecordWriter(out) as writer:
        writer.write(record(caption=caption, tokens=7, seconds=1.25, width=64, height=32))

    text = out.read_text(encoding="utf-8")
    assert caption in text  # stored as UTF-8, not \u escapes
    assert text.endswith("}\n") and text.count("\n") == 1
    (back,) = read_lines(out)
    assert back["caption"] == caption
    assert list(back) == list(RECORD_KEYS)
    assert (back["tokens"], back["seconds"], back["width"], back["height"]) == (7, 1.25, 64, 32)


def test_each_record_is_visible_before_close(tmp_path):
    out = tmp_path / "out.jsonl"
    with RecordWriter(out) as writer:
        writer.write(record("a.jpg"))
        assert [r["path"] for r in read_lines(out)] == ["a.jpg"]
        writer.write(record("b.jpg"))
        assert [r["path"] for r in read_lines(out)] == ["a.jpg", "b.jpg"]


def test_parent_directory_is_created(tmp_path):
    out = tmp_path / "new" / "deeper" / "out.jsonl"
    with RecordWriter(out) as writer:
        writer.write(record())
    assert len(read_lines(out)) == 1


# --- resume ----------------------------------------------------------------------------------


def first_run(out):
    with RecordWriter(out) as writer:
        writer.write(record("a.jpg", sha256="aaa"))
        writer.write(record("b.jpg", status="error", sha256="bbb"))
        writer.write(record("c.jpg", sha256="ccc"))


def test_resume_skip_logic(tmp_path):
    out = tmp_path / "out.jsonl"
    first_run(out)
    key = settings_key(MODEL, PARAMS)

    with RecordWriter(out) as writer:
        assert writer.previously_done == 2
        assert writer.is_done("a.jpg", "aaa", key)
        assert writer.is_done("c.jpg", "ccc", key)
        assert not writer.is_done("b.jpg", "bbb", key)  # errors are retried
        assert not writer.is_done("a.jpg", "changed", key)  # file changed since
        assert not writer.is_done("a.jpg", "aaa", settings_key(MODEL, {**PARAMS, "sparsity": 0.9}))
        assert not writer.is_done("a.jpg", "aaa", settings_key("other/model", PARAMS))
        assert not writer.is_done("d.jpg", "ddd", key)
        writer.write(record("b.jpg", sha256="bbb"))

    lines = read_lines(out)
    assert [(r["path"], r["status"]) for r in lines] == [
        ("a.jpg", "ok"), ("b.jpg", "error"), ("c.jpg", "ok"), ("b.jpg", "ok")
    ]
    with RecordWriter(out) as writer:
        assert writer.previously_done == 3
        assert writer.is_done("b.jpg", "bbb", key)


def test_records_written_in_this_run_count_as_done(tmp_path):
    with RecordWriter(tmp_path / "out.jsonl") as writer:
        writer.write(record("a.jpg", sha256="aaa"))
        writer.write(record("e.jpg", status="error", sha256="eee"))
        assert writer.is_done("a.jpg", "aaa", settings_key(MODEL, PARAMS))
        assert not writer.is_done("e.jpg", "eee", settings_key(MODEL, PARAMS))
        assert writer.previously_done == 0


def test_truncated_last_line_is_repaired(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    first_run(out)
    complete = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"path": "d.jpg", "status": "ok", "capt')

    with caplog.at_level(logging.WARNING, logger="vacap"):
        writer = RecordWriter(out)
    with writer:
        assert out.read_bytes() == complete
        assert writer.previously_done == 2
        writer.write(record("d.jpg", sha256="ddd"))

    assert "broken last line" in caplog.text
    assert [r["path"] for r in read_lines(out)] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


def test_complete_record_missing_only_its_newline_is_kept(tmp_path):
    out = tmp_path / "out.jsonl"
    first_run(out)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))

    with RecordWriter(out) as writer:
        assert writer.previously_done == 2
        writer.write(record("d.jpg", sha256="ddd"))

    assert [r["path"] for r in read_lines(out)] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


# --- refusing what is not vacap's --------------------------------------------------------------

GOOD = json.dumps(record("a.jpg", sha256="aaa"))


@pytest.mark.parametrize(
    "content, where",
    [
        # A complete line cannot be a torn write, even as the last line.
        (f"{GOOD}\n" + '{"path": "d.jpg", "sta\n', "line 2 is not JSON"),
        (f"{GOOD}\nthis is not json\n{GOOD}\n", "line 2 is not JSON"),
        (f'{GOOD}\n[1, 2]\n', "line 2 is JSON but not a vacap record"),
        ('{"name": "x", "status": "ok"}\n', "line 1 is JSON but not a vacap record"),
        (b"\xff\xfe garbage\n" + GOOD.encode() + b"\n", "line 1 is not UTF-8 text"),
        # A CSV whose last row has no newline: that row is not how a record line begins.
        ("name,caption\na.jpg,a cat\nb.jpg,a dog", "line 1 is not JSON"),
        (f"{GOOD}\nb.jpg,a dog", "line 2 is not JSON"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 40, "line 1 is not UTF-8 text"),
    ],
)
def test_a_file_that_is_not_vacap_records_is_refused_untouched(tmp_path, content, where):
    out = tmp_path / "mine.dat"
    data = content if isinstance(content, bytes) else content.encode()
    out.write_bytes(data)
    for resume in (True, False):
        with pytest.raises(OutputError, match="--overwrite") as refused:
            RecordWriter(out, resume=resume)
        assert where in str(refused.value)
        assert str(out) in str(refused.value)
        assert out.read_bytes() == data
    # The refusal released the lock: the file can still be opened, here to be replaced.
    with RecordWriter(out, overwrite=True) as writer:
        writer.write(record("z.jpg"))
    assert [r["path"] for r in read_lines(out)] == ["z.jpg"]


@pytest.mark.parametrize("tail", [b'{"path": "d.j', b'{"pa', b"{"])
def test_only_an_unterminated_line_that_begins_like_a_record_counts_as_torn(tail):
    good = f"{GOOD}\n\n{GOOD}\n".encode()
    records, intact = scan(good + tail)
    assert len(records) == 2 and intact == len(good)
    with pytest.raises(NotRecords, match="line 4"):
        scan(good + tail + b"\n")
    with pytest.raises(NotRecords, match="line 4"):
        scan(good + b"x" + tail)
    assert scan(b"") == ([], 0)
    assert scan(good + b"  ") == (records, len(good)), "a blank unterminated tail is cut too"


def test_overwrite_replaces_the_content_at_the_first_record(tmp_path):
    out = tmp_path / "out.jsonl"
    first_run(out)
    before = out.read_bytes()
    with RecordWriter(out, overwrite=True) as writer:
        assert writer.previously_done == 0
        assert not writer.is_done("a.jpg", "aaa", settings_key(MODEL, PARAMS))
        assert out.read_bytes() == before  # a run that stops before its first record loses nothing
        writer.write(record("z.jpg"))
        assert [r["path"] for r in read_lines(out)] == ["z.jpg"]
    with RecordWriter(out, overwrite=True):
        pass
    assert [r["path"] for r in read_lines(out)] == ["z.jpg"]


def test_replacing_checks_the_old_content_and_resumes_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    first_run(out)
    with open(out, "ab") as f:
        f.write(b'{"path": "torn')
    with RecordWriter(out, resume=False) as writer:
        assert writer.previously_done == 0
        writer.write(record("z.jpg"))
    assert [r["path"] for r in read_lines(out)] == ["z.jpg"]


def test_a_file_created_but_never_written_is_removed(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    with RecordWriter(out):
        assert out.exists()
    assert not out.exists()
    out.write_bytes(b"")
    with RecordWriter(out):
        pass
    assert out.exists(), "a file that was there before stays"


@pytest.mark.parametrize("make", ["directory", "parent is a file"])
def test_unusable_output_paths_are_an_output_error(tmp_path, make):
    if make == "directory":
        out = tmp_path / "folder"
        out.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out.jsonl"
    with pytest.raises(OutputError, match="cannot write to"):
        RecordWriter(out)


# --- names that are not UTF-8 ------------------------------------------------------------------

RAW_NAME = b"caf\xe9 \xff.png"


def test_a_name_that_is_not_utf8_gives_valid_json_and_its_bytes():
    path = os.fsdecode(b"/pics/" + RAW_NAME)  # how os.listdir hands such a name to Python
    rec = record(path, error="cannot read " + path, status="error")
    line = json.dumps(rec, ensure_ascii=False).encode("utf-8")
    assert b"\\ud" not in line and b"\\xe9" in line  # no surrogate escapes, readable \xNN
    back = json.loads(line)
    assert back["path"] == "/pics/caf\\xe9 \\xff.png"
    assert base64.b64decode(back["path_bytes"]) == b"/pics/" + RAW_NAME
    assert os.fsdecode(base64.b64decode(back["path_bytes"])) == path
    assert back["error"] == "cannot read /pics/caf\\xe9 \\xff.png"
    assert list(back)[: len(RECORD_KEYS) + 1] == [*RECORD_KEYS, "path_bytes"]
    assert "path_bytes" not in record("/pics/café.png")


def test_resume_recognises_a_name_that_is_not_utf8(tmp_path):
    out = tmp_path / "out.jsonl"
    path = os.fsdecode(b"/pics/" + RAW_NAME)
    # The prompt can hold such bytes too (from the command line); the key must still match.
    params = {**PARAMS, "prompt": os.fsdecode(b"d\xe9cris")}
    with RecordWriter(out) as writer:
        writer.write(record(path, params=params))
        # A name that reads the same but really has a backslash is another file.
        writer.write(record("/pics/caf\\xe9 \\xff.png", sha256="bbb", params=params))
    out.read_bytes().decode("utf-8")
    key = settings_key(MODEL, params)
    with RecordWriter(out) as writer:
        assert writer.previously_done == 2
        assert writer.is_done(path, "aaa", key)
        assert not writer.is_done(path, "bbb", key)
        assert writer.is_done("/pics/caf\\xe9 \\xff.png", "bbb", key)


# --- stdout ----------------------------------------------------------------------------------

STDOUT_SCRIPT = """
import os, sys
from vacap.records import RecordWriter, make_record
writer = RecordWriter(None if sys.argv[1] == "none" else sys.argv[1])
print("header from print", flush=False)
for name in ("a.jpg", "b.jpg"):
    writer.write(make_record(path=name, status="ok", model="m", method="greedy", params={},
                             caption="Bär 🐻"))
assert not writer.is_done("a.jpg", None, "x")
os._exit(0)  # skips interpreter shutdown: only lines flushed by write() survive
"""


@pytest.mark.parametrize("target", [None, "-"])
def test_stdout_records_are_flushed_utf8_lines(target):
    # Buffered stdout, so a missing flush would lose lines; an ASCII console encoding proves
    # records bypass the text layer and stay UTF-8.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONIOENCODING"] = "ascii"
    arg = "none" if target is None else target
    command = [sys.executable, "-c", STDOUT_SCRIPT, arg]
    result = subprocess.run(command, capture_output=True, env=env, check=True)

    lines = result.stdout.decode("utf-8").splitlines()
    assert lines[0] == "header from print"  # earlier text output keeps its place
    records = [json.loads(line) for line in lines[1:]]
    assert [r["path"] for r in records] == ["a.jpg", "b.jpg"]
    assert all(r["caption"] == "Bär 🐻" for r in records)
    assert result.stderr == b""

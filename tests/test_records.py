import json
import logging
import os
import subprocess
import sys

import pytest

import vacap
from vacap.records import RECORD_KEYS, RecordWriter, make_record, settings_key

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


def test_invalid_last_line_with_newline_is_removed(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    first_run(out)
    complete = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"path": "d.jpg", "sta\n')
    with caplog.at_level(logging.WARNING, logger="vacap"), RecordWriter(out):
        pass
    assert out.read_bytes() == complete
    assert "broken last line" in caplog.text


def test_complete_last_record_missing_its_newline_is_kept(tmp_path):
    out = tmp_path / "out.jsonl"
    first_run(out)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))

    with RecordWriter(out) as writer:
        assert writer.previously_done == 2
        writer.write(record("d.jpg", sha256="ddd"))

    assert [r["path"] for r in read_lines(out)] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


def test_garbage_middle_line_is_ignored_and_kept(tmp_path, caplog):
    out = tmp_path / "out.jsonl"
    good = json.dumps(record("a.jpg", sha256="aaa"))
    other = json.dumps(record("c.jpg", sha256="ccc"))
    content = f"{good}\nthis is not json\n[1, 2]\n\n{other}\n".encode()
    out.write_bytes(content)

    with caplog.at_level(logging.WARNING, logger="vacap"), RecordWriter(out) as writer:
        assert writer.previously_done == 2
        assert writer.is_done("c.jpg", "ccc", settings_key(MODEL, PARAMS))

    assert out.read_bytes() == content  # user data is never rewritten
    assert "line 2" in caplog.text and "line 3" in caplog.text
    assert "line 4" not in caplog.text  # blank lines are not worth a warning


def test_invalid_utf8_line_is_ignored(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"\xff\xfe garbage\n" + json.dumps(record()).encode() + b"\n")
    with RecordWriter(out) as writer:
        assert writer.previously_done == 1


def test_overwrite_truncates(tmp_path):
    out = tmp_path / "out.jsonl"
    first_run(out)
    with RecordWriter(out, overwrite=True) as writer:
        assert out.read_bytes() == b""
        assert writer.previously_done == 0
        assert not writer.is_done("a.jpg", "aaa", settings_key(MODEL, PARAMS))
        writer.write(record("z.jpg"))
    assert [r["path"] for r in read_lines(out)] == ["z.jpg"]


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

"""Choosing the images of a run: --files-from, --include/--exclude, --shard, --limit, and
per-image prompts (--prompt-file). Pure functions on a real folder tree, then the CLI with the
demo model in real subprocesses."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vacap.images import discover, glob_matches, read_path_list, select

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
TREE = ["a.png", "b.jpg", "raw/c.png", "raw/deep/d.png", "keep/e.png", "keep/raw.png", "x/raw/f.webp", "g.PNG"]
DEMO = ["--model", "demo", "--dtype", "fp32", "--method", "greedy", "--max-new-tokens", "3"]


def vacap(*args, cwd=None, **run) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    command = [sys.executable, "-m", "vacap.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd, **run)


def paths_of(text: str) -> list[str]:
    return [json.loads(line)["path"] for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "data"
    for name in TREE:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / "scene_1.png", root / name)
    return root


def relative(root: Path, **choice) -> list[str]:
    listing = select(discover([root]), **choice)
    return [p.relative_to(root).as_posix() for p in listing.files]


def test_include_and_exclude_match_the_path_inside_the_input_root(tree):
    everything = relative(tree)
    assert len(everything) == len(TREE)
    # No slash: any one name on the path; a slash: from the root; a matched folder takes its contents.
    assert relative(tree, include=["*.png"]) == [p for p in everything if p.endswith(".png")]
    assert relative(tree, exclude=["raw/**"]) == [p for p in everything if not p.startswith("raw/")]
    assert relative(tree, exclude=["raw/"]) == relative(tree, exclude=["raw/**"])
    assert relative(tree, exclude=["raw"]) == ["a.png", "b.jpg", "g.PNG", "keep/e.png", "keep/raw.png"]
    assert relative(tree, include=["raw/*.png"]) == ["raw/c.png"]
    assert relative(tree, include=["**/d.png", "[ab].*"]) == ["a.png", "b.jpg", "raw/deep/d.png"]
    assert relative(tree, include=["*.png"], exclude=["raw/**", "keep/*"], limit=2) == ["a.png"]
    assert relative(tree, include=["*.png", "*.PNG"], limit=2) == ["a.png", "g.PNG"]
    assert glob_matches("*.png", "keep/raw.png/x.jpg"), "a pattern without a slash matches folder names too"


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover_the_listing_in_its_order(tree, count):
    everything = relative(tree)
    shards = [relative(tree, shard=(i, count)) for i in range(count)]
    assert sorted(itertools.chain(*shards)) == sorted(everything)
    assert len(set(itertools.chain(*shards))) == len(everything)
    for shard in shards:
        assert shard == [p for p in everything if p in shard]
    if count == 2:
        assert all(shards), "eight paths should not all land in one of two shards"
    # The shard is a function of the path inside the root, not of where the tree lies.
    moved = tree.parent / "elsewhere"
    shutil.copytree(tree, moved, dirs_exist_ok=True)
    assert [relative(moved, shard=(i, count)) for i in range(count)] == shards


def test_path_lists_and_the_roots_of_listed_files(tree, monkeypatch):
    data = b"# made by find\r\n\r\ndata/a.png\r\n   \n  # indented comment\ndata/raw/c.png\ndata/none.png\n\xffx.png"
    assert read_path_list(data) == ["data/a.png", "data/raw/c.png", "data/none.png", os.fsdecode(b"\xffx.png")]
    monkeypatch.chdir(tree.parent)
    outside = f"../{tree.parent.name}/data/a.png"
    listing = discover([], listed=["data/raw/c.png", "data/none.png", tree / "b.jpg", outside])
    assert [listing.relative(i) for i in range(4)] == ["data/raw/c.png", "data/none.png", "data/b.jpg", "a.png"]
    with pytest.raises(FileNotFoundError):
        discover(["data/none.png"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard", "3/2"], "--shard must be I/N with 0 <= I < N"),
        (["--shard", "x"], "got 'x'"),
        (["--shard", "0/0"], "--shard must be I/N"),
        (["--prompt", "Describe {colour}."], "unknown placeholder {colour}"),
        ([], "give image files or folders, or --files-from"),
        (["--limit", "0"], "--limit"),
        (["--existing", "append"], "--existing append acts on caption files: add --sidecar"),
    ],
)
def test_bad_choices_exit_2_and_say_what_is_allowed(args, message, tree):
    paths = [] if not args else [tree]
    out = vacap("caption", *paths, "--model", "/no/such/model", *args)
    assert out.returncode == 2 and message in " ".join(out.stderr.split()), out.stderr


def test_prompt_file_errors_exit_2(tree, tmp_path):
    template = tmp_path / "prompt.txt"
    template.write_text("Describe {stem} and {size}.\n", encoding="utf-8")
    out = vacap("caption", tree, "--model", "/no/such/model", "--prompt-file", template)
    assert out.returncode == 2 and "unknown placeholder {size}" in " ".join(out.stderr.split()), out.stderr
    out = vacap("caption", tree, "--model", "/no/such/model", "--prompt-file", template, "--prompt", "Hi.")
    assert out.returncode == 2 and "not both" in out.stderr


def test_shards_and_filters_end_to_end(tree, tmp_path):
    everything = [str(p) for p in discover([tree]).files]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Describe {stem}.\n", encoding="utf-8")
    parts = []
    for i in range(2):
        output = tmp_path / f"p{i}.jsonl"
        out = vacap("caption", tree, *DEMO, "--prompt-file", prompt, "--shard", f"{i}/2", "-o", output)
        assert out.returncode == 0, out.stderr
        records = [json.loads(line) for line in output.read_text("utf-8").splitlines()]
        assert {r["params"]["prompt"] for r in records} == {"Describe {stem}."}, "the template, its newline dropped"
        parts.append([r["path"] for r in records])
    assert sorted(parts[0] + parts[1]) == sorted(everything) and not set(parts[0]) & set(parts[1])
    again = vacap("caption", tree, *DEMO, "--prompt-file", prompt, "--shard", "0/2", "-o", tmp_path / "p0.jsonl")
    assert again.returncode == 0 and f"all {len(parts[0])} images already captioned" in again.stderr

    # stdin list, relative to the current folder, then filters and a limit on the whole listing.
    listing = "\n".join(["# listed", "data/raw/c.png", "data/keep/e.png", "data/b.jpg"])
    filtered = vacap(
        "caption", "data/x", *DEMO, "--files-from", "-", "--include", "*.png", "--include", "*.webp",
        "--exclude", "keep/**", "--exclude", "data/keep/**", "--limit", "2", cwd=tree.parent, input=listing,
    )  # fmt: skip
    assert filtered.returncode == 0, filtered.stderr
    assert paths_of(filtered.stdout) == ["data/x/raw/f.webp", "data/raw/c.png"]


def test_prompt_placeholders_are_filled_per_image_and_batching_keeps_each_caption(tiny_model, tmp_path):
    from vacap import Captioner

    # The same picture under names of different lengths: a caption can only differ by its prompt,
    # and the prompts' lengths differ inside a batch.
    names = ["cats/a.png", "cats/a_much_longer_name.png", "dogs/b.png", "dogs/tiny.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(SAMPLES / "scene_2.png", tmp_path / name)
    files = [tmp_path / name for name in names]
    template = "Describe {stem} ({filename}) from the {folder} set."
    model = tiny_model("llava-llama")
    for method in ("greedy", "vasparse"):
        alone = Captioner(str(model), dtype="fp32", method=method, max_new_tokens=6, prompt=template)
        expected = alone.caption(files)
        assert {r["params"]["prompt"] for r in expected} == {template}
        assert len({r["caption"] for r in expected}) > 1, "the filled prompts should change the captions"
        batched = Captioner(str(model), dtype="fp32", method=method, max_new_tokens=6, prompt=template, batch_size=3)
        assert [(r["caption"], r["tokens"]) for r in batched.caption(files)] == [
            (r["caption"], r["tokens"]) for r in expected
        ]
        filled = "Describe a_much_longer_name (a_much_longer_name.png) from the cats set."
        assert alone.with_settings(prompt=filled).caption([files[1]])[0]["caption"] == expected[1]["caption"]


def test_filters_that_keep_nothing_say_how_many_images_they_left_out_and_how_they_match(tree):
    """`--include 'data/*.png'` keeps nothing, since patterns are matched inside the root given:
    the run says so instead of a bare "no images to caption", and loads no model."""
    out = vacap("caption", tree, "--model", "/no/such/model", "--include", "data/*.png")
    said = " ".join(out.stderr.split())
    assert out.returncode == 0
    assert f"no images to caption: the {len(TREE)} images found were all left out by the filters" in said
    assert "--include patterns are matched against each image's path inside the folder it was found under" in said
    excluded = vacap("caption", tree, "--model", "/no/such/model", "--exclude", "*")
    assert excluded.returncode == 0 and "--exclude patterns are matched" in " ".join(excluded.stderr.split())

"""`vacap eval chair` and `vacap eval pope` end to end, on a hand-made COCO-format dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import noise_image

CATEGORIES = [{"id": i + 1, "name": name} for i, name in enumerate(["person", "dog", "cat", "car", "bus", "chair", "cup", "tv"])]
# image id -> classes present
TRUTH = {1: ["dog", "person", "car"], 2: ["cat", "chair", "cup", "tv"], 3: ["bus", "car", "person"]}


def file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture
def coco(tmp_path):
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    annotations = [
        {"id": 100 * image_id + k, "image_id": image_id, "category_id": ids[name], "bbox": [0, 0, 5, 5]}
        for image_id, names in TRUTH.items()
        for k, name in enumerate(names)
    ]
    images = [{"id": i, "file_name": file_name(i), "width": 40, "height": 30} for i in TRUTH]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    folder = tmp_path / "val2014"
    folder.mkdir()
    for i in TRUTH:
        noise_image(40, 30, i).save(folder / file_name(i))
    return path, folder


def vacap(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "vacap.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def test_eval_chair_reports_per_method(coco, tmp_path):
    instances, _ = coco
    records = [
        # greedy: image 1 names a dog (right) and a cat (wrong); image 2 a cat and a chair (both right).
        {"path": f"x/{file_name(1)}", "status": "ok", "caption": "A dog and a cat.", "method": "greedy", "params": {}},
        {"path": f"x/{file_name(2)}", "status": "ok", "caption": "A cat on a chair.", "method": "greedy", "params": {}},
        # vasparse: image 1 names a person and a car (right); image 3's record failed.
        {"path": f"x/{file_name(1)}", "status": "ok", "caption": "A man near a car.", "method": "vasparse", "params": {}},
        {"path": f"x/{file_name(3)}", "status": "error", "caption": None, "method": "vasparse", "params": {}},
    ]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in records))
    per_image = tmp_path / "per_image.jsonl"
    out = vacap("eval", "chair", captions, "--instances", instances, "--json", "--per-image", per_image)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    greedy, vasparse = result["results"]["greedy"], result["results"]["vasparse"]
    assert greedy["CHAIR_s"] == pytest.approx(1 / 2) and greedy["CHAIR_i"] == pytest.approx(1 / 4)
    assert greedy["recall"] == pytest.approx(3 / 7)  # dog of 3 classes, cat and chair of 4
    assert vasparse["CHAIR_s"] == 0 and vasparse["recall"] == pytest.approx(2 / 3) and vasparse["n"] == 1
    assert result["not_ok"] == 1
    entries = [json.loads(line) for line in per_image.read_text().splitlines()]
    assert [["cat", "cat"]] in [e["hallucinated"] for e in entries]
    table = vacap("eval", "chair", captions, "--instances", instances)
    assert "CHAIR_s" in table.stdout and "vasparse" in table.stdout
    assert vacap("eval", "chair", captions, "--instances", tmp_path / "missing.json").returncode == 2


def test_eval_pope_counts_answers_without_yes_or_no_as_unanswered(coco, tmp_path, tiny_model):
    """A model that does not answer the question (random weights here, the shapes demo model for a
    user) has nothing to score: exit 1 saying so, instead of reading every answer as "yes"."""
    instances, folder = coco
    answers = tmp_path / "answers.jsonl"
    out = vacap("eval", "pope", folder, "--instances", instances, "--split", "popular", "--model",
                tiny_model("llava-llama"), "--method", "greedy", "--max-new-tokens", "6", "-o", answers, "--json")  # fmt: skip
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 6 * len(TRUTH) and {r["label"] for r in rows} == {"yes", "no"}
    assert all(r["parsed"] is None for r in rows), "random weights say neither yes nor no"
    assert out.returncode == 1, out.stderr
    assert f"none of the {len(rows)} answers says yes or no" in out.stderr
    assert out.stdout == ""
    bad = vacap("eval", "pope", folder, "--instances", instances, "--split", "sideways")
    assert bad.returncode == 2 and "sideways" in bad.stderr


def test_eval_pope_names_the_three_class_rule(tmp_path):
    two_classes = {
        "images": [{"id": 1, "file_name": file_name(1)}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1}, {"id": 2, "image_id": 1, "category_id": 2}],
        "categories": CATEGORIES,
    }
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(two_classes))
    out = vacap("eval", "pope", tmp_path, "--instances", instances, "--model", "demo")
    assert out.returncode == 2
    assert "no image in the instances file has at least 3 annotated classes" in out.stderr
    assert "readable" not in out.stderr


def test_eval_chair_with_no_matching_record_exits_1_saying_why(coco, tmp_path):
    instances, _ = coco
    records = [
        {"path": f"photos/holiday_{i}.jpg", "status": "ok", "caption": "A dog.", "method": "greedy", "params": {}}
        for i in range(4)
    ]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = vacap("eval", "chair", captions, "--instances", instances)
    assert out.returncode == 1
    assert "none of the 4 ok records matches an image" in out.stderr
    assert "COCO_val2014_000000123456.jpg" in out.stderr and "holiday_0.jpg" in out.stderr
    assert out.stdout == ""
    # Matched ids that are not in the annotations are no better.
    unknown = [{**records[0], "path": f"x/{file_name(77)}"}]
    captions.write_text(json.dumps(unknown[0]) + "\n")
    out = vacap("eval", "chair", captions, "--instances", instances, "--json")
    assert out.returncode == 1 and "none of the 1 ok records matches" in out.stderr
    failed = [{**records[0], "status": "error", "caption": None}]
    captions.write_text(json.dumps(failed[0]) + "\n")
    out = vacap("eval", "chair", captions, "--instances", instances)
    assert out.returncode == 1 and "none of the 1 records is ok" in out.stderr

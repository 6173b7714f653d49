"""`--risk` end to end: records scored by the real decode loop, read back by export, show and eval."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import summary_counts
from test_eval_cli import TRUTH, coco, file_name  # noqa: F401 (coco is a fixture)

from vacap.evaluate.chair import Chair
from vacap.evaluate.shapes import SHAPE_WORDS
from vacap.export import record_key

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
SCENES = sorted(SAMPLES.glob("scene_*.png"))
FLAGS = ["--model", "demo", "--dtype", "fp32", "--device", "cpu", "--method", "greedy", "--max-new-tokens", "40"]


def vacap(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vacap.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The sample scenes captioned without --risk, then the same output resumed with --risk."""
    root = tmp_path_factory.mktemp("risk")
    folder = root / "scenes"
    folder.mkdir()
    for scene in SCENES:
        shutil.copy(scene, folder / scene.name)
    output = root / "captions.jsonl"
    plain = vacap("caption", folder, *FLAGS, "-o", output)
    assert plain.returncode == 0, plain.stderr
    before = records(output)
    risky = vacap("caption", folder, *FLAGS, "--risk", "-o", output)
    assert risky.returncode == 0, risky.stderr
    return folder, output, before, records(output)[len(before):], risky


def test_risk_changes_no_caption_and_resume_tells_it_apart(scored):
    _, _, before, after, risky = scored
    # Records without risk are not taken as done by a --risk run: every image is captioned again.
    assert summary_counts(risky.stderr) == f"{len(SCENES)} ok, 0 error, 0 skipped"
    assert [r["caption"] for r in after] == [r["caption"] for r in before]
    assert [r["tokens"] for r in after] == [r["tokens"] for r in before]
    assert all(r["params"] == {**b["params"], "risk": True} for r, b in zip(after, before))
    assert all("risk" not in r for r in before)


def test_each_shape_word_is_a_mention_whose_span_indexes_the_caption(scored):
    *_, after, _ = scored
    assert any(r["risk"]["mentions"] for r in after)
    for record in after:
        caption, risk = record["caption"], record["risk"]
        words = [(m.start(), m.group()) for m in re.finditer(r"[a-z]+", caption.lower())]
        assert [m["start"] for m in risk["mentions"]] == [start for start, word in words if word in SHAPE_WORDS]
        for mention in risk["mentions"]:
            assert caption[mention["start"] : mention["end"]] == mention["text"]
            assert 0 <= mention["token"] < record["tokens"] + 1 and 0 <= mention["score"] <= 1
            assert set(mention["signals"]) == {"entropy", "neg_logprob", "neg_margin", "branch_log_ratio"}
        scores = [m["score"] for m in risk["mentions"]]
        assert risk["score"] == (max(scores) if scores else None)


def test_a_vocabulary_file_chooses_the_words_and_a_bad_line_is_named(scored, tmp_path):
    folder, *_ = scored
    vocabulary = tmp_path / "words.txt"
    vocabulary.write_text("# only rings\nring: hoop, loop\n", encoding="utf-8")
    out = vacap("caption", folder, *FLAGS, "--risk", "--risk-vocab", vocabulary)
    assert out.returncode == 0, out.stderr
    mentions = [m for line in out.stdout.splitlines() for m in json.loads(line)["risk"]["mentions"]]
    assert mentions and {m["object"] for m in mentions} == {"ring"}
    vocabulary.write_text("ring: hoop,\n", encoding="utf-8")
    bad = vacap("caption", folder, *FLAGS, "--risk", "--risk-vocab", vocabulary)
    assert bad.returncode == 2 and f"{vocabulary}, line 1" in " ".join(bad.stderr.replace("│", " ").split())
    alone = vacap("caption", folder, *FLAGS, "--risk-vocab", vocabulary)
    assert alone.returncode == 2 and "--risk-vocab names the words --risk scores" in alone.stderr


def test_export_and_show_read_the_real_risk_scores(scored, tmp_path):
    folder, output, _, after, _ = scored
    # The output holds the plain run's records too: their settings differ by risk alone.
    fingerprint = record_key(after[0])[:12]
    exported = vacap("export", output, "--format", "csv", "--to", tmp_path / "csv", "--mark-risk", "--settings", fingerprint)
    assert exported.returncode == 0, exported.stderr
    with open(tmp_path / "csv" / "captions.csv", encoding="utf-8", newline="") as f:
        rows = {row["path"]: row["risk"] for row in csv.DictReader(f)}
    assert rows == {r["path"]: "" if r["risk"]["score"] is None else str(r["risk"]["score"]) for r in after}
    riskiest = max(after, key=lambda r: r["risk"]["score"] or 0)
    shown = vacap("show", output, "--image", Path(riskiest["path"]).name, "--by", "risk")
    assert shown.returncode == 0, shown.stderr
    assert all(m["text"] in shown.stdout for m in riskiest["risk"]["mentions"])


def test_eval_shapes_scores_the_risk_against_the_scenes():
    out = vacap("eval", "shapes", "-n", "6", "--methods", "greedy", "--risk", "--json")
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)["results"]["greedy"]
    assert row["risk_mentions"] > 0 and 0 <= row["chair_s_kept80"] <= 1
    for key in ("risk_auroc", "risk_auprc", "risk_auroc_prior", "risk_auroc_perceptual", "risk_caught_at_90"):
        assert key in row and (row[key] is None or 0 <= row[key] <= 1)


def test_eval_chair_scores_the_risk_against_coco(coco, tmp_path):  # noqa: F811
    instances, _ = coco

    def record(image_id, caption, mentions):
        spans = [(caption.index(word), word, score) for word, score in mentions]
        risk = {"score": max(score for *_, score in spans), "mentions": [
            {"text": word, "start": start, "end": start + len(word), "object": word, "token": 0, "score": score,
             "signals": {}} for start, word, score in spans]}  # fmt: skip
        return {"path": f"x/{file_name(image_id)}", "status": "ok", "caption": caption, "method": "greedy",
                "params": {}, "risk": risk}  # fmt: skip

    # Image 1 holds a dog, a person and a car: the cat (0.9) and the bus (0.4) are invented.
    made = [record(1, "A dog and a cat.", [("dog", 0.2), ("cat", 0.9)]),
            record(1, "A car, a bus and a person.", [("car", 0.5), ("bus", 0.4), ("person", 0.1)])]  # fmt: skip
    figures = Chair({i: set(names) for i, names in TRUTH.items()}).risk_figures(made)
    # Hallucinated 0.9 and 0.4 against correct 0.2, 0.5, 0.1: 5 of the 6 pairs ranked right.
    assert figures["risk_auroc"] == pytest.approx(5 / 6) and figures["risk_mentions"] == 5
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in made), encoding="utf-8")
    out = vacap("eval", "chair", path, "--instances", instances, "--risk", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"]["overall"]["risk_auroc"] == pytest.approx(5 / 6)
    for r in made:
        del r["risk"]
    path.write_text("".join(json.dumps(r) + "\n" for r in made), encoding="utf-8")
    none = vacap("eval", "chair", path, "--instances", instances, "--risk")
    assert none.returncode == 1 and "caption with --risk first" in none.stderr


def test_the_fit_script_writes_coefficients_the_score_reads(tmp_path):
    from vacap import risk

    out = tmp_path / "coefficients.json"
    run = subprocess.run([sys.executable, "-m", "vacap.evaluate.fit_risk", "--scenes", "60", "--out", out],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    fitted = risk.load_coefficients(out)
    assert fitted["fitted_on"].startswith("priors world, train split: 60 scenes (seed 0)")
    assert set(fitted["weights"]) == set(risk.SIGNALS) and fitted["positives"] > 0
    assert risk.load_coefficients()["fitted_on"].startswith("priors world, train split: 3000 scenes")


def test_compare_scores_every_setting(scored):
    folder, *_ = scored
    out = vacap("compare", folder / SCENES[0].name, "--methods", "greedy,fastv", "--risk", *FLAGS[:6],
                "--max-new-tokens", "40")  # fmt: skip
    assert out.returncode == 0, out.stderr
    made = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["setting"] for r in made] == ["greedy", "fastv"]
    assert all(r["params"]["risk"] is True and r["risk"]["mentions"] for r in made)

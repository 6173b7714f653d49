"""Sampling: the processors against Hugging Face's, the draw, and what a caption depends on.

A sampled caption must depend only on (image, settings, seed): not on the batch size, the batch
it shares, the row it runs in, or whether batching is static or continuous.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import IMAGES, PROMPT, hf_greedy
from PIL import Image
from test_batching import PICTURES
from test_cli import SAMPLES, parse, vacap
from transformers import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from vacap.config import SAMPLING_FIELDS, DecodeConfig
from vacap.decode import generate, generate_stream
from vacap.demo import MODEL_DIR
from vacap.methods import steering_for
from vacap.model import load_model
from vacap.sampling import Sampling, draw, generated_mask, ngram_bans, nucleus, penalize, process, uniform

SAMPLED = dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3, no_repeat_ngram=2, seed=7)
MAX_NEW = 16
SCENES = [SAMPLES / f"scene_{i}.png" for i in range(1, 5)]


# --- the processors, on random logits --------------------------------------------------------


def test_repetition_penalty_is_hugging_faces():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 50, generator=g) * 3
    history = torch.randint(0, 50, (4, 12), generator=g)
    for penalty in (0.7, 1.3, 2.0):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(history, z.clone())
        assert torch.equal(penalize(z, generated_mask(history, None, 50), penalty), expected)
    # Rows with fewer real tokens than the history holds: each row as HF sees its own tokens.
    count = torch.tensor([0, 3, 7, 12])
    ours = penalize(z, generated_mask(history, count, 50), 1.5)
    for b in range(4):
        theirs = RepetitionPenaltyLogitsProcessor(1.5)(history[b : b + 1, : count[b]], z[b : b + 1].clone())
        assert torch.equal(ours[b : b + 1], theirs)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_bans_are_hugging_faces(n):
    g = torch.Generator().manual_seed(n)
    V = 5  # a small vocabulary, so that n-grams recur
    history = torch.randint(0, V, (6, 14), generator=g)
    count = torch.tensor([0, 1, n, n + 1, 9, 14])
    bans = ngram_bans(history, count, n, V)
    assert bans.any()
    for b in range(6):
        theirs = NoRepeatNGramLogitsProcessor(n)(history[b : b + 1, : count[b]], torch.zeros(1, V))
        assert torch.equal(bans[b], torch.isinf(theirs[0])), (b, history[b, : count[b]])


def test_temperature_and_top_p_keep_hugging_faces_distribution():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 200, generator=g) * 4
    for temperature in (0.5, 1.0, 1.7):
        for top_p in (1e-6, 0.3, 0.9, 0.99, 1.0):
            theirs = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, z.clone())).softmax(-1)
            ours = nucleus(torch.softmax(z / temperature, -1), top_p)
            assert torch.equal(ours > 0, theirs > 0), (temperature, top_p)
            torch.testing.assert_close(ours / ours.sum(-1, keepdim=True), theirs)
    assert torch.equal(nucleus(torch.softmax(z, -1), 1e-6) > 0, torch.nn.functional.one_hot(z.argmax(-1), 200) > 0)


def test_a_ban_never_leaves_a_row_without_a_candidate():
    """VASparse leaves only its plausible set finite; banning all of it keeps the row unbanned."""
    z = torch.full((2, 6), -torch.inf)
    z[0, 2], z[1, 2], z[1, 4] = 1.0, 1.0, 0.5
    history = torch.tensor([[2, 2], [2, 2]])  # the bigram (2, 2) is taken: 2 is banned after a 2
    out = process(z, Sampling(no_repeat_ngram=2), history)
    assert out[0, 2] == 1.0, "token 2 was the row's only candidate"
    assert torch.isinf(out[1, 2]) and out[1, 4] == 0.5


# --- the draw -----------------------------------------------------------------------------------


def test_draws_follow_the_distribution_along_keys_and_steps():
    g = torch.Generator().manual_seed(2)
    probs = nucleus(torch.softmax(torch.randn(1, 12, generator=g), -1), 0.95)
    expected = probs[0] / probs.sum()
    N = 20000
    for keys, steps in ((torch.arange(N), torch.full((N,), 7)), (torch.full((N,), 12345), torch.arange(N))):
        tokens = draw(probs.expand(N, -1), uniform(keys, steps))
        frequency = torch.bincount(tokens, minlength=12).double() / N
        assert (frequency[expected == 0] == 0).all(), "a token outside the nucleus was drawn"
        spread = (expected * (1 - expected) / N).sqrt()
        assert ((frequency - expected).abs() <= 4 * spread + 1e-3).all(), (frequency, expected)


# --- decoding with a model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_model):
    return load_model(str(tiny_model("llava-llama")), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def demo():
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip("demo model not trained (python -m vacap.demo.train)")
    return load_model(str(MODEL_DIR), dtype="fp32", device="cpu")


def tokens_of(model, config: DecodeConfig, images, identities) -> list[list[int]]:
    inputs = model.prepare(images, PROMPT)
    steering = steering_for(model, config)
    out = generate(model, inputs, steering, MAX_NEW, sampling=Sampling.of(config), identities=identities)
    return [g.tokens for g in out]


def test_temperature_zero_is_hugging_faces_greedy(llama, tiny_model):
    """Greedy with sampling settings that cannot act (top-p without temperature) is HF's greedy."""
    config = DecodeConfig(method="greedy", top_p=0.2, seed=9)
    inputs = llama.prepare(IMAGES, PROMPT)
    assert tokens_of(llama, config, IMAGES, None) == hf_greedy(tiny_model("llava-llama"), inputs, MAX_NEW)
    assert config.as_params() == DecodeConfig(method="greedy", seed=9).as_params()


@pytest.mark.dtype
@pytest.mark.parametrize("method", ["greedy", "vasparse", "vcd"])
def test_a_sampled_caption_depends_on_its_image_alone(llama, method):
    """Each picture alone, in a static batch of four, and streamed on three rows that free up at
    different steps: the same tokens; and they are not the greedy ones."""
    config = DecodeConfig(method=method, max_new_tokens=MAX_NEW, **SAMPLED)
    names = [f"picture {i}" for i in range(len(PICTURES))]
    alone = [tokens_of(llama, config, [p], [n])[0] for p, n in zip(PICTURES, names)]
    assert tokens_of(llama, config, PICTURES[:4], names[:4]) == alone[:4]
    prepared = ((i, llama.prepare([p], PROMPT)) for i, p in enumerate(PICTURES))
    stream = generate_stream(
        llama, prepared, lambda: steering_for(llama, config), 3, MAX_NEW, Sampling.of(config), lambda i: names[i]
    )
    streamed = dict(stream)
    assert len({len(g.tokens) for g in streamed.values()}) > 1, "rows must end at different steps"
    assert [streamed[i].tokens for i in range(len(PICTURES))] == alone
    greedy = DecodeConfig(method=method, max_new_tokens=MAX_NEW)
    assert tokens_of(llama, greedy, PICTURES[:4], None) != alone[:4]


def test_rows_draw_by_their_identity(llama):
    """The same picture twice: one stream of draws per identity (an image's sha256 in vacap)."""
    config = DecodeConfig(method="greedy", temperature=2.0, max_new_tokens=MAX_NEW)
    twice = [PICTURES[0], PICTURES[0]]
    same = tokens_of(llama, config, twice, ["a", "a"])
    assert same[0] == same[1]
    apart = tokens_of(llama, config, twice, ["a", "b"])
    assert apart[0] == same[0] and apart[1] != same[1]


def test_seeds_and_top_p(demo):
    pictures = [Image.open(path).convert("RGB") for path in SCENES]
    names = [str(i) for i in range(4)]
    hot = dict(method="vasparse", temperature=1.5, max_new_tokens=MAX_NEW)
    first = tokens_of(demo, DecodeConfig(**hot, seed=0), pictures, names)
    assert tokens_of(demo, DecodeConfig(**hot, seed=0), pictures, names) == first
    assert tokens_of(demo, DecodeConfig(**hot, seed=1), pictures, names) != first
    # A nucleus of one token is the argmax: greedy's caption, contrast included.
    greedy = tokens_of(demo, DecodeConfig(method="vasparse", max_new_tokens=MAX_NEW), pictures, names)
    assert tokens_of(demo, DecodeConfig(**hot, top_p=1e-6), pictures, names) == greedy
    assert first != greedy


def repeats(tokens: list[int], n: int) -> int:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_repetition_controls_reduce_greedys_repeats(demo):
    pictures = [Image.open(path).convert("RGB") for path in SCENES]
    config = dict(method="greedy", max_new_tokens=32)
    greedy = tokens_of(demo, DecodeConfig(**config), pictures, None)
    assert sum(repeats(t, 1) for t in greedy) > 0 and sum(repeats(t, 2) for t in greedy) > 0, greedy
    penalised = tokens_of(demo, DecodeConfig(**config, repetition_penalty=2.0), pictures, None)
    assert sum(repeats(t, 1) for t in penalised) < sum(repeats(t, 1) for t in greedy)
    no_bigram = tokens_of(demo, DecodeConfig(**config, no_repeat_ngram=2), pictures, None)
    assert all(repeats(t, 2) == 0 for t in no_bigram) and no_bigram != greedy


# --- the command line ---------------------------------------------------------------------------

SAMPLE_FLAGS = [
    "--temperature", "1.2", "--top-p", "0.95", "--repetition-penalty", "1.1", "--no-repeat-ngram", "3", "--seed", "5"
]  # fmt: skip
COMMON = ["--model", "demo", "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "16"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, demo):
    """Sampled captions of one folder (a duplicate image included) as caption gives them at batch
    size 1 and 4 (continuous) and compare at batch size 2 (static batches), plus greedy."""
    root = tmp_path_factory.mktemp("sampled")
    folder = root / "images"
    (folder / "more").mkdir(parents=True)
    for path in SCENES[:3]:
        shutil.copy(path, folder / path.name)
    shutil.copy(SCENES[0], folder / "more" / "same_bytes.png")
    out = {}
    for name, extra in (("one", []), ("four", ["--batch-size", "4"]), ("greedy", None)):
        flags = COMMON + SAMPLE_FLAGS + extra if extra is not None else COMMON
        out[name] = vacap("caption", folder, *flags, "-o", root / f"{name}.jsonl")
    out["compare"] = vacap("compare", folder, "--methods", "vasparse", "--batch-size", "2", *COMMON, *SAMPLE_FLAGS)
    # Resume: the same sampled settings find their records; so does greedy with a temperature of 0.
    out["one again"] = vacap("caption", folder, *COMMON, *SAMPLE_FLAGS, "-o", root / "one.jsonl")
    out["greedy again"] = vacap("caption", folder, *COMMON, "--temperature", "0", "-o", root / "greedy.jsonl")
    for name, run in out.items():
        assert run.returncode == 0, (name, run.stderr)
    # A top-p that greedy would never use is refused, as every flag that changes nothing is.
    out["unused top-p"] = vacap("caption", folder, *COMMON, "--top-p", "0.5", "-o", root / "greedy.jsonl")
    records = {name: parse((root / f"{name}.jsonl").read_text(encoding="utf-8")) for name in ("one", "four", "greedy")}
    records["compare"] = parse(out["compare"].stdout)
    return folder, out, records


def captions(records: list[dict]) -> dict[str, str]:
    return {r["path"]: r["caption"] for r in records if r["status"] == "ok"}


@pytest.mark.dtype
def test_cli_samples_the_same_caption_at_any_batch_size(cli_runs):
    folder, _, records = cli_runs
    one = captions(records["one"])
    assert len(one) == 4
    assert captions(records["four"]) == one
    assert captions(records["compare"]) == one
    assert one[str(folder / "more" / "same_bytes.png")] == one[str(folder / SCENES[0].name)]
    assert captions(records["greedy"]) != one


def test_cli_params_carry_sampling_and_resume_tells_it_apart(cli_runs):
    _, out, records = cli_runs
    params = records["one"][0]["params"]
    assert {name: params[name] for name in (*SAMPLING_FIELDS, "seed")} == dict(
        temperature=1.2, top_p=0.95, repetition_penalty=1.1, no_repeat_ngram=3, seed=5
    )
    # Greedy records state no sampling field, as records made before vacap sampled: those resume.
    assert not set(SAMPLING_FIELDS) & set(records["greedy"][0]["params"])
    assert "already captioned" in out["one again"].stderr
    assert "already captioned" in out["greedy again"].stderr
    refused = out["unused top-p"]
    assert refused.returncode == 2
    assert "--top-p (acts only with a --temperature above 0)" in " ".join(refused.stderr.replace("│", " ").split())


@pytest.mark.parametrize(
    "command, flag, value, message",
    [
        ("caption", "--temperature", "-0.5", "temperature must be a finite number >= 0"),
        ("caption", "--top-p", "0", "top_p must be in (0, 1]"),
        ("caption", "--top-p", "1.01", "top_p must be in (0, 1]"),
        ("caption", "--repetition-penalty", "0", "repetition_penalty must be a finite number > 0"),
        ("caption", "--no-repeat-ngram", "-1", "no_repeat_ngram must be >= 0"),
        ("compare", "--temperature", "nan", "temperature must be a finite number >= 0"),
    ],
)
def test_cli_refuses_bad_sampling_values(tmp_path, command, flag, value, message):
    run = vacap(command, SAMPLES / "scene_1.png", "--model", "demo", flag, value, "-o", tmp_path / "out.jsonl")
    assert run.returncode == 2, run.stderr
    assert message in " ".join(run.stderr.split())
    assert not (tmp_path / "out.jsonl").exists()

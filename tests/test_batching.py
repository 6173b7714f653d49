"""Continuous batching and the background image loader: every caption as batch size 1 gives it.

Real tiny models in fp32, real files; the reference is always each image decoded alone by the
static ``generate``. The tiny models end captions at varied lengths (EOS_LOGIT_SCALE), so rows
free up at different steps and new images are spliced into a running cache.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from helpers import IMAGES, noise_image, summary_counts
from test_cli import parse, vacap

from vacap.cache import KVCache
from vacap.captioner import Captioner
from vacap.config import DecodeConfig
from vacap.decode import Generated, generate, generate_stream
from vacap.methods import steering_for
from vacap.model import Preparer, load_model

MAX_NEW = 24
PROMPT = DecodeConfig().prompt
# Ten pictures whose captions end between 2 and 24 tokens on the tiny models.
PICTURES = [noise_image(20 + 7 * i, 30 + 3 * i, 10 + i) for i in range(10)]
METHODS = {
    "greedy": dict(method="greedy"),
    "vasparse": dict(),
    "vasparse-budget-contrast": dict(kv_budget=0.5, contrast_layers=1),
    "vasparse-contrast-layers": dict(contrast_layers=2),
    "vcd": dict(method="vcd"),
    "fastv": dict(method="fastv"),
}


def alone(model, config: DecodeConfig, images) -> list[list[int]]:
    return [
        generate(model, model.prepare([image], PROMPT), steering_for(model, config), MAX_NEW)[0].tokens
        for image in images
    ]


def streamed(model, config: DecodeConfig, images, rows: int) -> dict[int, Generated]:
    prepared = ((i, model.prepare([image], PROMPT)) for i, image in enumerate(images))
    out: dict[int, Generated] = {}
    for key, generated in generate_stream(model, prepared, lambda: steering_for(model, config), rows, MAX_NEW):
        assert key not in out, "an image came back twice"
        out[key] = generated
    return out


def completion_order(lengths: list[int], rows: int) -> list[int]:
    """The order in which captions of these lengths end when a free row takes the next image
    before each step (lower rows first) and every busy row makes one token per step."""
    holding: list[int | None] = [None] * rows
    left = dict(enumerate(lengths))
    waiting, order = list(range(len(lengths))), []
    while waiting or any(i is not None for i in holding):
        holding = [waiting.pop(0) if i is None and waiting else i for i in holding]
        for i in holding:
            if i is not None:
                left[i] -= 1
        order += [i for i in holding if i is not None and left[i] == 0]
        holding = [None if i is not None and left[i] == 0 else i for i in holding]
    return order


@pytest.fixture(scope="module")
def llama(tiny_model):
    return load_model(str(tiny_model("llava-llama")), dtype="fp32", device="cpu")


@pytest.mark.dtype
@pytest.mark.parametrize("name", METHODS)
def test_continuous_batching_gives_each_image_what_it_gets_alone(llama, name, monkeypatch):
    config = DecodeConfig(max_new_tokens=MAX_NEW, **METHODS[name])
    expected = alone(llama, config, PICTURES)
    assert len({len(t) for t in expected}) > 1, "captions of varied lengths, or no row frees early"

    trimmed = []
    trim = KVCache.trim
    monkeypatch.setattr(KVCache, "trim", lambda self, layer: trimmed.append(trim(self, layer)) or trimmed[-1])
    out = streamed(llama, config, PICTURES, rows=2)
    assert sorted(out) == list(range(len(PICTURES)))
    assert [out[i].tokens for i in range(len(PICTURES))] == expected
    assert list(out) == completion_order([len(t) for t in expected], rows=2)
    assert any(trimmed), "rows ran long enough for the cache to give back unused leading slots"
    for i, tokens in enumerate(expected):
        assert out[i].stopped_by == ("length" if len(tokens) == MAX_NEW and tokens[-1] not in llama.eos_ids else "eos")


@pytest.mark.dtype
@pytest.mark.parametrize("name", ["vasparse", "vasparse-budget-contrast", "vcd"])
def test_continuous_batching_with_padding_and_rows_left_free(tiny_model, name):
    # Anyres prompts differ in length, so spliced rows are shorter or longer than the running
    # cache; three images on eight rows leave rows that never get one.
    model = load_model(str(tiny_model("llava-next")), dtype="fp32", device="cpu")
    config = DecodeConfig(max_new_tokens=MAX_NEW, **METHODS[name])
    images = PICTURES[:3] + IMAGES
    assert len({model.prepare([image], PROMPT)["input_ids"].shape[1] for image in images}) > 1
    expected = alone(model, config, images)
    out = streamed(model, config, images, rows=4)
    assert [out[i].tokens for i in range(len(images))] == expected
    few = streamed(model, config, images[:3], rows=8)
    assert [few[i].tokens for i in range(3)] == expected[:3]


@pytest.mark.dtype
@pytest.mark.parametrize("settings", [dict(method="vcd"), dict(contrast_layers=2)])
def test_random_parts_are_drawn_per_image_so_a_batch_changes_no_caption(llama, settings):
    """VCD's noise and the contrast branch's hidden slots used to be drawn for the whole batch."""
    config = DecodeConfig(max_new_tokens=MAX_NEW, **settings)
    batched = generate(llama, llama.prepare(PICTURES[:4], PROMPT), steering_for(llama, config), MAX_NEW)
    assert [g.tokens for g in batched] == alone(llama, config, PICTURES[:4])


# Long enough that, in one static batch of the ten pictures, rows stop 30 or more steps apart: the
# early ones then decode filler for dozens of steps beside the others.
LONG_NEW = 64


@pytest.mark.dtype
@pytest.mark.parametrize("name", ["greedy", "vasparse", "vcd", "fastv"])
def test_static_batches_of_long_captions_give_each_image_what_it_gets_alone(llama, name):
    """``generate``'s static batches (--diagnostics, --compile, answer) keep decoding a row that
    stopped, with pad tokens, until the batch's longest caption ends; nothing of it may reach
    the other rows."""
    config = DecodeConfig(max_new_tokens=LONG_NEW, **METHODS[name])
    expected = [
        generate(llama, llama.prepare([image], PROMPT), steering_for(llama, config), LONG_NEW)[0].tokens
        for image in PICTURES
    ]
    lengths = sorted(len(tokens) for tokens in expected)
    assert lengths[-1] == LONG_NEW and lengths[-1] - lengths[0] > 30 and len(set(lengths)) > 4, lengths
    batched = generate(llama, llama.prepare(PICTURES, PROMPT), steering_for(llama, config), LONG_NEW)
    assert [g.tokens for g in batched] == expected


SHORT_PROMPT = "Describe."
# About three times SHORT_PROMPT's width on the tiny models: longer than the whole cache that a
# first group of short prompts gets (twice their width, plus max_new_tokens + 2).
LONG_PROMPT = (
    "Please describe this picture in great detail, every object, colour, shape and position, "
    "and say what is happening in it and why, at length."
)


@pytest.mark.dtype
@pytest.mark.parametrize("name", ["greedy", "vasparse", "vasparse-contrast-layers"])
def test_a_prompt_over_twice_the_first_groups_width_makes_room_in_every_layer(llama, name, monkeypatch):
    """The running cache is sized from the first group's prompts. A later prompt longer than
    the whole cache, arriving when the rows that held the leading slots have ended, needs a
    trim and then growth: every layer must be trimmed alike before it grows (the shared fields
    of VASparse and of its contrast branch move with layer 0), and the splice needs the whole
    prompt's slots however many the trim gave back."""
    config = DecodeConfig(max_new_tokens=MAX_NEW, **METHODS[name])
    # The first group's rows end before the long prompt comes, so its leading slots are free.
    images = list(zip(PICTURES, [SHORT_PROMPT] * 4 + [LONG_PROMPT, SHORT_PROMPT]))
    widths = [llama.prepare([image], prompt)["input_ids"].shape[1] for image, prompt in images]
    assert widths[4] > 2 * widths[0] + MAX_NEW + 2, widths
    expected = [
        generate(llama, llama.prepare([image], prompt), steering_for(llama, config), MAX_NEW)[0].tokens
        for image, prompt in images
    ]

    events = []  # ("trim", slots given back) and ("grow", every layer's length before it)
    trim, grow = KVCache.trim, KVCache.grow

    def spy_trim(self, layer):
        events.append(("trim", trim(self, layer)))
        return events[-1][1]

    def spy_grow(self, capacity):
        events.append(("grow", list(self.length)))
        grow(self, capacity)

    monkeypatch.setattr(KVCache, "trim", spy_trim)
    monkeypatch.setattr(KVCache, "grow", spy_grow)
    prepared = ((i, llama.prepare([image], prompt)) for i, (image, prompt) in enumerate(images))
    out = dict(generate_stream(llama, prepared, lambda: steering_for(llama, config), 2, MAX_NEW))
    assert [out[i].tokens for i in range(len(images))] == expected
    grown = [i for i, (kind, _) in enumerate(events) if kind == "grow"]
    assert any(events[i - 1][0] == "trim" and events[i - 1][1] > 0 for i in grown), "trimmed, yet had to grow"
    for i in grown:
        assert len(set(events[i][1])) == 1, f"layers of different lengths when the cache grew: {events[i][1]}"


def test_collate_pads_anyres_tiles_as_the_processor_does(tiny_model):
    preparer = Preparer.load(str(tiny_model("llava-next")))
    alone = [preparer.prepare([image], PROMPT) for image in IMAGES]
    assert len({inputs["pixel_values"].shape[1] for inputs in alone}) > 1, "no tile stack to pad"
    together = preparer.prepare(IMAGES, PROMPT)
    joined = preparer.collate(alone)
    assert joined.keys() == together.keys()
    for name in together:
        assert torch.equal(joined[name], together[name]), name


def test_collate_of_prompts_of_different_lengths_is_the_processors_own_batch():
    """The demo model's preparer, loaded without its weights: images prepared one by one, each
    with a prompt of another length, collate into exactly the batch the processor makes."""
    preparer = Preparer.load("demo")
    prompts = ["Describe.", "Please describe this image in detail.", "What shapes are in this picture, and where?"]
    alone = [preparer.prepare([image], prompt) for image, prompt in zip(IMAGES, prompts)]
    assert len({inputs["input_ids"].shape[1] for inputs in alone}) == len(prompts)
    together = preparer.prepare(IMAGES[: len(prompts)], prompts)
    joined = preparer.collate(alone)
    assert joined.keys() == together.keys()
    for name in together:
        assert torch.equal(joined[name], together[name]), name
    assert (joined["attention_mask"] == 0).any(), "nothing was padded"


def filled(cache: KVCache, layer: int, rows: int, n: int, base: float) -> None:
    """n slots in every row of a layer, keys base + slot, the field v = -(base + slot)."""
    k = (base + torch.arange(n, dtype=torch.float32)).view(1, 1, n, 1).expand(rows, cache.n_kv_heads, n, 2)
    cache.append(layer, k, k + 0.5, torch.ones(rows, n, dtype=torch.bool))
    cache.fields["v"][layer, :, :, cache.length[layer] - n : cache.length[layer]] = -k[:, :1, :, 0]


def test_splice_right_aligns_rows_with_their_fields_and_trim_gives_back_slots():
    running = KVCache(2, 3, 1, 2, 12, dtype=torch.float32, device=torch.device("cpu"))
    running.add_field("v", 1)  # the name VASparse uses: a field must not shadow the values
    for layer in range(2):
        filled(running, layer, 3, 4, base=0.0)
    small = KVCache.like(running, batch=1, capacity=6)
    filled(small, 0, 1, 2, base=100.0)  # shorter than the running layer
    filled(small, 1, 1, 6, base=200.0)  # longer: the running rows move right first

    running.splice(small, rows=[0], into=[1])
    assert running.length == [4, 6]
    assert running.valid[0].tolist()[1][:4] == [False, False, True, True]
    assert running.k[0, 1, 0, 2:4, 0].tolist() == [100.0, 101.0] and running.v[0, 1, 0, 3, 0] == 101.5
    assert running.fields["v"][0, 1, 0, 2:4].tolist() == [-100.0, -101.0]
    assert not running.k[0, 1, :, :2].any() and not running.fields["v"][0, 1, :, :2].any()
    assert running.k[1, 1, 0, :6, 0].tolist() == [200.0 + i for i in range(6)]
    # Rows 0 and 2 moved right by two in layer 1, with their values and field, and not in layer 0.
    assert running.k[1, 0, 0, :6, 0].tolist() == [0, 0, 0, 1, 2, 3] and running.v[1, 2, 0, 5, 0] == 3.5
    assert running.valid[1, 0].tolist()[:6] == [False, False, True, True, True, True]
    assert running.fields["v"][1, 2, 0, :6].tolist() == [0, 0, 0, -1, -2, -3]
    assert running.k[0, 0, 0, :4, 0].tolist() == [0, 1, 2, 3]

    running.valid[:, [0, 2]] = False  # their captions ended
    assert running.trim(1) == 0, "row 1 uses every slot of layer 1"
    assert running.trim(0) == 2 and running.length == [2, 6]
    assert running.k[0, 1, 0, :2, 0].tolist() == [100.0, 101.0] and running.fields["v"][0, 1, 0, 1] == -101.0
    assert not running.k[0, :, :, 2:].any() and not running.valid[0, :, 2:].any()
    running.make_room(24)  # 6 slots in layer 1, 24 more: trimming gives back none there
    assert running.capacity >= 30 and running.k[1, 1, 0, :6, 0].tolist() == [200.0 + i for i in range(6)]


def test_make_room_trims_every_layer_before_it_grows():
    """A field shared by all layers moves with layer 0 alone, so make_room may not trim layer 0,
    grow, and leave the others as they were: every layer must keep describing the field's slots."""
    cache = KVCache(3, 2, 1, 2, 8, dtype=torch.float32, device=torch.device("cpu"))
    cache.add_field("image", 1, shared=True)[0, :, 0, :6] = torch.arange(6) + 100.0  # 100 + the slot's key
    for layer in range(3):
        k = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1).expand(2, 1, 6, 2)
        cache.append(layer, k, k, torch.ones(2, 6, dtype=torch.bool))
    cache.valid[:, 0] = False  # row 0's caption ended
    cache.valid[:, 1, :2] = False  # row 1 starts at slot 2: trimming gives back two slots
    cache.make_room(6)  # 6 + 6 > 8; trimmed, 4 + 6 > 8 still: it must grow as well
    assert cache.capacity >= 10 and cache.length == [4, 4, 4]
    for layer in range(3):
        assert cache.k[layer, 1, 0, :4, 0].tolist() == [2.0, 3.0, 4.0, 5.0], layer
        assert cache.valid[layer, 1].tolist() == [True] * 4 + [False] * (cache.capacity - 4), layer
    assert cache.fields["image"][0, 1, 0, :4].tolist() == [102.0, 103.0, 104.0, 105.0]
    # A splice needs the source's n slots whatever trimming gave back: the 4 slots trimmed here
    # would make n + 2 - 4 seem to fit.
    cache.valid[:, 1] = False
    n = cache.capacity + 1
    small = KVCache.like(cache, batch=1, capacity=n)
    for layer in range(3):
        small.append(layer, torch.ones(1, 1, n, 2), torch.ones(1, 1, n, 2), torch.ones(1, n, dtype=torch.bool))
    cache.make_room(2, splicing=small)
    assert cache.capacity >= n + 2
    cache.splice(small, [0], [1])
    assert cache.length == [n] * 3 and cache.valid[:, 1, :n].all()


def test_splice_carries_the_cluster_bias_into_a_cache_without_one():
    running = KVCache(1, 2, 1, 2, 8, dtype=torch.float32, device=torch.device("cpu"))
    filled_k = torch.ones(2, 1, 3, 2)
    running.append(0, filled_k, filled_k, torch.ones(2, 3, dtype=torch.bool))
    small = KVCache(1, 1, 1, 2, 3, dtype=torch.float32, device=torch.device("cpu"))
    small.rewrite(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.ones(1, 2, dtype=torch.bool),
                  bias=torch.tensor([[[0.0, 0.5]]]))  # fmt: skip
    running.splice(small, [0], [1])
    assert running.bias is not None and running.layer_bias(0).tolist() == [[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.5]]]


# --- the library and the CLI -----------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Ten pictures with an unreadable file in the middle."""
    root = tmp_path_factory.mktemp("pictures")
    for i, picture in enumerate(PICTURES):
        picture.save(root / f"p{i:02d}.png")
    (root / "p04b.png").write_bytes(b"not a picture")
    return root


def test_captioner_returns_input_order_and_records_come_as_they_finish(tiny_model, folder):
    path = str(tiny_model("llava-llama"))
    one = Captioner(path, dtype="fp32", device="cpu", max_new_tokens=MAX_NEW)
    files = sorted(str(p) for p in folder.iterdir())
    expected = one.caption(files)
    four = Captioner(path, dtype="fp32", device="cpu", batch_size=4, max_new_tokens=MAX_NEW)
    assert [(r["path"], r["caption"], r["tokens"]) for r in four.caption(files)] == [
        (r["path"], r["caption"], r["tokens"]) for r in expected
    ]
    finished = list(four.records([str(folder)]))
    assert sorted(r["path"] for r in finished) == files
    assert [r["path"] for r in finished] != files, "completion order differs from input order here"
    waited, wall = four.image_wait
    assert 0 <= waited < wall


def test_images_are_read_and_skipped_on_a_background_thread(tiny_model, folder):
    captioner = Captioner(str(tiny_model("llava-llama")), dtype="fp32", device="cpu", batch_size=2, max_new_tokens=4)
    threads = set()

    def skip(path, sha256, settings):
        threads.add(threading.current_thread().name)
        return path.endswith("p00.png")

    records = list(captioner.records([str(folder)], skip=skip))
    assert threads == {"vacap-images"}
    assert len(records) == 10 and not any(r["path"].endswith("p00.png") for r in records)

    def broken(path, sha256, settings):
        raise KeyError("the resume index is broken")

    with pytest.raises(KeyError, match="resume index"):
        list(captioner.records([str(folder)], skip=broken))


def test_cli_batch_records_equal_batch_one_and_resume_by_path(tiny_model, folder, tmp_path):
    model = tiny_model("llava-llama")
    common = ["--model", model, "--dtype", "fp32", "--max-new-tokens", MAX_NEW]
    one = tmp_path / "one.jsonl"
    assert vacap("caption", folder, "-o", one, *common).returncode == 1  # the unreadable file
    many = tmp_path / "many.jsonl"
    out = vacap("caption", folder, "-o", many, "--batch-size", "8", *common)
    assert out.returncode == 1 and "10 ok, 1 error, 0 skipped" == summary_counts(out.stderr)

    def by_path(path):
        return {r["path"]: (r["status"], r["caption"], r["tokens"], r["error"]) for r in parse(path.read_text())}

    assert by_path(many) == by_path(one) and len(parse(many.read_text())) == 11
    assert by_path(many)[str(folder / "p04b.png")][0] == "error"

    # Resume: keep the first four records written, then finish the folder with batch 8.
    lines = many.read_text().splitlines(keepends=True)
    many.write_text("".join(lines[:4]))
    done_ok = sum(json.loads(line)["status"] == "ok" for line in lines[:4])
    out = vacap("caption", folder, "-o", many, "--batch-size", "8", *common)
    assert f"{10 - done_ok} ok, 1 error, {done_ok} skipped" == summary_counts(out.stderr)
    assert by_path(many) == by_path(one)
    assert sum(r["status"] == "ok" for r in parse(many.read_text())) == 10

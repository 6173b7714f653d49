"""Caption text for datasets (vacap.text): hand-written cases of each pure function."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vacap.config import DecodeConfig, OutputConfig
from vacap.text import (
    bare_prompt,
    drop_incomplete,
    fill_prompt,
    finish_caption,
    plain_text,
    prompt_problem,
    strip_boilerplate,
)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("ASSISTANT: A red car parked by a wall.", "A red car parked by a wall."),
        ("  assistant:A cat.", "A cat."),
        ("<s> USER: ASSISTANT: A dog on grass.</s>", "A dog on grass."),
        ("### Assistant: Two birds.", "Two birds."),
        ("<|im_start|>assistant\nA bowl of fruit.<|im_end|>", "A bowl of fruit."),
        ("[INST] A boat. [/INST]", "A boat."),
        ('"A quiet street at night."', "A quiet street at night."),
        ("\u201cA lighthouse.\u201d", "A lighthouse."),
        # Kept: descriptive openers, a role word without its colon, quotes that do not wrap it all.
        ("The image shows a red car.", "The image shows a red car."),
        ("User interface of a phone app.", "User interface of a phone app."),
        ('"Stop" sign next to a "Yield" sign', '"Stop" sign next to a "Yield" sign'),
        ("A sign reading ASSISTANT: on a door.", "A sign reading ASSISTANT: on a door."),
    ],
)
def test_strip_boilerplate(raw, clean):
    assert strip_boilerplate(raw) == clean


@pytest.mark.parametrize(
    "cut, kept",
    [
        ("A red car. It is parked next to a", "A red car."),
        ("A red car! Is it new? The wheels are", "A red car! Is it new?"),
        ('He said "stop." Then the car', 'He said "stop."'),
        ("A ruler shows 3.5 cm and the", "A ruler shows 3.5 cm and the"),  # no sentence is complete
        ("A red car parked by the wall.", "A red car parked by the wall."),  # ended by the period itself
        ("red car, wall, street, night", "red car, wall, street, night"),  # tags: nothing to drop
        ("A cat (sitting.) On a", "A cat (sitting.)"),
        ("", ""),
    ],
)
def test_drop_incomplete(cut, kept):
    assert drop_incomplete(cut) == kept


def test_finish_caption_trims_only_cut_captions_and_wraps_the_result():
    text = "ASSISTANT: A red car. It is parked next to a"
    assert finish_caption(text, stopped_by="eos") == text
    assert finish_caption(text, stopped_by="eos", clean=True, trim=True) == "A red car. It is parked next to a"
    shaped = finish_caption(text, stopped_by="length", prefix="ohwx, ", suffix=" --v", clean=True, trim=True)
    assert shaped == "ohwx, A red car. --v"


def test_prompt_templates():
    image = Path("/data/cats/tabby.01.jpg")
    assert fill_prompt("Describe {filename} ({stem}) from {folder}.", image) == (
        "Describe tabby.01.jpg (tabby.01) from cats."
    )
    assert fill_prompt("Keep {{braces}} for {stem}", image) == "Keep {braces} for tabby.01"
    assert prompt_problem("Describe {stem}.") is None
    assert "{name}" in prompt_problem("Describe {name}.") and "{filename}" in prompt_problem("{name}")
    assert "{stem!r}" in prompt_problem("{stem!r}")
    assert "{filename.upper}" in prompt_problem("{filename.upper}")
    assert "{}" in prompt_problem("Describe {}.")
    assert "literal braces" in prompt_problem("Describe {stem")
    with pytest.raises(ValueError, match=r"unknown placeholder \{colour\}"):
        DecodeConfig(prompt="What {colour} is it?")


def test_names_fill_prompts_as_plain_text():
    reserved = {"<image>", "<s>", "</s>", "s>x"}
    # The template's own tokens stay; those in the name are broken by a zero-width space.
    image = Path("/data/<s>/<image><image>.png")
    assert fill_prompt("<image> {stem} in {folder}", image, reserved) == (
        "<image> <\u200bimage><\u200bimage> in <\u200bs>"
    )
    # A break can leave another reserved string whole ("s>x" after "<s>"): none is left.
    assert plain_text("<s>x", reserved) == "<\u200bs\u200b>x"
    # Bytes that are not UTF-8 (lone surrogates in Python's file names) cannot be tokenized.
    undecodable = os.fsdecode(b"caf\xe9")
    assert fill_prompt("{filename}", Path(f"{undecodable}.png")) == "caf\ufffd.png"
    assert bare_prompt("Describe {stem} from {folder}, {{literally}}.") == "Describe  from , {literally}."


def test_output_params_list_only_the_shaping_in_use():
    assert OutputConfig().as_params() == {}
    shaping = OutputConfig(prefix="ohwx, ", trim_incomplete=True)
    assert shaping.as_params() == {"prefix": "ohwx, ", "trim_incomplete": True}

"""Caption text for datasets: prompt templates, chat boilerplate stripped, cut-off sentences
dropped, trigger words added; a caption cut at its token boundaries. Pure string functions,
no torch."""

from __future__ import annotations

import os
import re
import string
from collections.abc import Collection, Sequence
from pathlib import Path

PLACEHOLDERS = ("filename", "stem", "folder")
# Put inside a reserved string (such as "<image>") found in a name filled into a prompt, so that
# the name reads the same but can no longer become that token.
_BREAK = "\u200b"  # zero-width space

# Chat markup a caption can begin or end with when a model repeats its template: role tags such
# as "ASSISTANT:" or "### Assistant:", special tokens written out ("<s>", "<|im_start|>"),
# Mistral's "[INST]". A role word counts only with its colon, so "User interface..." stays.
_ROLE = r"(?:#+\s*)?(?:assistant|user|system|human|gpt|bot)\s*:"
_TOKEN = r"</?s>|<\|[a-z_]+\|>(?:assistant\b)?|\[/?INST\]"
_LEADING = re.compile(rf"^\s*(?:{_ROLE}|{_TOKEN})", re.IGNORECASE)
_TRAILING = re.compile(rf"(?:{_TOKEN})\s*$", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}
# A sentence ends at . ! ? or an ellipsis, with any closing quotes or brackets after it, and
# then a space: "3.5 m" or "e.g.," has no space after its dot, so it ends nothing.
_SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*(?=\s)")
_FINAL_END = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*\s*$")


def prompt_problem(template: str) -> str | None:
    """Why ``template`` is not a usable prompt template, or None when it is.

    Placeholders are ``{filename}``, ``{stem}`` and ``{folder}``; ``{{`` and ``}}`` are literal
    braces (Python's str.format rules, without conversions, formats or attribute access)."""
    allowed = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
    except ValueError as exc:
        return f"prompt is not a valid template ({exc}); write {{{{ and }}}} for literal braces"
    for name, spec, conversion in fields:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conversion:
            written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            return (
                f"prompt has an unknown placeholder {written}; the placeholders are {allowed} "
                "(write {{ and }} for literal braces)"
            )
    return None


def fill_prompt(template: str, path: str | Path, reserved: Collection[str] = ()) -> str:
    """The prompt for one image: ``{filename}`` is its file name, ``{stem}`` the name without its
    extension, ``{folder}`` the name of the folder holding it.

    What is filled in is plain text: bytes of a name that are not UTF-8 become U+FFFD, and each
    ``reserved`` string in it (the model's special tokens, its image token) gets a zero-width
    space after its first character, so that a file named ``<image>.png`` adds no image token.
    The template itself is kept as written."""
    path = Path(path)
    folder = path.absolute().parent.name
    values = {"filename": path.name, "stem": path.stem, "folder": folder}
    return template.format(**{name: plain_text(value, reserved) for name, value in values.items()})


def bare_prompt(template: str) -> str:
    """The template with its placeholders filled with nothing: the least a prompt can take."""
    return template.format(**dict.fromkeys(PLACEHOLDERS, ""))


def plain_text(text: str, reserved: Collection[str] = ()) -> str:
    """``text`` as valid UTF-8 (undecodable file-name bytes, kept by Python as lone surrogates,
    become U+FFFD) in which no ``reserved`` string occurs (each is broken by a zero-width space)."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    reserved = sorted({r for r in reserved if len(r) > 1 and _BREAK not in r}, key=len, reverse=True)
    if not reserved:
        return text
    pattern = re.compile("|".join(map(re.escape, reserved)))
    # Matches are found without overlap, so a break can leave another reserved string whole
    # ("<s>" and "s>x" in "<s>x"): repeat until none is left. Each pass adds a break inside
    # every match, which removes that occurrence and creates none, so this ends.
    while pattern.search(text):
        text = pattern.sub(lambda match: match[0][0] + _BREAK + match[0][1:], text)
    return text


def strip_boilerplate(caption: str) -> str:
    """The caption without chat markup around it: leading role tags and special tokens,
    trailing special tokens, then one pair of quotes around the whole, and outer whitespace.
    Descriptive openers ("The image shows ...") are the caption and stay."""
    start, end = boilerplate_span(caption)
    return caption[start:end]


def boilerplate_span(caption: str) -> tuple[int, int]:
    """(start, end) of what :func:`strip_boilerplate` keeps: it is ``caption[start:end]``."""
    start, end = _strip_span(caption, 0, len(caption))
    while True:
        before = start, end
        leading = _LEADING.match(caption[start:end])
        if leading:
            start, end = _strip_span(caption, start + leading.end(), end)
        trailing = _TRAILING.search(caption[start:end])
        if trailing:
            start, end = _strip_span(caption, start, start + trailing.start())
        if (start, end) == before:
            break
    text = caption[start:end]
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1] and text[-1] not in text[1:-1]:
        start, end = _strip_span(caption, start + 1, end - 1)
    return start, end


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``text[start:end]`` without outer whitespace, as (start, end) (``str.strip``'s)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def drop_incomplete(caption: str) -> str:
    """The caption without its last sentence when that sentence has no end; unchanged when it
    ends with . ! ? or an ellipsis, or when no sentence in it is complete (keeping a cut
    caption beats leaving none)."""
    text = caption.rstrip()
    if not text or _FINAL_END.search(text):
        return text
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return text
    return text[: ends[-1].end()]


def finish_caption(
    caption: str, *, stopped_by: str, prefix: str = "", suffix: str = "", clean: bool = False, trim: bool = False
) -> str:
    """The caption as written out: boilerplate stripped (``clean``), the last sentence dropped
    when ``max_new_tokens`` cut it (``trim`` and ``stopped_by == "length"``), then the prefix and
    suffix added as given."""
    if clean:
        caption = strip_boilerplate(caption)
    if trim and stopped_by == "length":
        caption = drop_incomplete(caption)
    return f"{prefix}{caption}{suffix}"


def read_prompt_file(path: Path) -> str:
    """The prompt template in a ``--prompt-file``, its trailing newline dropped; ValueError
    saying why when it cannot be read as UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ValueError(f"cannot read --prompt-file {path}: {why}") from None


def token_texts(tokenizer, tokens: Sequence[int]) -> list[str]:
    """The caption's text cut at token boundaries: one string per token id in ``tokens``;
    joined, they give the caption exactly (``VisionLanguageModel.decode``: special tokens
    skipped, outer whitespace stripped).

    A token decoded alone loses SentencePiece's word-leading space ("▁dog" gives "dog"), so
    each token gets what it adds to the text of the tokens before it. Where the decoder changes
    earlier text (a byte-fallback character completed by a later token, a space cleaned up),
    the change goes to the token that caused it, so the pieces still join to the caption.
    """
    full = tokenizer.decode(list(tokens), skip_special_tokens=True)
    start, end = len(full) - len(full.lstrip()), len(full.rstrip())
    bounds, reached = [], start
    for i in range(1, len(tokens)):
        prefix = tokenizer.decode(list(tokens[:i]), skip_special_tokens=True)
        reached = max(reached, min(len(os.path.commonprefix([prefix, full])), end))
        bounds.append(reached)
    cuts = [start, *bounds, end]
    return [full[a:b] for a, b in zip(cuts, cuts[1:])] if tokens else []

"""`vacap show`: a caption with its tokens coloured by image attention, or its object words by
hallucination risk (records of ``vacap caption --risk``), and attention heatmaps."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image
from rich.text import Text

from vacap.diagnostics import decode_grid


def find(records_path: Path, image: str, setting: str | None = None) -> list[dict]:
    """Records of one image: exact path, else file name, else a unique part of the path."""
    records = []
    with open(records_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run
    if setting is not None:
        records = [r for r in records if setting in (r.get("setting"), r.get("method"))]
    for match in (
        lambda p: p == image,
        lambda p: Path(p).name == image,
        lambda p: image in p,
    ):
        found = [r for r in records if match(r["path"])]
        paths = {r["path"] for r in found}
        if len(paths) == 1:
            return found
        if len(paths) > 1:
            raise ValueError(f"{image!r} matches several images: {', '.join(sorted(paths)[:5])}")
    raise ValueError(f"no record for an image matching {image!r} in {records_path}")


# Backgrounds from least to most image attention for terminals without true colour, where rich
# would map the whole grey-to-red gradient onto one or two colours.
_RAMPS = {
    "256": tuple(f"on color({n})" for n in (236, 238, 240, 52, 88, 124, 160, 196)),
    "standard": ("on black", "on blue", "on magenta", "on red"),
    "windows": ("on black", "on blue", "on magenta", "on red"),
}


def _shade(level: float, color_system: str | None) -> str:
    """Background for ``level`` in [0, 1]: grey (0) to red (1), in steps where colours are few."""
    level = max(0.0, min(1.0, level))
    ramp = _RAMPS.get(color_system or "")
    if ramp is not None:
        return ramp[round(level * (len(ramp) - 1))]
    red, other = 60 + int(195 * level), 60 - int(40 * level)
    return f"on rgb({red},{other},{other})"


def with_risk(records: list[dict]) -> list[dict]:
    """The records ``--by risk`` shows: those with a risk object (a file may also hold the same
    image's records of a run without --risk); ``ValueError`` when no ok record has one."""
    scored = [record for record in records if isinstance(record.get("risk"), dict)]
    if not scored:
        record = next((r for r in records if r.get("status") == "ok"), records[-1])
        label = record.get("setting") or record.get("method")
        raise ValueError(
            f"the record of {record['path']}{f' [{label}]' if label else ''} has no risk scores: "
            "caption with --risk to score its object words"
        )
    return scored


def render(record: dict, color_system: str | None = "truecolor", by: str = "attention") -> Text:
    """The record's caption, each token on a background for its image attention share, or with
    ``by="risk"`` each object word on one for its hallucination risk (``render_risk``).

    The shades span the caption's own range of shares (the legend gives it), so that the
    tokens that looked at the image most stand out whatever the model's overall level.
    ``color_system`` is rich's (``Console.color_system``): "truecolor", "256", "standard".
    """
    label = record.get("setting") or record["method"]
    text = Text().append(f"{record['path']}  [{label}]\n", style="bold")
    if record["status"] != "ok":
        return text.append(f"{record['status']}: {record.get('error')}\n")
    if by == "risk":
        return render_risk(record, color_system, text)
    details = record.get("token_diagnostics")
    if not details:
        text.append(record["caption"] + "\n")
        return text.append("(no per-token attention: caption with --diagnostics tokens)\n", style="dim")
    shares = [entry["image_attention"] for entry in details]
    low, high = min(shares), max(shares)

    def level(share: float) -> float:
        return (share - low) / (high - low) if high > low else 1.0

    for entry in details:
        text.append(entry["token"], style=_shade(level(entry["image_attention"]), color_system))
    text.append("\nimage attention per token: ", style="dim")
    steps = 5 if high > low else 1
    for k in range(steps):
        share = low + (high - low) * k / max(steps - 1, 1)
        text.append(f" {share:.3f} ", style=_shade(level(share), color_system))
        text.append(" ")
    summary = record.get("diagnostics") or {}
    text.append(
        f"\nimage attention {summary.get('image_attention')}, sink {summary.get('sink_attention')}, "
        f"sink ratio {summary.get('sink_ratio')}, kept {summary.get('kept_fraction')}, "
        f"contrast changed {summary.get('contrast_changed')} tokens\n",
        style="dim",
    )
    return text


def render_risk(record: dict, color_system: str | None = "truecolor", text: Text | None = None) -> Text:
    """The caption with each object word (a mention of the record's ``risk`` object) on a
    background for its risk score, grey (0) to red (1) on the same ramp as attention, the rest
    unshaded; then the caption's score and one line per mention: text, object, score.

    Scores are probabilities, so the shades are absolute (0.9 is as red in every caption), not
    spread over the caption's own range as attention shares are. ``ValueError`` when a mention's
    span does not hold its text in the caption."""
    text = Text() if text is None else text
    caption, risk = record["caption"], record["risk"]
    mentions = _mentions(record)
    at = 0
    for mention in mentions:
        start, end = mention["start"], mention["end"]
        score = mention.get("score")
        text.append(caption[at:start])
        text.append(caption[start:end], style=_shade(score, color_system) if score is not None else "")
        at = end
    text.append(caption[at:] + "\n")
    overall = risk.get("score")
    if not mentions:
        return text.append("caption risk: none (no known object word in this caption)\n", style="dim")
    if overall is None:
        text.append("caption risk: none (no object word has a score)\n", style="dim")
    else:
        text.append("caption risk ", style="dim").append(f" {overall:.3f} ", style=_shade(overall, color_system))
        text.append(" (its highest object word)\n", style="dim")
    rows = [(m["text"], str(m.get("object")), m.get("score")) for m in mentions]
    width = max(len(word) for word, _, _ in [("word", "", None), *rows])
    objects = max(len(name) for _, name, _ in [("", "object", None), *rows])
    text.append(f"  {'word':<{width}}  {'object':<{objects}}  risk\n", style="dim")
    for word, name, score in rows:
        text.append(f"  {word:<{width}}  {name:<{objects}}  ")
        if score is None:
            text.append("none", style="dim")
        else:
            text.append(f"{score:.3f}", style=_shade(score, color_system))
        text.append("\n")
    return text


def _mentions(record: dict) -> list[dict]:
    """The mentions of the record's risk object in caption order; ``ValueError`` when the object
    is not what vacap writes (a span that does not hold its text, spans that overlap, a score
    that is not a number)."""
    caption, risk = record["caption"], record["risk"]
    mentions = risk.get("mentions") or []
    if not isinstance(mentions, list) or not _number_or_none(risk.get("score")):
        raise ValueError(
            f"the risk object of {record['path']} is not one vacap writes (its score or mentions); was the file edited?"
        )
    ordered = sorted(mentions, key=lambda m: m["start"] if _fits(m, caption) else -1)
    at = 0
    for mention in ordered:
        if not _fits(mention, caption) or mention["start"] < at:
            raise ValueError(
                f"the risk object of {record['path']} is not one vacap writes for its caption "
                f"(at {_named(mention)}); was the file edited?"
            )
        at = mention["end"]
    return ordered


def _fits(mention, caption: str) -> bool:
    """Whether ``mention`` has a span of ``caption`` that holds its text, and a score or null."""
    if not isinstance(mention, dict) or not all(isinstance(mention.get(k), int) for k in ("start", "end")):
        return False
    start, end = mention["start"], mention["end"]
    return 0 <= start <= end <= len(caption) and caption[start:end] == mention.get("text") and _number_or_none(
        mention.get("score")
    )


def _named(mention) -> str:
    if isinstance(mention, dict):
        return f"mention {mention.get('text')!r}, characters {mention.get('start')} to {mention.get('end')}"
    return f"mention {mention!r}"


def _number_or_none(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def write_heatmap(record: dict, out: Path, token: int | None = None) -> None:
    """The record's image with the attention of one token (or the caption mean) overlaid, as PNG."""
    from vacap.images import load_image

    summary = record.get("diagnostics")
    if not summary:
        raise ValueError("the record has no attention diagnostics; caption with --diagnostics summary or tokens")
    if token is None:
        encoded = summary.get("patch_attention")
    else:
        details = record.get("token_diagnostics") or []
        if not 0 <= token < len(details):
            raise ValueError(f"--token must be in [0, {len(details)}) for this record (--diagnostics tokens)")
        encoded = details[token]["patch_attention"]
    if encoded is None:
        raise ValueError("no patch attention in this record (the cache was compacted: KV budget or FastV)")
    grid = decode_grid(encoded, summary["grid"])
    image = load_image(Path(record["path"])).image
    if summary.get("grid_region") == "center":
        # The CLIP processor saw the centre square of the picture.
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        box = (left, top, left + side, top + side)
    else:
        box = (0, 0, image.width, image.height)
    size = (box[2] - box[0], box[3] - box[1])
    heat = Image.fromarray((grid.numpy() * 255).astype("uint8"), "L").resize(size, Image.Resampling.BILINEAR)
    red = Image.new("RGB", size, (255, 0, 0))
    region = image.crop(box)
    # Alpha follows attention: strong patches turn red, the rest shows the picture.
    region = Image.composite(red, region, heat.point(lambda v: int(v * 0.6)))
    image.paste(region, box[:2])
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")

"""Train vacap's demo LLaVA model from scratch on the shapes world, on CPU.

    python -m vacap.demo.train [--world shapes|priors] [--out DIR] [--minutes M] [--seed S] [--steps N]

The model is a real ``LlavaForConditionalGeneration``: a small CLIP vision tower (96 px input,
12 px patches: 64 image tokens), a two-layer projector and a small Llama text model, with a
word-level tokenizer over the caption vocabulary and the usual prompt words, a
``LlavaProcessor`` and the LLaVA-1.5 chat template (``USER: <image>\\n{prompt} ASSISTANT:``).
It is trained with plain PyTorch (AdamW, warm-up then cosine decay, gradient clipping) on
``train`` scenes of :mod:`vacap.demo.shapes` made on the fly from ``--seed``; the loss covers
only the caption tokens after ``ASSISTANT:`` and the closing ``</s>``. Most samples use vacap's
default prompt, some a few variants (:data:`PROMPTS`). A training-only linear probe on the
image tokens (:class:`PatchHead`: which shape and colour covers each patch) adds a dense
auxiliary loss, without which the from-scratch vision tower learns far too slowly for a
CPU budget; the probe is dropped when saving, so the checkpoint is a plain LLaVA model.

``--steps`` (default :data:`STEPS`, the shipped model's) fixes the run: the same seed, steps
and thread count (2, set here) give the same weights. ``--minutes`` is a hard time cap (the
run stops early, and ``TRAINING.md`` says so, if it is reached); with ``--steps 0`` the first
steps are timed instead and the step count is chosen to fill ``--minutes``, and the count used
is written to ``TRAINING.md``, so that run can be repeated exactly.

The shipped model stops at :data:`STEPS` on purpose: trained 4000 steps (25 minutes here) the
same recipe names 99% of test objects right and hardly ever follows a prior, which leaves a
hallucination benchmark nothing to measure; at 1500 steps it is right about four times in
five and its mistakes lean on the train priors (see ``TRAINING.md``).

``--world priors`` trains ``demo-priors`` (:data:`RECIPES`) on :mod:`vacap.demo.priors` instead:
8 text layers, the world's extra caption words, :data:`PRIORS_STEPS` steps, and the vision
tower of the shipped ``demo`` model as its starting point; the patch probe leaves out the
objects with weak evidence (see :func:`patch_labels`).

At the end the script saves the checkpoint (safetensors, fp32) and processor to ``--out``, then
captions 200 seeded ``test`` scenes greedily through ``vacap.Captioner`` (vacap's own loading
code and decode loop) and writes ``TRAINING.md`` with the command, the run's figures and
the evaluation.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Sleep rather than spin while waiting for the other OpenMP thread: with spinning, any other
# busy process on a 2-core machine makes each step several times slower. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch.nn import functional as F
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vacap.config import DEFAULT_PROMPT
from vacap.demo import MODEL_DIR, PRIORS_MODEL_DIR, priors
from vacap.demo.shapes import COLOURS, NUMBERS, SHAPES, SIZE, Scene, make_scene
from vacap.demo.worlds import WORLDS, scenes
from vacap.tiny_models import CHAT_TEMPLATE, Dims, llava_tokenizer

IMAGE_TOKEN = "<image>"
# Order fixes the ids: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
PATCH_SIZE = 12  # 96 px / 12 = an 8 x 8 grid: 64 image tokens
# (prompt, weight): the default prompt most of the time, so that is what the model knows best.
PROMPTS = (
    (DEFAULT_PROMPT, 0.7),
    ("Describe the picture.", 0.1),
    ("Describe this image.", 0.1),
    ("What is in the image?", 0.1),
)
# Words of the captions (see vacap.demo.shapes.caption_for) and of the chat template.
CAPTION_WORDS = (
    *SHAPES, *COLOURS, *NUMBERS, "a", "an", "there", "is", "and", "object", "objects", "on", "the",
    "left", "right", "at", "top", "bottom", "to", "of", "above", "below", ".", ",", ":",
)  # fmt: skip
TEMPLATE_WORDS = ("user", "assistant", ":")
# Prompt words (DEFAULT_PROMPT and the PROMPTS variants) and a few a user may type.
EXTRA_WORDS = ("please", "describe", "this", "image", "in", "detail", "what", "picture", "?", "scene", "photo")

SEED = 0
STEPS = 1500
PRIORS_STEPS = 2000
MINUTES = 45.0
BATCH_SIZE = 32
LEARNING_RATE = 1.5e-3
WEIGHT_DECAY = 0.01
WARMUP = 0.05  # share of the steps with a linear warm-up
FINAL_LR = 0.1  # cosine decay ends at this share of the peak
AUX_WEIGHT = 1.0  # weight of the per-patch shape/colour loss (see PatchHead)
EVAL_SCENES = 200
EVAL_SEED = 1234
THREADS = 2


VISION = Dims(hidden=128, layers=4, heads=4, intermediate=512)
# Four text layers at least: VASparse works on layers from start_layer (2) on.
TEXT = Dims(hidden=128, layers=4, heads=4, intermediate=384)


@dataclass(frozen=True)
class Recipe:
    """What differs between the models of the two worlds (:data:`vacap.demo.worlds.WORLDS`)."""

    vision: Dims
    text: Dims
    steps: int
    out: Path  # where the shipped model lives
    words: tuple[str, ...] = ()  # caption words beyond CAPTION_WORDS
    make_scene: Callable[[random.Random, str], Scene] = make_scene
    vision_from: Path | None = None  # a trained model whose vision tower this one starts from


RECIPES = {
    "shapes": Recipe(VISION, TEXT, STEPS, MODEL_DIR),
    # Eight text layers, so that VASparse from start_layer 2 acts on most of them.
    "priors": Recipe(
        VISION,
        Dims(hidden=128, layers=8, heads=4, intermediate=384),
        steps=PRIORS_STEPS,
        out=PRIORS_MODEL_DIR,
        words=("five", "six", "middle"),
        make_scene=priors.make_scene,
        # The shipped demo model's tower already reads shapes and colours: starting from it
        # leaves the time budget to the deeper language model and the smaller objects.
        vision_from=MODEL_DIR,
    ),
}


# --- building --------------------------------------------------------------------------------


def build_tokenizer(world: str = "shapes") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the caption vocabulary and the prompt words.

    Text is lower-cased and split on spaces (Metaspace, like SentencePiece's "▁") and then on
    punctuation, so that decoding restores the spacing exactly: ``"two objects: a red
    heart."`` round-trips. Unknown words become ``<unk>``. BOS is prepended, as in Llama.
    """
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    words = [*CAPTION_WORDS, *TEMPLATE_WORDS, *EXTRA_WORDS, *(p for p, _ in PROMPTS), *RECIPES[world].words]
    text = " ".join(words).lower()
    for piece, _ in pre_tokenizer.pre_tokenize_str(text):
        vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("\n", " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return llava_tokenizer(tokenizer, {"image_token": IMAGE_TOKEN})


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """CLIP preprocessing at 96 px, LLaVA-1.5 feature selection ("default": CLS dropped)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    )
    return LlavaProcessor(
        image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, seed: int, recipe: Recipe = RECIPES["shapes"]
) -> LlavaForConditionalGeneration:
    """A freshly initialised model (weights from ``seed`` only)."""
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        **recipe.text.config_kwargs(),
        num_key_value_heads=recipe.text.heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        **recipe.vision.config_kwargs(),
        image_size=SIZE,
        patch_size=PATCH_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        # The last layer's output: with few layers, the penultimate one would waste a layer.
        vision_feature_layer=-1,
    )
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


# --- data ------------------------------------------------------------------------------------


class Batches:
    """Training batches of freshly drawn ``train`` scenes, from one seeded RNG."""

    def __init__(self, processor: LlavaProcessor, seed: int, batch_size: int, world: str = "shapes") -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.rng = random.Random(f"vacap-demo-train:{seed}" if world == "shapes" else f"vacap-demo-train:{world}:{seed}")
        self.make_scene = RECIPES[world].make_scene
        self.batch_size = batch_size
        # Prompt token ids (BOS, chat template, image tokens expanded), one list per prompt.
        blank = make_scene(random.Random(0), "train").image
        self.prompts = []
        for prompt, _ in PROMPTS:
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = processor.apply_chat_template(conversation, add_generation_prompt=True)
            self.prompts.append(processor(images=[blank], text=[text])["input_ids"][0])
        self.weights = [w for _, w in PROMPTS]

    def next(self) -> dict[str, torch.Tensor]:
        drawn = [self.make_scene(self.rng, "train") for _ in range(self.batch_size)]
        rows, labels = [], []
        for scene in drawn:
            prompt = self.prompts[self.rng.choices(range(len(self.prompts)), self.weights)[0]]
            caption = self.tokenizer(scene.caption, add_special_tokens=False)["input_ids"]
            caption = caption + [self.tokenizer.eos_token_id]
            rows.append(list(prompt) + caption)
            labels.append([-100] * len(prompt) + caption)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        pixels = self.processor.image_processor([s.image for s in drawn], return_tensors="pt")["pixel_values"]
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
            "pixel_values": pixels,
            "patch_labels": torch.tensor([patch_labels(s.objects) for s in drawn]),
        }


def patch_labels(objects) -> list[list[int]]:
    """Per image patch (row-major), [shape, colour]: 0 for background, else 1 + the index in
    SHAPES / COLOURS of the object whose bounding box holds the patch centre; -100 (left out of
    the loss) for an object with weak evidence (the priors world's ``Shape.weak``), whose
    reading the model must learn from the captions alone, where the train priors help."""
    grid = SIZE // PATCH_SIZE
    colours = list(COLOURS)
    labels = []
    for row in range(grid):
        for col in range(grid):
            cx, cy = col * PATCH_SIZE + PATCH_SIZE / 2, row * PATCH_SIZE + PATCH_SIZE / 2
            hit = next((o for o in objects if abs(cx - o.x) <= o.size / 2 and abs(cy - o.y) <= o.size / 2), None)
            if hit is None:
                labels.append([0, 0])
            elif hit.weak is not None:
                labels.append([-100, -100])
            else:
                labels.append([1 + SHAPES.index(hit.kind), 1 + colours.index(hit.colour)])
    return labels


# --- training --------------------------------------------------------------------------------


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, int(WARMUP * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress))


class PatchHead(torch.nn.Module):
    """Training-only probe: (shape, colour) of each image token, from the projected features.

    The caption loss alone teaches a vision tower trained from scratch very slowly (it has to
    find out through the language model what matters in the image); this dense auxiliary loss
    tells it directly. The head is not saved: the checkpoint is a plain LLaVA model.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.shape = torch.nn.Linear(hidden, 1 + len(SHAPES))
        self.colour = torch.nn.Linear(hidden, 1 + len(COLOURS))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.shape(features).flatten(0, 1), labels[..., 0].flatten()) + F.cross_entropy(
            self.colour(features).flatten(0, 1), labels[..., 1].flatten()
        )


def _losses(
    model: LlavaForConditionalGeneration, head: PatchHead, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption loss, auxiliary patch loss), with one pass through the vision tower."""
    features = torch.stack(list(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    image_mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_mask, features.to(embeds.dtype))
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    caption = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return caption, head(features, batch["patch_labels"])


def train(
    out: Path,
    *,
    minutes: float,
    seed: int = SEED,
    steps: int | None = None,
    batch_size: int = BATCH_SIZE,
    lr: float = LEARNING_RATE,
    world: str = "shapes",
    log=print,
) -> dict:
    """Train a model for ``world`` and save it to ``out``; returns the run's figures."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(world)
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed, RECIPES[world])
    if RECIPES[world].vision_from is not None:
        trained = LlavaForConditionalGeneration.from_pretrained(RECIPES[world].vision_from, dtype=torch.float32)
        model.model.vision_tower.load_state_dict(trained.model.vision_tower.state_dict())
        log(f"vision tower from {RECIPES[world].vision_from}")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    parts = {"vision": "vision_tower", "projector": "multi_modal_projector", "text": ""}
    by_part = dict.fromkeys(parts, 0)
    for name, p in model.named_parameters():
        by_part[next(part for part, key in parts.items() if key in name)] += p.numel()
    log(f"parameters: {n_params:,} {by_part}")
    head = PatchHead(RECIPES[world].text.hidden)
    named = [*model.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    batches = Batches(processor, seed, batch_size, world)
    budget = minutes * 60
    start = time.perf_counter()
    planned = steps
    calibrate = 20
    losses: list[float] = []
    aux_losses: list[float] = []
    step = 0
    stopped_early = False
    while planned is None or step < planned:
        if planned is None and step == calibrate:
            per_step = (time.perf_counter() - start) / calibrate
            planned = max(calibrate + 1, int(budget / per_step * 0.97))
            log(f"{per_step:.2f} s/step: planning {planned} steps for {minutes:g} minutes")
        if planned is not None and time.perf_counter() - start > budget:
            stopped_early = True
            log(f"time budget of {minutes:g} minutes reached at step {step} of {planned}")
            break
        # Until calibrated, the schedule assumes a long run: warm-up is all that happens then.
        factor = _lr_factor(step, planned if planned is not None else 10**6)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        loss, aux = _losses(model, head, batches.next())
        optimizer.zero_grad(set_to_none=True)
        (loss + AUX_WEIGHT * aux).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        losses.append(loss.item())
        aux_losses.append(aux.item())
        step += 1
        if step % 50 == 0:
            recent = sum(losses[-50:]) / len(losses[-50:])
            recent_aux = sum(aux_losses[-50:]) / len(aux_losses[-50:])
            log(
                f"step {step}/{planned}  loss {recent:.4f}  patch loss {recent_aux:.4f}  lr {lr * factor:.2e}  "
                f"{time.perf_counter() - start:.0f} s"
            )
    seconds = time.perf_counter() - start
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tail = losses[-100:]
    return {
        "seed": seed,
        "steps": step,
        "planned_steps": planned,
        "stopped_early": stopped_early,
        "batch_size": batch_size,
        "lr": lr,
        "minutes": seconds / 60,
        "final_loss": sum(tail) / len(tail),
        "final_patch_loss": sum(aux_losses[-100:]) / len(aux_losses[-100:]),
        "parameters": n_params,
        "parameters_by_part": by_part,
        "samples": step * batch_size,
    }


# --- evaluation and report -------------------------------------------------------------------


def prior_hallucinations(texts: list[str], shown, world: str = "shapes") -> dict[str, tuple[int, int]]:
    """How often captions of test scenes follow a train prior of ``world`` the scene does not have.

    -> name: (captions that follow it, scenes where it could show).
    """
    from vacap.evaluate.shapes import extract_objects, world_priors

    partners, usual_colours = world_priors(world)
    found: dict[str, list[int]] = {}
    for text, scene in zip(texts, shown):
        kinds = {o.kind for o in scene.objects}
        mentions = extract_objects(text)
        for trigger, partner in partners.items():
            if trigger in kinds and partner not in kinds:
                hit = any(shape == partner for _, shape in mentions)
                found.setdefault(f"names a {partner} next to a {trigger} without one", []).append(hit)
        for kind, colour in usual_colours.items():
            for obj in scene.objects:
                if obj.kind == kind and obj.colour != colour:
                    hit = (colour, kind) in mentions
                    found.setdefault(f"calls a non-{colour} {kind} {colour}", []).append(hit)
    return {name: (sum(hits), len(hits)) for name, hits in found.items()}


def evaluate(out: Path, n: int = EVAL_SCENES, seed: int = EVAL_SEED, world: str = "shapes") -> tuple[dict, dict]:
    """Greedy captions of ``n`` test scenes through vacap.Captioner -> (benchmark row, priors)."""
    from vacap.evaluate.shapes import run_benchmark

    (row,) = run_benchmark(str(out), {"greedy": {"method": "greedy"}}, n=n, seed=seed, dtype="fp32", world=world)
    return row, prior_hallucinations(row["texts"], scenes(n, seed, "test", world=world), world)


def _size_on_disk(out: Path) -> float:
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6


def write_report(
    out: Path, command: str, run: dict, row: dict, priors: dict, n: int, seed: int, world: str = "shapes"
) -> str:
    from vacap.evaluate.shapes import format_table

    recipe = RECIPES[world]
    examples = "\n".join(
        f"| {i} | {', '.join(f'{o.colour} {o.kind}' + (f' ({o.weak})' if o.weak else '') for o in scene.objects)} "
        f"| {text} |"
        for i, (scene, text) in enumerate(zip(scenes(8, seed, "test", world=world), row["texts"][:8]))
    )
    prior_lines = "\n".join(
        f"| {name} | {hits} / {total} | {100 * hits / total:.0f}% |" if total else f"| {name} | 0 / 0 | - |"
        for name, (hits, total) in priors.items()
    )
    note = " (stopped early: time budget reached)" if run["stopped_early"] else ""
    module = "vacap.demo.priors" if world == "priors" else "vacap.demo.shapes"
    start = "from the shipped `demo` model's vision tower" if recipe.vision_from else "from scratch"
    text = f"""# vacap demo model ({world} world): how it was trained

A real `LlavaForConditionalGeneration` trained {start} on CPU on the synthetic {world}
world of `{module}` (`train` split, made on the fly). See `vacap/demo/train.py`.

## Run

    {command}

| | |
| --- | --- |
| seed | {run['seed']} |
| steps | {run['steps']}{note} |
| batch size | {run['batch_size']} ({run['samples']:,} scenes, each drawn fresh) |
| peak learning rate | {run['lr']:g} (AdamW, {WARMUP:.0%} warm-up, cosine decay to {FINAL_LR:g} x) |
| wall time | {run['minutes']:.1f} minutes on {THREADS} CPU threads |
| final caption loss (mean of the last 100 steps, nats per token) | {run['final_loss']:.4f} |
| final auxiliary patch loss (training only, see `PatchHead`) | {run['final_patch_loss']:.4f} |
| parameters | {run['parameters']:,}: {', '.join(f'{k} {v:,}' for k, v in run['parameters_by_part'].items())} (fp32 safetensors, {_size_on_disk(out):.1f} MB folder) |
| vision tower | CLIP, {SIZE} px, patch {PATCH_SIZE} ({(SIZE // PATCH_SIZE) ** 2} image tokens), hidden {recipe.vision.hidden}, {recipe.vision.layers} layers, {recipe.vision.heads} heads, MLP {recipe.vision.intermediate} |
| text model | Llama, hidden {recipe.text.hidden}, {recipe.text.layers} layers, {recipe.text.heads} heads, MLP {recipe.text.intermediate} |

Same seed, steps and thread count give the same weights.

## Greedy evaluation

{n} `test` scenes (`scenes({n}, {seed}, "test", world="{world}")`: no priors), captioned with
`vacap.Captioner(path, method="greedy", dtype="fp32")`, i.e. vacap's own loading code and decode
loop, scored by `vacap.evaluate.shapes` (object precision = 1 - CHAIR_i):

{format_table([row])}
Object precision {100 * (1 - row['CHAIR_i']):.1f}%, recall {100 * row['recall']:.1f}%
(shape only: precision {100 * (1 - row['CHAIR_i_shape']):.1f}%, recall {100 * row['recall_shape']:.1f}%).
Hallucinations by cause (`vacap.evaluate.shapes.hallucination_cause`): CHAIR_i prior-driven
{100 * row['CHAIR_i_prior']:.1f}%, perceptual {100 * row['CHAIR_i_perceptual']:.1f}% (prior share
{100 * row['prior_share']:.0f}%); by position in the caption, CHAIR_i {100 * row['CHAIR_i_1st']:.1f}% (1st),
{100 * row['CHAIR_i_2nd']:.1f}% (2nd), {100 * row['CHAIR_i_3rd']:.1f}% (3rd), {100 * row['CHAIR_i_later']:.1f}% (later).

Train priors showing up on test scenes that do not have them:

| prior followed | captions | rate |
| --- | ---: | ---: |
{prior_lines}

First test scenes:

| # | ground truth | greedy caption |
| --- | --- | --- |
{examples}
"""
    (out / "TRAINING.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vacap.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=WORLDS, default="shapes", help="scene world (default: shapes)")
    parser.add_argument("--out", type=Path, help="output folder (default: the world's shipped model's)")
    parser.add_argument("--minutes", type=float, default=MINUTES, help=f"time cap (default {MINUTES:g})")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--steps",
        type=int,
        help=f"step count (default {STEPS}, {PRIORS_STEPS} for priors); 0: as many as fit in --minutes",
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--eval-scenes", type=int, default=EVAL_SCENES)
    args = parser.parse_args(argv)

    recipe = RECIPES[args.world]
    out_dir = args.out or recipe.out
    steps = recipe.steps if args.steps is None else args.steps or None
    run = train(
        out_dir, minutes=args.minutes, seed=args.seed, steps=steps, batch_size=args.batch_size, lr=args.lr,
        world=args.world,
    )  # fmt: skip
    print(f"trained {run['steps']} steps in {run['minutes']:.1f} min, final loss {run['final_loss']:.4f}")
    row, priors = evaluate(out_dir, n=args.eval_scenes, world=args.world)
    shipped = out_dir.resolve() == recipe.out
    out = str(recipe.out.relative_to(Path(__file__).resolve().parents[2])) if shipped else str(out_dir)
    command = (
        f"python -m vacap.demo.train --world {args.world} --out {out} --seed {run['seed']} --steps {run['steps']} "
        f"--batch-size {run['batch_size']} --lr {run['lr']:g} --minutes {args.minutes:g}"
    )
    report = write_report(out_dir, command, run, row, priors, args.eval_scenes, EVAL_SEED, args.world)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

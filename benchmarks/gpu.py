"""vacap on a GPU, in one run: parity with Hugging Face ``generate``, the methods across batch
sizes, bitsandbytes, speed beside ``generate``, and a whole ``vacap caption`` run (issue 28).

    python benchmarks/gpu.py --out results/gpu             # an H200: 7B shapes, about 8 minutes
    python benchmarks/gpu.py --dry-run --out /tmp/gpu      # CPU, tiny models, the same code paths
    python benchmarks/gpu.py --scale wide --device cpu --sections speed --out /tmp/wide

Weights are random and built where they run (no hub): the processor and config of a random
checkpoint of ``vacap.tiny_models`` (``llava-llama`` with 576 image tokens per image, as
LLaVA-1.5's; ``llava-next`` whose anyres grid gives 2928 for a 384-px square, as LLaVA-NeXT's
up to 2880), its widths and depths replaced by the 7B model's (``--scale 7b``: Vicuna-7B's
text model, 4096 wide, 32 layers, vocabulary 32064; CLIP ViT-L's 1024-wide, 24-layer tower,
whose 24 x 24 patches cost what 336-px ones do), made on the device in the run's dtype and
wrapped by vacap's own adapter (``VisionLanguageModel``), as ``load_model`` wraps a loaded
checkpoint. ``--scale wide`` keeps 6 of the 32 layers (what 2 CPU cores hold), ``tiny`` is the
tiny checkpoints' own size. Where a whole command needs a folder (``vacap caption``, the
bitsandbytes loading), the model is saved to one under ``--work``.

Sections run in this order, the goals first, each within its own time budget and the whole
within ``--budget`` seconds; each item of a section is written to ``DIR/results.json`` and
``DIR/results.md`` as soon as it is measured, so a run stopped part way keeps what it measured:

1. ``speed``: HF ``generate`` (SDPA), vacap greedy with dynamic, static and compiled steps
   (``--compile``) and vacap VASparse, taking turns round by round at each batch size of the
   600-token prompt (then ``speed-long``: 2.9k tokens; ``speed-32``: batch 32). Per setting:
   prefill s (a one-token call), ms per decode step ((N-token call - one-token call) / (N - 1)),
   tokens/s and images/s of whole N-token calls, decode tokens/s (the steps alone), the
   16-token call's seconds, and on CUDA the prefill's peak memory above the weights.
   EOS never ends a call (vacap's stop set is emptied, ``generate`` gets ``min_new_tokens``).
2. ``parity``: vacap greedy against ``generate`` in fp16 and bf16 (fp32 and bf16 on CPU), batch
   1 and 8, every row's prompt different so that batches are left padded: per row the share of
   steps up to the first difference, that step, and the logit margin there (HF's logit of its
   token less that of vacap's).
3. ``caption``: ``vacap caption`` (a subprocess, background loading on) on ``--images`` copies
   of the sample images at batch 32, GPU utilisation sampled by ``nvidia-smi`` every 100 ms
   while records are being written.
4. ``methods``: VASparse, VCD, FastV and ``--risk`` in fp32 at batch 8 and each image alone.
5. ``quant``: bitsandbytes 4-bit and 8-bit through ``load_model`` on the device.

``goals`` in the JSON holds each goal of issue 28 with its figure, its threshold and whether it
is met (None where the run did not measure it). Random weights make near-uniform logits, so in
fp16 and bf16 ties break differently between kernels: parity there is a rate, not a yes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from speed import HF, PROMPT, SAMPLES, SETTINGS

from vacap.config import DecodeConfig
from vacap.decode import Steering, generate
from vacap.methods import steering_for
from vacap.model import DTYPES, SUPPORTED_ARCHITECTURES, Preparer, VisionLanguageModel, load_model
from vacap.risk_signals import RiskSettings
from vacap.tiny_models import ARCHITECTURES, build_tiny_model

# Every row of a parity batch gets its own prompt, so that rows differ in length and are left padded.
PROMPTS = (
    PROMPT,
    "What is in the picture?",
    "Describe the scene briefly.",
    "Please describe this image in detail. What is in the picture?",
    "Describe this image.",
    "What do you see? Describe the scene briefly and in detail.",
    "Describe the picture.",
    "A photo of",
)
# Bytes per second each GPU reads from its memory (vendors' figures), for the bandwidth limit.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12}
QWEN = "Qwen2_5_VLForConditionalGeneration"

# Each scale's dimensions, as config attributes: the text model's, then the vision tower's
# (None: the geometry checkpoint's own). 7B: Vicuna-7B / Llama-2-7B and CLIP ViT-L/14.
TEXT_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32064, initializer_range=0.02)  # fmt: skip
CLIP_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
# Qwen2.5-VL-7B-Instruct's config.json.
QWEN_TEXT = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064, initializer_range=0.02)  # fmt: skip
QWEN_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584)


@dataclass(frozen=True)
class Shape:
    """A model shape: the ``vacap.tiny_models`` architecture and size that give its processor
    and image geometry, and the dimensions each scale puts in."""

    name: str
    arch: str | None
    geometry: str
    text: dict
    vision: dict | None
    side: int = 0  # images are resized to side x side (0: as they are), to fill an anyres grid

    def dims(self, scale: str) -> tuple[dict, dict | None]:
        if scale == "tiny":
            return {}, None
        if scale == "wide":
            return {**self.text, "num_hidden_layers": 6}, None
        return self.text, self.vision


def _qwen_arch() -> str | None:
    return next((a for a in ARCHITECTURES if "qwen2.5-vl" in a or "qwen2_5_vl" in a), None)


SHAPES = {
    "llava-1.5-7b": Shape("llava-1.5-7b", "llava-llama", "mid", TEXT_7B, CLIP_L),
    "llava-next-7b": Shape("llava-next-7b", "llava-next", "long", TEXT_7B, CLIP_L, side=384),
    "qwen2.5-vl-7b": Shape("qwen2.5-vl-7b", _qwen_arch(), "mid", QWEN_TEXT, QWEN_VISION),
}


def unsupported(shape: Shape) -> str | None:
    """Why this vacap cannot run ``shape``, or None."""
    if shape.name.startswith("qwen"):
        if QWEN not in SUPPORTED_ARCHITECTURES:
            return f"not supported by this vacap ({QWEN} is not in vacap.model.SUPPORTED_ARCHITECTURES)"
        if shape.arch is None:
            return "not supported by this vacap's tiny_models (no random Qwen2.5-VL checkpoint to build it from)"
    return None


@dataclass
class Plan:
    """What one run measures; ``--dry-run`` shrinks every size and keeps every code path."""

    scale: str
    device: torch.device
    dtype: torch.dtype
    batches: tuple[int, ...]
    wide_batch: int
    short: int  # new tokens of the short call (the 16-token captions of the goals)
    long: int  # new tokens of the long call (tokens/s, ms per step, 64-token captions)
    rounds: int
    parity_dtypes: tuple[str, ...]
    parity_batch: int
    parity_tokens: int
    method_batch: int
    method_tokens: int
    images: int
    caption_batch: int
    caption_tokens: int
    budgets: dict[str, float] = field(default_factory=dict)


# Seconds for the whole run: under 8 minutes, so that one 10-minute command holds it with its start.
DEFAULT_BUDGET = 470.0
SECTIONS = ("speed", "parity", "speed-long", "caption", "methods", "quant", "speed-32")


def plan_for(args) -> Plan:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dry_run:
        return Plan(
            scale="tiny", device=device, dtype=torch.float32, batches=(1, 2), wide_batch=3, short=2, long=4,
            rounds=1, parity_dtypes=("fp32", "bf16"), parity_batch=3, parity_tokens=6, method_batch=3,
            method_tokens=4, images=args.images or 3, caption_batch=2, caption_tokens=4,
            budgets={name: 60.0 for name in SECTIONS},
        )  # fmt: skip
    gpu = device.type == "cuda"
    return Plan(
        scale=args.scale, device=device, dtype=DTYPES[args.dtype or ("fp16" if gpu else "fp32")],
        batches=(1, 8), wide_batch=32, short=16, long=64, rounds=2,
        parity_dtypes=("fp16", "bf16") if gpu else ("fp32", "bf16"), parity_batch=8, parity_tokens=32,
        method_batch=8, method_tokens=16, images=args.images or 1000, caption_batch=32, caption_tokens=16,
        budgets={"speed": 150, "parity": 60, "speed-long": 70, "caption": 120, "methods": 45, "quant": 25,
                 "speed-32": 60},
    )  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Report:
    """The run's results, rewritten to ``DIR/results.json`` and ``DIR/results.md`` after every item."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data = {"meta": meta, "sections": {}, "goals": {}}

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {"status": "running", "rows": [], "skipped": []})

    def add(self, name: str, row: dict) -> None:
        self.section(name)["rows"].append(row)
        self.save()

    def save(self) -> None:
        texts = {"results.json": json.dumps(self.data, indent=1, default=str), "results.md": self.table()}
        for name, text in texts.items():
            partial = self.out / f".{name}.partial"
            partial.write_text(text + "\n", encoding="utf-8")
            os.replace(partial, self.out / name)

    def table(self) -> str:
        lines = [f"# vacap on {self.data['meta']['device_name']} ({self.data['meta']['scale']} scale)", ""]
        lines += [f"- {key}: {value}" for key, value in self.data["meta"].items()]
        lines += ["", "## Goals", "", "| goal | figure | threshold | met | note |", "|---|---:|---:|---|---|"]
        for name, goal in self.data["goals"].items():
            threshold = f"{goal['rule']} {goal['threshold']}"
            lines.append(f"| {name} | {_cell(goal['figure'])} | {threshold} | {_cell(goal['met'])} | {goal['note']} |")
        for name, section in self.data["sections"].items():
            lines += ["", f"## {name} ({section['status']}, {_cell(section.get('seconds'))} s)", ""]
            rows = section["rows"]
            if rows:
                columns = list(dict.fromkeys(key for row in rows for key in row if not isinstance(row[key], list)))
                lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
            lines += [f"- skipped: {item}" for item in section["skipped"]]
            if section.get("error"):
                lines += ["", "```", section["error"], "```"]
        return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


class Clock:
    """The run's deadline and the current section's."""

    def __init__(self, budget: float) -> None:
        self.end = time.monotonic() + budget
        self.section_end = self.end

    def start(self, seconds: float) -> None:
        self.section_end = min(self.end, time.monotonic() + seconds)

    def left(self) -> float:
        return self.section_end - time.monotonic()


class Models:
    """Random models built on the device, the last few kept for the sections that follow."""

    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan, self.work = plan, work
        self.built: dict[tuple[str, torch.dtype], VisionLanguageModel] = {}
        self.folders: dict[str, Path] = {}

    def geometry(self, shape: Shape) -> Path:
        """The random tiny_models checkpoint whose processor, config and image geometry ``shape`` takes."""
        size = "tiny" if self.plan.scale == "tiny" else shape.geometry
        key = f"{shape.arch}-{size}"
        if key not in self.folders:
            self.folders[key] = build_tiny_model(shape.arch, self.work / key, size=size)
        return self.folders[key]

    def get(self, shape: Shape, dtype: torch.dtype, keep: int = 2) -> VisionLanguageModel:
        key = (shape.name, dtype)
        if key not in self.built:
            while len(self.built) >= keep:
                self.built.pop(next(iter(self.built)))
            _free(self.plan.device)
            self.built[key] = build_model(shape, self.geometry(shape), self.plan.scale, dtype, self.plan.device)
        return self.built[key]

    def clear(self) -> None:
        self.built.clear()
        _free(self.plan.device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_model(
    shape: Shape, folder: Path, scale: str, dtype: torch.dtype, device: torch.device
) -> VisionLanguageModel:
    """``shape`` at ``scale`` with random weights made on ``device`` in ``dtype``, wrapped as
    ``load_model`` wraps a checkpoint; EOS taken out of the stop set (every call makes N tokens)."""
    import transformers
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    text, vision = shape.dims(scale)
    for name, value in text.items():
        setattr(config.text_config, name, value)
    for name, value in (vision or {}).items():
        setattr(config.vision_config, name, value)
    torch.manual_seed(0)
    with torch.device(device):
        hf = getattr(transformers, config.architectures[0])._from_config(config, dtype=dtype)
    hf.generation_config = GenerationConfig.from_pretrained(folder)
    model = VisionLanguageModel(
        name=f"random {shape.name} ({scale})", hf=hf.eval(), preparer=Preparer.load(str(folder)), device=device,
        dtype=dtype,
    )  # fmt: skip
    model.eos_ids = ()
    return model


def images_for(shape: Shape, count: int) -> list[Image.Image]:
    paths = sorted(SAMPLES.iterdir())
    images = [Image.open(paths[i % len(paths)]).convert("RGB") for i in range(count)]
    return [image.resize((shape.side, shape.side)) for image in images] if shape.side else images


def call(model: VisionLanguageModel, inputs: dict, setting: str, kind: str, n: int) -> list[list[int]]:
    """One call making ``n`` tokens per row: HF ``generate`` or a vacap setting with ``kind`` steps."""
    if setting == HF:
        out = model.hf.generate(
            **inputs, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n, pad_token_id=model.pad_id
        )
        tokens = out[:, inputs["input_ids"].shape[1] :].tolist()
    else:
        steering = steering_for(model, DecodeConfig(max_new_tokens=n, **SETTINGS[setting]))
        tokens = [out.tokens for out in generate(model, inputs, steering, n, steps=kind)]
    if any(len(row) != n for row in tokens):
        raise RuntimeError(f"{setting} ({kind}) made {[len(row) for row in tokens]} tokens per row, not {n}")
    return tokens


def timed(model, inputs, setting: str, kind: str, n: int) -> float:
    sync(model.device)
    start = time.perf_counter()
    call(model, inputs, setting, kind, n)
    sync(model.device)
    return time.perf_counter() - start


def prefill_peak_mb(model, inputs, setting: str, kind: str) -> float | None:
    """How far one prefill (a one-token call) raises the device's allocated memory, MB; None on CPU."""
    if model.device.type != "cuda":
        return None
    _free(model.device)
    torch.cuda.reset_peak_memory_stats(model.device)
    base = torch.cuda.memory_allocated(model.device)
    call(model, inputs, setting, kind, 1)
    return (torch.cuda.max_memory_allocated(model.device) - base) / 2**20


SPEED_SETTINGS = (
    (HF, "-"), ("greedy", "dynamic"), ("greedy", "static"), ("greedy", "compiled"), ("vasparse", "dynamic")
)


def text_weight_bytes(model: VisionLanguageModel) -> int:
    """Bytes of the weights a decode step reads: the language model's layers and final norm and
    the LM head (of the input embeddings it reads one row per token)."""
    parts = [*model.layers, model.norm, model.lm_head]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def speed_cell(report: Report, name: str, model, shape: Shape, batch: int, plan: Plan, clock: Clock) -> None:
    """Every setting of ``SPEED_SETTINGS`` at one batch size, taking turns round by round."""
    inputs = model.prepare(images_for(shape, batch), PROMPT)
    prompt = inputs["input_ids"].shape[1]
    settings, compile_s = [], None
    for setting, kind in SPEED_SETTINGS:
        if clock.left() < 5:
            report.section(name)["skipped"].append(f"{shape.name} batch {batch} {setting} {kind}: time budget")
            continue
        first = timed(model, inputs, setting, kind, 2)  # warm-up; a compiled step compiles here
        if kind == "compiled":
            compile_s = first - timed(model, inputs, setting, kind, 2)
        settings.append((setting, kind))
    times = {s: {1: [], plan.short: [], plan.long: []} for s in settings}
    for _ in range(plan.rounds):
        for s in settings:
            for n in times[s]:
                times[s][n].append(timed(model, inputs, *s, n))
        if clock.left() < 0:
            break
    for setting, kind in settings:
        t = {n: statistics.median(values) for n, values in times[(setting, kind)].items()}
        steps = max(t[plan.long] - t[1], 1e-9)
        report.add(name, {
            "shape": shape.name, "batch": batch, "prompt": prompt, "setting": setting, "steps": kind,
            "prefill_s": t[1], "ms_per_step": 1000 * steps / (plan.long - 1),
            "tokens_per_s": batch * plan.long / t[plan.long], "images_per_s": batch / t[plan.long],
            "decode_tokens_per_s": batch * (plan.long - 1) / steps, f"call_{plan.short}_s": t[plan.short],
            f"call_{plan.long}_s": t[plan.long], "compile_s": compile_s if kind == "compiled" else None,
            "prefill_peak_mb": prefill_peak_mb(model, inputs, setting, kind), "rounds": len(times[(setting, kind)][1]),
        })  # fmt: skip


def run_speed(report: Report, name: str, models: Models, plan: Plan, clock: Clock) -> None:
    short, long = SHAPES["llava-1.5-7b"], SHAPES["llava-next-7b"]
    cells = {"speed": [(short, plan.batches)], "speed-long": [(long, plan.batches)],
             "speed-32": [(short, (plan.wide_batch,)), (long, (plan.wide_batch,))]}[name]  # fmt: skip
    for shape, batches in cells:
        model = models.get(shape, plan.dtype)
        report.data["meta"].setdefault("text_weight_bytes", text_weight_bytes(model))
        for batch in batches:
            speed_cell(report, name, model, shape, batch, plan, clock)


def parity_row(model, inputs, n: int) -> list[dict]:
    """vacap greedy against ``generate`` on one batch: per row, agreement and the first difference."""
    out = model.hf.generate(
        **inputs, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n, pad_token_id=model.pad_id,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    theirs = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
    logits = torch.stack(out.logits, 1).float()  # (B, n, V)
    ours = [g.tokens for g in generate(model, inputs, Steering(), n)]
    rows = []
    for b, (mine, hf) in enumerate(zip(ours, theirs)):
        step = next((j for j, (x, y) in enumerate(zip(mine, hf)) if x != y), None)
        margin = None if step is None else float(logits[b, step, hf[step]] - logits[b, step, mine[step]])
        rows.append({
            "row": b, "prompt": int(inputs["attention_mask"][b].sum()), "agreement": (n if step is None else step) / n,
            "first_diverging_step": step, "logit_margin": margin, "tokens": mine, "hf_tokens": hf,
        })  # fmt: skip
    return rows


def run_parity(report: Report, name: str, models: Models, plan: Plan, clock: Clock) -> None:
    for shape in SHAPES.values():
        why = unsupported(shape)
        if why:
            report.add(name, {"shape": shape.name, "status": why})
            continue
        for dtype in plan.parity_dtypes:
            for batch in (1, plan.parity_batch):
                if clock.left() < 5:
                    report.section(name)["skipped"].append(f"{shape.name} {dtype} batch {batch}: time budget")
                    continue
                model = models.get(shape, DTYPES[dtype])
                inputs = model.prepare(images_for(shape, batch), [PROMPTS[i % len(PROMPTS)] for i in range(batch)])
                for row in parity_row(model, inputs, plan.parity_tokens):
                    report.add(name, {"shape": shape.name, "dtype": dtype, "batch": batch, **row})


METHODS = {
    "vasparse": dict(method="vasparse"),
    "vcd": dict(method="vcd"),
    "fastv": dict(method="fastv"),
    "greedy-risk": dict(method="greedy", risk=True),
    "vasparse-risk": dict(method="vasparse", risk=True),
}


def run_methods(report: Report, name: str, models: Models, plan: Plan, clock: Clock) -> None:
    """Each method at batch ``method_batch`` and on each image alone, fp32: the same captions?"""
    shape = SHAPES["llava-1.5-7b"]
    models.clear()  # fp32 7B is 28 GB: nothing else stays
    model = models.get(shape, torch.float32, keep=1)
    images = images_for(shape, plan.method_batch)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(plan.method_batch)]
    names = [f"image-{i}" for i in range(plan.method_batch)]
    for method, settings in METHODS.items():
        if clock.left() < 5:
            report.section(name)["skipped"].append(f"{method}: time budget")
            continue
        config = DecodeConfig(max_new_tokens=plan.method_tokens, **settings)
        n, risk = plan.method_tokens, RiskSettings.of(config)
        sync(model.device)
        start = time.perf_counter()
        batch = model.prepare(images, prompts)
        together = generate(model, batch, steering_for(model, config), n, identities=names, risk=risk)
        sync(model.device)
        seconds = time.perf_counter() - start
        alone = [
            generate(model, model.prepare([image], prompt), steering_for(model, config), n, identities=[who],
                     risk=risk)[0]
            for image, prompt, who in zip(images, prompts, names)
        ]  # fmt: skip
        same = [a.tokens == b.tokens for a, b in zip(together, alone)]
        report.add(name, {
            "method": method, "batch": plan.method_batch, "dtype": "fp32", "same_rows": sum(same),
            "rows": len(same), "same": all(same), "batch_seconds": seconds,
            "tokens": [out.tokens for out in together], "alone_tokens": [out.tokens for out in alone],
        })  # fmt: skip


def run_quant(report: Report, name: str, models: Models, plan: Plan, clock: Clock) -> None:
    """bitsandbytes 4-bit and 8-bit loaded by ``load_model`` on the device, captioning a batch of 2."""
    shape = SHAPES["llava-1.5-7b"]
    if plan.scale == "tiny":
        folder = build_tiny_model("llava-llama", models.work / "quantizable", quantizable=True)
    else:  # the mid checkpoint's text model (~310M) has dimensions bitsandbytes quantizes
        folder = models.geometry(shape)
    dtype = "fp16" if plan.device.type == "cuda" else "fp32"
    for quant in ("4bit", "8bit"):
        if clock.left() < 5:
            report.section(name)["skipped"].append(f"{quant}: time budget")
            continue
        row = {"quant": quant, "device": str(plan.device), "dtype": dtype, "checkpoint": folder.name,
               "max_new_tokens": plan.method_tokens}  # fmt: skip
        try:
            model = load_model(str(folder), dtype=dtype, device=str(plan.device), quant=quant)
            model.eos_ids = ()
            layers = {type(m).__name__ for m in model.hf.model.language_model.modules()}
            sync(model.device)
            start = time.perf_counter()
            out = generate(model, model.prepare(images_for(shape, 2), PROMPT), Steering(), plan.method_tokens)
            sync(model.device)
            row.update(status="ok", seconds=time.perf_counter() - start, tokens=[o.tokens for o in out],
                       caption=model.decode(out[0].tokens),
                       quantized_layers=sorted(layers & {"Linear4bit", "Linear8bitLt"}),
                       memory_mb=model.hf.get_memory_footprint() / 2**20)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 -- a failed load is this section's finding
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        report.add(name, row)


class Utilisation:
    """GPU utilisation samples (time, percent) from ``nvidia-smi -lms``, or from ``torch.cuda.utilization``
    where nvidia-smi is missing; none on a machine without a GPU."""

    def __init__(self, device: torch.device, interval_ms: int = 100) -> None:
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self._stop = threading.Event()
        self._process = None
        if device.type != "cuda":
            return
        index = device.index or 0
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._process = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"--loop-ms={interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            self._thread = threading.Thread(target=self._read, daemon=True)
        else:
            self.source = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll, args=(index, interval_ms / 1000), daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            if line.strip().isdigit():
                self.samples.append((time.monotonic(), float(line)))

    def _poll(self, index: int, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.samples.append((time.monotonic(), float(torch.cuda.utilization(index))))
            except Exception:  # noqa: BLE001 -- pynvml missing: no samples, said in the results
                self.source = "unavailable (no nvidia-smi, no pynvml)"
                return

    def stop(self) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
        if self.source != "none":
            self._thread.join(timeout=2)

    def between(self, start: float, end: float) -> list[float]:
        return [value for at, value in self.samples if start <= at <= end]


def run_caption(report: Report, name: str, models: Models, plan: Plan, clock: Clock) -> None:
    """``vacap caption`` on ``plan.images`` images with the 600-token shape saved to disk."""
    shape = SHAPES["llava-1.5-7b"]
    model = models.get(shape, plan.dtype)
    folder = models.work / "caption-model"
    started = time.perf_counter()
    model.hf.save_pretrained(folder)
    model.processor.save_pretrained(folder)
    save_s = time.perf_counter() - started
    del model
    models.clear()  # the command loads its own copy
    images = models.work / "caption-images"
    images.mkdir(exist_ok=True)
    samples = sorted(SAMPLES.iterdir())
    for i in range(plan.images):
        shutil.copyfile(samples[i % len(samples)], images / f"{i:05d}-{samples[i % len(samples)].name}")
    output = models.work / "captions.jsonl"
    dtype = {value: key for key, value in DTYPES.items()}[plan.dtype]
    command = [sys.executable, "-m", "vacap.cli", "caption", str(images), "-o", str(output), "--model", str(folder),
               "--device", str(plan.device), "--dtype", dtype, "--method", "greedy", "--batch-size",
               str(plan.caption_batch), "--max-new-tokens", str(plan.caption_tokens), "--overwrite"]  # fmt: skip
    sampler = Utilisation(plan.device)
    first = last = None
    records = 0
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
    reader.start()
    while process.poll() is None:
        if clock.left() < 0:
            process.kill()
            break
        count = output.read_bytes().count(b"\n") if output.exists() else 0
        if count and first is None:
            first = time.monotonic()
        if count > records:
            records, last = count, time.monotonic()
        time.sleep(0.05)
    process.wait()
    reader.join(timeout=5)
    sampler.stop()
    ended = time.monotonic()
    lines = output.read_text(encoding="utf-8").splitlines() if output.exists() else []
    ok = sum(json.loads(line).get("status") == "ok" for line in lines)
    if lines and first is None:
        first = last = ended
    window = sampler.between(first, last) if first is not None and last is not None and last > first else []
    report.add(name, {
        "images": plan.images, "batch": plan.caption_batch, "max_new_tokens": plan.caption_tokens,
        "returncode": process.returncode, "records": len(lines), "ok": ok, "wall_s": ended - started,
        "save_model_s": save_s, "decode_window_s": (last - first) if first is not None else None,
        "images_per_s": (len(lines) - 1) / (last - first) if first is not None and last > first else None,
        "utilisation_source": sampler.source, "utilisation_samples": len(window),
        "utilisation_mean": statistics.fmean(window) if window else None,
        "utilisation_median": statistics.median(window) if window else None,
        "stderr_tail": "".join(stderr)[-2000:] if process.returncode else "",
    })  # fmt: skip


RUNNERS = {
    "speed": run_speed, "parity": run_parity, "speed-long": run_speed, "caption": run_caption,
    "methods": run_methods, "quant": run_quant, "speed-32": run_speed,
}


def _goal(figure, threshold: float, rule: str = ">=", note: str = "") -> dict:
    """A goal's figure against its threshold; ``met`` None where the figure was not measured."""
    met = None if figure is None else (figure >= threshold if rule == ">=" else figure > threshold)
    return {"figure": figure, "rule": rule, "threshold": threshold, "note": note, "met": met}


def goals(report: Report, plan: Plan, bandwidth: float | None) -> dict:
    """Issue 28's goals from the measured rows (None where a figure was not measured)."""
    rows = report.data["sections"]

    def speed(section: str, batch: int, setting: str, kind: str, key: str):
        for row in rows.get(section, {}).get("rows", []):
            if (row["batch"], row["setting"], row["steps"]) == (batch, setting, kind):
                return row[key]
        return None

    def ratio(a, b):
        return None if a is None or b is None else a / b

    out = {}
    one, eight = plan.batches[0], plan.batches[-1]
    hf1 = speed("speed", one, HF, "-", "tokens_per_s")
    out["greedy --compile vs HF tokens/s, batch 1"] = _goal(
        ratio(speed("speed", one, "greedy", "compiled", "tokens_per_s"), hf1), 3.0)
    limit = None if bandwidth is None else bandwidth / report.data["meta"].get("text_weight_bytes", float("inf"))
    report.data["meta"]["bandwidth_limit_tokens_per_s"] = limit
    out["greedy --compile decode vs bandwidth limit, batch 1"] = _goal(
        ratio(speed("speed", one, "greedy", "compiled", "decode_tokens_per_s"), limit), 0.5)
    best8 = max((speed("speed", eight, "greedy", k, "tokens_per_s") or 0 for k in ("dynamic", "static", "compiled")),
                default=0) or None  # fmt: skip
    hf8 = speed("speed", eight, HF, "-", "tokens_per_s")
    out[f"greedy best vs HF tokens/s, batch {eight}"] = _goal(ratio(best8, hf8), 1.5)
    for batch in plan.batches:
        greedy_step = speed("speed", batch, "greedy", "dynamic", "ms_per_step")
        out[f"VASparse step vs greedy (dynamic), batch {batch}"] = _goal(
            ratio(greedy_step, speed("speed", batch, "vasparse", "dynamic", "ms_per_step")), 0.95)
        for n in (plan.short, plan.long):
            key = f"call_{n}_s"
            out[f"VASparse end to end vs greedy (dynamic), {n} tokens, batch {batch}"] = _goal(
                ratio(speed("speed", batch, "greedy", "dynamic", key),
                      speed("speed", batch, "vasparse", "dynamic", key)),
                0.9)  # fmt: skip
        long_greedy = speed("speed-long", batch, "greedy", "dynamic", "ms_per_step")
        out[f"VASparse step vs greedy at 2.9k prompt, batch {batch}"] = _goal(
            ratio(long_greedy, speed("speed-long", batch, "vasparse", "dynamic", "ms_per_step")), 1.0, ">")
    caption = rows.get("caption", {}).get("rows", [])
    util = caption[0]["utilisation_mean"] if caption else None
    caption_goal = f"GPU utilisation % during `vacap caption` of {plan.images} images, batch {plan.caption_batch}"
    out[caption_goal] = _goal(util, 90.0)
    parity = [r for r in rows.get("parity", {}).get("rows", []) if "agreement" in r]
    for dtype in plan.parity_dtypes:
        rates = [r["agreement"] for r in parity if r["dtype"] == dtype]
        out[f"parity with generate, {dtype}, mean agreement"] = _goal(
            statistics.fmean(rates) if rates else None, 1.0, note="near-ties may differ in fp16 and bf16")
    methods = rows.get("methods", {}).get("rows", [])
    out[f"methods' captions the same at batch 1 and {plan.method_batch} (fp32), share of rows"] = _goal(
        None if not methods else sum(r["same_rows"] for r in methods) / sum(r["rows"] for r in methods), 1.0)
    return out


def environment(plan: Plan, args) -> dict:
    gpu = plan.device.type == "cuda"
    name = torch.cuda.get_device_name(plan.device) if gpu else "CPU"
    return {
        "device_name": name, "device": str(plan.device), "scale": plan.scale, "dtype": str(plan.dtype),
        "dry_run": args.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(), "budget_s": args.budget,
        "batches": list(plan.batches), "new_tokens": [plan.short, plan.long], "rounds": plan.rounds,
        "qwen": unsupported(SHAPES["qwen2.5-vl-7b"]) or "supported",
        "torch_compile": "disabled (dry run)" if torch._dynamo.config.disable else "on",
        # vacap's --compile asks torch.compile for no mode: CUDA graphs only where inductor is told
        # (TORCHINDUCTOR_CUDAGRAPHS=1), and then not over a cache it mutates (not marked static).
        "inductor_cudagraphs": os.environ.get("TORCHINDUCTOR_CUDAGRAPHS") == "1",
    }  # fmt: skip


def bandwidth_of(name: str, given: float | None) -> float | None:
    if given:
        return given * 1e9
    return next((value for key, value in BANDWIDTH.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on CPU, few tokens: the same code paths")
    parser.add_argument("--scale", choices=("7b", "wide", "tiny"), default="7b")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="speed sections' dtype (fp16 on a GPU, fp32 on CPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole run")
    parser.add_argument("--images", type=int, help="images of the caption section (1000; 3 in a dry run)")
    parser.add_argument("--bandwidth-gbs", type=float, help="the GPU's memory bandwidth, GB/s (known GPUs: by name)")
    parser.add_argument("--batches", help="speed sections' batch sizes, comma-separated (1,8; 1,2 in a dry run)")
    parser.add_argument("--new-tokens", help="the short and the long call's new tokens, e.g. 16,64")
    parser.add_argument("--rounds", type=int, help="rounds of the speed sections (2; 1 in a dry run)")
    parser.add_argument("--work", type=Path, help="folder for checkpoints saved to disk (a temporary one by default)")
    args = parser.parse_args()
    if args.dry_run:
        args.device = "cpu"
        # Compiling costs a CPU a minute per batch shape: the compiled kind runs vacap's compiled
        # path (``steps="compiled"``) with torch.compile turned into a no-op.
        torch._dynamo.config.disable = True
    chosen = [s for s in args.sections.split(",") if s]
    if not chosen or any(s not in SECTIONS for s in chosen):
        parser.error(f"--sections {args.sections}: choose from {','.join(SECTIONS)}")
    plan = plan_for(args)
    try:
        if args.batches:
            plan.batches = tuple(int(b) for b in args.batches.split(","))
        if args.new_tokens:
            plan.short, plan.long = (int(n) for n in args.new_tokens.split(","))
    except ValueError:
        parser.error("--batches and --new-tokens take whole numbers separated by commas (--new-tokens: two)")
    if min(plan.batches) < 1 or not 2 <= plan.short <= plan.long:
        parser.error("batches must be at least 1, and the new tokens two numbers from 2 up, the short one first")
    plan.rounds = args.rounds or plan.rounds
    if not args.dry_run:  # each section keeps its share of a --budget other than the default
        plan.budgets = {name: seconds * args.budget / DEFAULT_BUDGET for name, seconds in plan.budgets.items()}
    meta = environment(plan, args)
    report = Report(args.out, meta)
    bandwidth = bandwidth_of(meta["device_name"], args.bandwidth_gbs)
    clock = Clock(args.budget)
    with contextlib.ExitStack() as stack, torch.no_grad():
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vacap-gpu-")))
        models = Models(plan, work)
        for name in (s for s in SECTIONS if s in chosen):
            section = report.section(name)
            clock.start(plan.budgets[name])
            started = time.perf_counter()
            try:
                RUNNERS[name](report, name, models, plan, clock)
                section["status"] = "done" if not section["skipped"] else "partial"
            except Exception:  # noqa: BLE001 -- one failed section must not cost the others' results
                section["status"] = "error"
                section["error"] = traceback.format_exc(limit=8)
            section["seconds"] = time.perf_counter() - started
            report.data["goals"] = goals(report, plan, bandwidth)
            report.save()
            print(f"{name}: {section['status']} in {section['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(report.out / "results.json")


if __name__ == "__main__":
    main()

"""The command line's options: each flag once, with its help, its check and its help panel.

The commands in `vacap/cli.py` share these. Help is grouped into panels so that `vacap caption
-h` reads at 80 columns: a panel's table is as wide as its own longest flag, and short metavars
(FILE, N, NAME) leave the help text room for its defaults and choices.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from vacap.config import METHODS, DecodeConfig

INPUT = "Input"
OUTPUT = "Output and caption files"
TEXT = "Caption text"
MODEL = "Model"
DECODING = "Decoding"
VASPARSE = "VASparse"
VISTA = "VISTA (--method vista)"
VAR = "VAR (--method var)"
PAI = "PAI (--method pai)"
SAMPLING = "Sampling"
DIAGNOSTICS = "Diagnostics"
SCALE_OUT = "Scale-out"
BENCHMARK = "Benchmark"
DEFAULTS = DecodeConfig()
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def choice(*values: str):
    """A parser that takes one of ``values``. Typer's own check of a Literal prefixes its
    message with pydantic's "Value error,"; this says only what is wrong and what is allowed."""

    def parse(text: str) -> str:
        if text not in values:
            raise typer.BadParameter(f"{text!r} is not one of {', '.join(values)}")
        return text

    return parse


def _check_device(value: str) -> str:
    if not _DEVICE.match(value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value


def _check_threads(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise typer.BadParameter(f"{value!r} is not a thread count; use auto or a whole number of at least 1")
    return value


def _choices(*values: str) -> str:
    return ", ".join(values[:-1]) + " or " + values[-1]


# Input. readable=False: click would refuse a path it cannot read, ending the run; vacap gives
# it an error record and goes on with the rest.
Paths = Annotated[
    Optional[List[Path]],
    typer.Argument(metavar="PATHS", help="Image files and folders.", show_default=False, readable=False),
]
Recursive = Annotated[
    bool, typer.Option("--recursive/--no-recursive", metavar="", help="Descend into sub-folders.", rich_help_panel=INPUT)
]
FilesFrom = Annotated[
    Optional[str],
    typer.Option(
        metavar="FILE", rich_help_panel=INPUT,
        help="Also take the paths listed in FILE, one a line; '-' reads stdin. # starts a comment.",
    ),
]  # fmt: skip
Include = Annotated[
    Optional[List[str]],
    typer.Option(
        metavar="GLOB", rich_help_panel=INPUT,
        help="Only images whose path inside the folder given matches GLOB (repeatable).",
    ),
]  # fmt: skip
Exclude = Annotated[
    Optional[List[str]],
    typer.Option(metavar="GLOB", rich_help_panel=INPUT, help="Leave out images whose path matches GLOB."),
]
Limit = Annotated[
    Optional[int],
    typer.Option(min=1, metavar="N", rich_help_panel=INPUT, help="Only the first N images, after filters and --shard."),
]
Shard = Annotated[
    Optional[str],
    typer.Option(metavar="I/N", rich_help_panel=INPUT, help="Only shard I (from 0) of N, split by a hash of each path."),
]

# Output and caption files.
Output = Annotated[
    Optional[Path],
    typer.Option(
        "--output", "-o", metavar="FILE", rich_help_panel=OUTPUT, help="JSONL file to write; stdout when omitted."
    ),
]
Sidecar = Annotated[
    Optional[str],
    typer.Option(
        parser=choice("txt", "caption"), metavar="EXT", rich_help_panel=OUTPUT,
        help="Also write each caption to <image stem>.EXT beside its image: txt or caption.",
    ),
]  # fmt: skip
SidecarDir = Annotated[
    Optional[Path],
    typer.Option(
        metavar="DIR", rich_help_panel=OUTPUT, help="Write the caption files into DIR, mirroring the input tree."
    ),
]
Existing = Annotated[
    str,
    typer.Option(
        parser=choice("skip", "overwrite", "append", "prepend"), metavar="MODE", rich_help_panel=OUTPUT,
        help="An image whose caption file exists: skip it (not captioned), overwrite the file, or append or "
        "prepend the caption (as one more tag after a tag list, as a sentence after prose).",
    ),
]  # fmt: skip
Prefix = Annotated[
    str, typer.Option(metavar="TEXT", rich_help_panel=TEXT, help="Put before each caption, such as 'ohwx, '.")
]
Suffix = Annotated[str, typer.Option(metavar="TEXT", rich_help_panel=TEXT, help="Put after each caption.")]
Clean = Annotated[
    Optional[bool],
    typer.Option(
        "--clean/--no-clean", show_default=False, metavar="", rich_help_panel=TEXT,
        help="Strip chat boilerplate around a caption (ASSISTANT:, <s>, quotes). Default: on with caption files.",
    ),
]  # fmt: skip
Trim = Annotated[
    Optional[bool],
    typer.Option(
        "--trim-incomplete/--no-trim-incomplete", show_default=False, metavar="", rich_help_panel=TEXT,
        help="Drop a last sentence that --max-new-tokens cut off. Default: on with caption files.",
    ),
]  # fmt: skip
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", metavar="", rich_help_panel=OUTPUT, help="Start the output file afresh, not resuming it."),
]

# Model.
Model = Annotated[
    str,
    typer.Option(
        metavar="ID", rich_help_panel=MODEL,
        help="A Hugging Face id, a local model folder, or demo (the small model shipped with vacap).",
    ),
]  # fmt: skip
Dtype = Annotated[
    str,
    typer.Option(
        parser=choice("auto", "bf16", "fp16", "fp32"), metavar="NAME", rich_help_panel=MODEL,
        help="auto, bf16, fp16 or fp32. auto: on CPU bf16 where it is native (AVX512-BF16, AMX), else fp32; "
        "on GPU bf16, else fp16.",
    ),
]  # fmt: skip
Device = Annotated[
    str, typer.Option(callback=_check_device, metavar="NAME", rich_help_panel=MODEL, help="auto, cpu, cuda or cuda:N.")
]
Threads = Annotated[
    str,
    typer.Option(
        callback=_check_threads, metavar="N", rich_help_panel=MODEL,
        help="CPU threads of torch, or auto: OMP_NUM_THREADS if set, else the cores other processes leave idle.",
    ),
]  # fmt: skip
Quant = Annotated[
    str,
    typer.Option(
        parser=choice("none", "8bit", "4bit"), metavar="NAME", rich_help_panel=MODEL,
        help="none, 8bit or 4bit: bitsandbytes quantization of the language model.",
    ),
]  # fmt: skip
MaxPixels = Annotated[
    Optional[int],
    typer.Option(
        min=1, metavar="N", rich_help_panel=MODEL,
        help="Qwen2-VL, Qwen2.5-VL: largest image size in pixels, aspect kept; one image token per 28 x 28 "
        "pixels. Default: 1003520 (1280 tokens) or the model's own limit where lower.",
    ),
]  # fmt: skip
MinPixels = Annotated[
    Optional[int],
    typer.Option(
        min=1, metavar="N", rich_help_panel=MODEL,
        help="Qwen2-VL, Qwen2.5-VL: smallest image size in pixels; default: the model's own.",
    ),
]  # fmt: skip
Batch = Annotated[
    int,
    typer.Option(
        min=1, metavar="N", rich_help_panel=MODEL,
        help="Images decoded together. 1 by default, where a caption does not depend on its batch: on CPU in "
        "fp32 every batch size gives batch 1's captions bit for bit, but in bf16/fp16 or on a GPU rounding "
        "depends on the batch, so a near-tied token can differ. On a GPU larger batches raise throughput.",
    ),
]  # fmt: skip
Compile = Annotated[
    bool,
    typer.Option(
        "--compile", metavar="", rich_help_panel=MODEL,
        help="Decode steps as one torch.compile'd static-shape step (greedy, vcd, fastv; other methods fall back "
        "and say so). The first batch pays the compilation.",
    ),
]  # fmt: skip

# Decoding.
Method = Annotated[
    str,
    typer.Option(
        parser=choice(*METHODS), metavar="NAME", rich_help_panel=DECODING,
        help=f"Decoding method: {_choices(*METHODS)}.",
    ),
]  # fmt: skip
Prompt = Annotated[str, typer.Option(metavar="TEXT", rich_help_panel=DECODING, help="Instruction given with each image.")]
PromptFile = Annotated[
    Optional[Path],
    typer.Option(
        metavar="FILE", rich_help_panel=DECODING,
        help="Read the prompt from this UTF-8 file; {filename}, {stem} and {folder} are filled in per image.",
    ),
]  # fmt: skip
MaxNew = Annotated[int, typer.Option(min=1, metavar="N", rich_help_panel=DECODING, help="Longest caption, in tokens.")]
Seed = Annotated[
    int,
    typer.Option(
        metavar="N", rich_help_panel=DECODING,
        help="Seed of what decoding draws at random: sampling, VCD's noise, the contrast branch's hidden slots.",
    ),
]  # fmt: skip

# VASparse (docs/VASPARSE.md); the ranges are DecodeConfig's, whose messages say them.
Sparsity = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VASPARSE, help="Share of cached tokens dropped per step, [0, 1).")
]
Lam = Annotated[float, typer.Option(metavar="X", rich_help_panel=VASPARSE, help="Weight of visual saliency, >= 0.")]
Alpha = Annotated[
    Optional[float],
    typer.Option(
        metavar="X", rich_help_panel=VASPARSE,
        help="Contrastive decoding weight, >= 0. Default: 0.1 for vasparse and pai, 1 for vcd.",
    ),
]  # fmt: skip
ApcBeta = Annotated[float, typer.Option(metavar="X", rich_help_panel=VASPARSE, help="Plausibility cut-off, [0, 1].")]
SinkBeta = Annotated[float, typer.Option(metavar="X", rich_help_panel=VASPARSE, help="Sink attention penalty, >= 0.")]
StartLayer = Annotated[
    int, typer.Option(metavar="N", rich_help_panel=VASPARSE, help="First decoder layer selection and sink touch.")
]
ContrastLayers = Annotated[
    int, typer.Option(metavar="N", rich_help_panel=VASPARSE, help="Decoder layers of the contrast branch.")
]
MaskRate = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VASPARSE, help="Image slots the contrast branch hides, [0, 1].")
]
KvBudget = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VASPARSE, help="Share of the prompt cache kept, (0, 1]; 1 is off.")
]

# VISTA (docs/VISTA.md) and VAR (docs/VAR.md); DecodeConfig checks the ranges.
VistaLambda = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VISTA, help="Visual steering strength, >= 0; 0 is off.")
]
VistaGamma = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VISTA, help="Weight of late layers' logits, [0, 1]; 0 is off.")
]
VistaWindowStart = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VISTA, help="Their first layer, as a share of the depth.")
]
VistaWindowEnd = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VISTA, help="Their last layer, as a share of the depth.")
]
VarP = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VAR, help="Share of sinks' attention kept, [0, 1]; 1 is off.")
]
VarRho = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VAR, help="Least non-sink share of a row's image attention.")
]
VarTau = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VAR, help="Normalised activation that makes a sink, > 0.")
]
VarImageFloor = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=VAR, help="Least attention a row pays the image, [0, 1].")
]
VarStartLayer = Annotated[int, typer.Option(metavar="N", rich_help_panel=VAR, help="First decoder layer VAR acts in.")]
# PAI (docs/PAI.md): its guidance against the image-free prompt is --alpha (gamma - 1).
PaiAlpha = Annotated[
    float, typer.Option(metavar="X", rich_help_panel=PAI, help="Image attention amplification, >= 0; 0 is off.")
]
PaiStartLayer = Annotated[int, typer.Option(metavar="N", rich_help_panel=PAI, help="First decoder layer it acts in.")]


def _dimensions(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of whole numbers") from None


# A str to typer, which would take a tuple annotation for several values per flag; the parser
# turns the text into the tuple DecodeConfig holds.
VarDims = Annotated[
    str,
    typer.Option(
        parser=_dimensions, metavar="LIST", rich_help_panel=VAR,
        help="Sink dimensions, comma-separated; default: found in the model.",
    ),
]  # fmt: skip

# Sampling.
Temperature = Annotated[
    float,
    typer.Option(
        metavar="X", rich_help_panel=SAMPLING, help="0 is greedy; above 0 samples from the method's final logits."
    ),
]
TopP = Annotated[
    float,
    typer.Option(
        metavar="X", rich_help_panel=SAMPLING, help="Sample from the fewest tokens holding this probability, (0, 1]."
    ),
]
RepetitionPenalty = Annotated[
    float,
    typer.Option(
        metavar="X", rich_help_panel=SAMPLING,
        help="Above 1 discourages tokens the caption already has (greedy too); 1 is off.",
    ),
]  # fmt: skip
NoRepeatNgram = Annotated[
    int,
    typer.Option(
        metavar="N", rich_help_panel=SAMPLING, help="Never repeat an n-gram of N tokens in a caption; 0 is off."
    ),
]

# Diagnostics.
Diagnostics = Annotated[
    str,
    typer.Option(
        parser=choice("none", "summary", "tokens"), metavar="LEVEL", rich_help_panel=DIAGNOSTICS,
        help="Attention statistics in each record: none, summary or tokens (docs/diagnostics.md).",
    ),
]  # fmt: skip
Risk = Annotated[
    bool,
    typer.Option(
        "--risk", metavar="", rich_help_panel=DIAGNOSTICS,
        help="Score each object word of a caption for hallucination risk, in [0, 1]: a logistic combination "
        "of four signals at the word's first token (entropy, -log p, -top-2 margin, and log p with the image "
        "partly hidden minus log p), fitted on the priors world's train scenes; a risk object in each record "
        "(docs/risk.md). Changes no caption.",
    ),
]  # fmt: skip
RiskVocab = Annotated[
    Optional[Path],
    typer.Option(
        metavar="FILE", rich_help_panel=DIAGNOSTICS,
        help="With --risk: the object words to score, one a line ('word' or 'word: synonym, synonym'); "
        "default: the COCO objects, or the shapes for the demo models.",
    ),
]  # fmt: skip
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", metavar="", rich_help_panel=DIAGNOSTICS, help="Log loading details on stderr.")
]

# Scale-out.
Ray = Annotated[
    bool,
    typer.Option(
        "--ray", metavar="", rich_help_panel=SCALE_OUT,
        # The backslash keeps rich from reading [ray] as markup and dropping it from the help.
        help="Run on Ray Data: a pool of actors, each loading the model once; records in completion order. "
        'Needs the ray extra (pip install ".\\[ray]" in vacap\'s checkout).',
    ),
]  # fmt: skip
RayAddress = Annotated[
    Optional[str],
    typer.Option(
        metavar="ADDRESS", rich_help_panel=SCALE_OUT, help="Join the Ray cluster at ADDRESS; default: start one here."
    ),
]
Workers = Annotated[
    Optional[int],
    typer.Option(min=1, metavar="N", rich_help_panel=SCALE_OUT, help="Actors in the pool; default one per GPU, else 1."),
]
GpusPerWorker = Annotated[
    Optional[float],
    typer.Option(
        min=0, metavar="X", rich_help_panel=SCALE_OUT, help="GPUs each actor takes; default 1 with GPUs, else 0."
    ),
]

# Comma-separated values of a setting, one VASparse run per value (compare, eval shapes).
Methods = Annotated[
    str, typer.Option(metavar="LIST", rich_help_panel=DECODING, help=f"Comma-separated methods: {_choices(*METHODS)}.")
]


def _sweep(flag: str, what: str, panel: str = VASPARSE):
    return Annotated[
        Optional[str],
        typer.Option(flag, metavar="LIST", rich_help_panel=panel, help=f"Comma-separated {what}, one run each."),
    ]


Sparsities = _sweep("--sparsity", "sparsities")
Alphas = _sweep("--alpha", "contrast weights")
Lams = _sweep("--lam", "saliency weights")
SinkBetas = _sweep("--sink-beta", "sink penalties")
KvBudgets = _sweep("--kv-budget", "KV budgets")
ContrastLayerCounts = _sweep("--contrast-layers", "contrast-branch layer counts")
MaskRates = _sweep("--mask-rate", "shares of image slots the contrast branch hides")
VistaLambdas = _sweep("--vista-lambda", "steering strengths", VISTA)
VistaGammas = _sweep("--vista-gamma", "weights of late layers' logits", VISTA)
VarPs = _sweep("--var-p", "shares of sinks' attention kept", VAR)
VarRhos = _sweep("--var-rho", "least non-sink shares", VAR)
VarTaus = _sweep("--var-tau", "sink thresholds", VAR)
PaiAlphas = _sweep("--pai-alpha", "image attention amplifications", PAI)
Ablation = Annotated[
    bool, typer.Option(metavar="", rich_help_panel=VASPARSE, help="Add VASparse with each mechanism alone.")
]
JsonFlag = Annotated[bool, typer.Option("--json", metavar="", help="Print the results as JSON, not a table.")]

"""The `vacap` command. Thin: parse and validate flags, then hand over to the library.

torch and transformers are imported inside the commands, so `vacap --help` starts fast.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, List, Literal, Optional

import typer

from vacap.config import DEFAULT_MODEL, DEFAULT_PROMPT, DecodeConfig

app = typer.Typer(
    help="Caption images with a local LLaVA-family model and VASparse decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Hallucination metrics: CHAIR, POPE, and the shapes benchmark.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
_D = DecodeConfig()
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_device(value: str) -> str:
    if not _DEVICE.match(value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value


# Options shared by the commands that load a model.
Paths = Annotated[List[Path], typer.Argument(help="Image files and folders.")]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="JSONL file to write; stdout when omitted.")]
Model = Annotated[str, typer.Option(help="Hugging Face id or local folder.")]
Prompt = Annotated[str, typer.Option(help="Instruction given with each image.")]
MaxNew = Annotated[int, typer.Option(min=1, help="Longest caption, in tokens.")]
Batch = Annotated[int, typer.Option(min=1, help="Images decoded together.")]
Dtype = Annotated[Literal["auto", "bf16", "fp16", "fp32"], typer.Option(help="auto: bf16 on CPU, bf16/fp16 on GPU.")]
Device = Annotated[str, typer.Option(callback=_check_device, help="auto, cpu, cuda or cuda:N.")]
Quant = Annotated[Literal["none", "8bit", "4bit"], typer.Option(help="bitsandbytes quantization of the LLM.")]
Recursive = Annotated[bool, typer.Option("--recursive/--no-recursive", help="Descend into sub-folders.")]
Diagnostics = Annotated[
    Literal["none", "summary", "tokens"], typer.Option(help="Attention statistics in each record (see README).")
]


@app.callback()
def main() -> None:
    """vacap: batch image captioning with hallucination-aware decoding."""


def _setup(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="vacap: %(message)s")


def _usage(exc: Exception) -> typer.BadParameter:
    return typer.BadParameter(str(exc))


def _discover(paths: List[Path], recursive: bool) -> list[Path]:
    from vacap.images import discover

    try:
        return discover(paths, recursive=recursive)
    except FileNotFoundError as exc:
        raise _usage(exc) from exc


def _captioner(console, **arguments):
    """Load the model; a flag the model cannot honour is a usage error (exit 2)."""
    from rich.text import Text

    from vacap.captioner import Captioner
    from vacap.model import ModelLoadError

    try:
        return Captioner(**arguments)
    except (ModelLoadError, ValueError) as exc:
        # Text, not markup: messages contain brackets such as vacap[quant].
        console.print(Text.assemble(("error: ", "red"), str(exc)))
        raise typer.Exit(2) from exc


@app.command()
def caption(
    paths: Paths,
    output: Output = None,
    model: Model = DEFAULT_MODEL,
    method: Annotated[Literal["vasparse", "greedy", "vcd", "fastv"], typer.Option(help="Decoding method.")] = _D.method,
    prompt: Prompt = DEFAULT_PROMPT,
    max_new_tokens: MaxNew = _D.max_new_tokens,
    batch_size: Batch = 1,
    dtype: Dtype = "auto",
    device: Device = "auto",
    quant: Quant = "none",
    recursive: Recursive = True,
    overwrite: Annotated[bool, typer.Option(help="Start the output file afresh instead of resuming.")] = False,
    sparsity: Annotated[float, typer.Option(help="Fraction of cached tokens dropped per step, [0, 1).")] = _D.sparsity,
    lam: Annotated[float, typer.Option(help="Weight of visual saliency in token selection, >= 0.")] = _D.lam,
    alpha: Annotated[float, typer.Option(help="Contrastive decoding weight, >= 0.")] = _D.alpha,
    apc_beta: Annotated[float, typer.Option(help="Adaptive plausibility cut-off, [0, 1].")] = _D.apc_beta,
    sink_beta: Annotated[float, typer.Option(help="Sink attention penalty strength, >= 0.")] = _D.sink_beta,
    start_layer: Annotated[int, typer.Option(help="First decoder layer selection and sink touch.")] = _D.start_layer,
    contrast_layers: Annotated[int, typer.Option(help="Decoder layers of the contrast branch.")] = _D.contrast_layers,
    mask_rate: Annotated[float, typer.Option(help="Image slots hidden in the contrast branch, [0, 1].")] = _D.mask_rate,
    kv_budget: Annotated[float, typer.Option(help="Fraction of the prompt cache kept, (0, 1]; 1 = off.")] = _D.kv_budget,
    seed: Annotated[int, typer.Option(help="Seed for the random parts (masks, VCD noise).")] = _D.seed,
    diagnostics: Diagnostics = "none",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log loading details on stderr.")] = False,
) -> None:
    """Caption every image under PATHS, one JSONL record per image."""
    _setup(verbose)
    settings = dict(
        method=method, prompt=prompt, max_new_tokens=max_new_tokens, sparsity=sparsity, lam=lam, alpha=alpha,
        apc_beta=apc_beta, sink_beta=sink_beta, start_layer=start_layer, contrast_layers=contrast_layers,
        mask_rate=mask_rate, kv_budget=kv_budget, seed=seed, diagnostics=diagnostics,
    )  # fmt: skip
    try:
        DecodeConfig(**settings)
    except ValueError as exc:
        raise _usage(exc) from exc
    images = _discover(paths, recursive)

    from vacap.progress import RunProgress
    from vacap.records import RecordWriter

    progress = RunProgress(total=len(images))
    captioner = _captioner(
        progress.console, model=model, dtype=dtype, device=device, quant=quant, batch_size=batch_size, **settings
    )
    with RecordWriter(output, overwrite=overwrite) as writer, progress:

        def skip(path: str, sha256: str, settings_key: str) -> bool:
            done = writer.is_done(path, sha256, settings_key)
            if done:
                progress.skipped()
            return done

        for record in captioner.records((str(p) for p in images), skip=skip):
            writer.write(record)
            progress.record(record)
    progress.console.print(progress.summary())
    raise typer.Exit(1 if progress.counts["error"] else 0)


@app.command()
def compare(
    paths: Paths,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "greedy,vasparse,vcd,fastv",
    sparsity: Annotated[Optional[str], typer.Option(help="Comma-separated sparsities for vasparse.")] = None,
    ablation: Annotated[bool, typer.Option(help="Add VASparse with each mechanism alone.")] = False,
    output: Output = None,
    model: Model = DEFAULT_MODEL,
    prompt: Prompt = DEFAULT_PROMPT,
    max_new_tokens: MaxNew = _D.max_new_tokens,
    batch_size: Batch = 1,
    dtype: Dtype = "auto",
    device: Device = "auto",
    quant: Quant = "none",
    recursive: Recursive = True,
    diagnostics: Annotated[Literal["summary", "tokens"], typer.Option(help="Attention statistics kept.")] = "summary",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log loading details on stderr.")] = False,
) -> None:
    """Run several methods and settings on the same images: one JSONL, and a table on stderr."""
    from vacap.compare import parse_list, settings_grid, summary_table

    _setup(verbose)
    try:
        grid = settings_grid(
            parse_list(methods, str, "--methods"),
            parse_list(sparsity, float, "--sparsity") if sparsity else None,
            ablation,
        )
        for settings in grid.values():
            DecodeConfig(**settings, prompt=prompt, max_new_tokens=max_new_tokens)
    except ValueError as exc:
        raise _usage(exc) from exc
    images = [str(p) for p in _discover(paths, recursive)]

    from vacap.progress import RunProgress
    from vacap.records import RecordWriter

    progress = RunProgress(total=len(images) * len(grid))
    base = _captioner(
        progress.console, model=model, dtype=dtype, device=device, quant=quant, batch_size=batch_size,
        prompt=prompt, max_new_tokens=max_new_tokens, diagnostics=diagnostics,
    )  # fmt: skip
    written: list[dict] = []
    with RecordWriter(output, overwrite=True) as writer, progress:
        for label, settings in grid.items():
            for record in base.with_settings(**settings).records(images):
                record["setting"] = label
                writer.write(record)
                progress.record(record)
                written.append(record)
    progress.console.print(summary_table(written, list(grid)))
    progress.console.print(progress.summary())
    raise typer.Exit(1 if progress.counts["error"] else 0)


@app.command()
def show(
    records: Annotated[Path, typer.Argument(help="A JSONL file written by vacap.")],
    image: Annotated[str, typer.Option(help="Path, file name or unique part of the path of the image.")],
    setting: Annotated[Optional[str], typer.Option(help="Only records of this method or compare setting.")] = None,
    heatmap: Annotated[Optional[Path], typer.Option(help="Write the image with attention overlaid (PNG).")] = None,
    token: Annotated[Optional[int], typer.Option(help="Heatmap of this token (0-based); default: caption mean.")] = None,
) -> None:
    """Print a caption with its tokens coloured by image attention; optionally write a heatmap."""
    from rich.console import Console

    from vacap import show as view

    console = Console()
    try:
        matches = view.find(records, image, setting)
    except (OSError, ValueError) as exc:
        raise _usage(exc) from exc
    for record in matches:
        console.print(view.render(record))
    if heatmap is not None:
        try:
            view.write_heatmap(matches[-1], heatmap, token)
        except ValueError as exc:
            Console(stderr=True).print(f"error: {exc}", markup=False)
            raise typer.Exit(1) from exc
        Console(stderr=True).print(f"heatmap written to {heatmap}", markup=False)


if __name__ == "__main__":
    app()

"""The `vacap` command. Thin: parse and validate flags, then hand over to the library.

torch and transformers are imported inside the commands, so `vacap --help` starts fast.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import List, Literal, Optional

import typer

from vacap.config import DEFAULT_MODEL, DEFAULT_PROMPT, DecodeConfig

app = typer.Typer(
    help="Caption images with a local LLaVA-family model and VASparse decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_DEFAULTS = DecodeConfig()
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@app.callback()
def main() -> None:
    """vacap: batch image captioning with hallucination-aware decoding."""


def _check_device(value: str) -> str:
    if not _DEVICE.match(value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value


@app.command()
def caption(
    paths: List[Path] = typer.Argument(..., help="Image files and folders."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="JSONL file to write (and resume); stdout when omitted."
    ),
    model: str = typer.Option(DEFAULT_MODEL, help="Hugging Face id or local folder."),
    method: Literal["vasparse", "greedy", "vcd", "fastv"] = typer.Option(_DEFAULTS.method, help="Decoding method."),
    prompt: str = typer.Option(DEFAULT_PROMPT, help="Instruction given with each image."),
    max_new_tokens: int = typer.Option(_DEFAULTS.max_new_tokens, min=1, help="Longest caption, in tokens."),
    batch_size: int = typer.Option(1, min=1, help="Images decoded together."),
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = typer.Option("auto", help="auto: bf16 on CPU, bf16/fp16 on GPU."),
    device: str = typer.Option("auto", callback=_check_device, help="auto, cpu, cuda or cuda:N."),
    quant: Literal["none", "8bit", "4bit"] = typer.Option("none", help="bitsandbytes quantization of the LLM."),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", help="Descend into sub-folders."),
    overwrite: bool = typer.Option(False, help="Start the output file afresh instead of resuming."),
    sparsity: float = typer.Option(_DEFAULTS.sparsity, help="Fraction of cached tokens dropped per step, [0, 1)."),
    lam: float = typer.Option(_DEFAULTS.lam, help="Weight of visual saliency in token selection, >= 0."),
    alpha: float = typer.Option(_DEFAULTS.alpha, help="Contrastive decoding weight, >= 0."),
    apc_beta: float = typer.Option(_DEFAULTS.apc_beta, help="Adaptive plausibility cut-off, [0, 1]."),
    sink_beta: float = typer.Option(_DEFAULTS.sink_beta, help="Sink attention penalty strength, >= 0."),
    start_layer: int = typer.Option(_DEFAULTS.start_layer, help="First decoder layer that selection and sink touch."),
    contrast_layers: int = typer.Option(_DEFAULTS.contrast_layers, help="Decoder layers run for the contrast branch."),
    mask_rate: float = typer.Option(_DEFAULTS.mask_rate, help="Image slots hidden in the contrast branch, [0, 1]."),
    kv_budget: float = typer.Option(_DEFAULTS.kv_budget, help="Fraction of the prompt cache kept, (0, 1]; 1 = off."),
    seed: int = typer.Option(_DEFAULTS.seed, help="Seed for the random parts (masks, VCD noise)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log loading details on stderr."),
) -> None:
    """Caption every image under PATHS, one JSONL record per image."""
    from vacap.images import discover

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="vacap: %(message)s")
    settings = dict(
        method=method, prompt=prompt, max_new_tokens=max_new_tokens, sparsity=sparsity, lam=lam, alpha=alpha,
        apc_beta=apc_beta, sink_beta=sink_beta, start_layer=start_layer, contrast_layers=contrast_layers,
        mask_rate=mask_rate, kv_budget=kv_budget, seed=seed,
    )  # fmt: skip
    try:
        DecodeConfig(**settings)
        images = discover(paths, recursive=recursive)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    load = dict(model=model, dtype=dtype, device=device, quant=quant, batch_size=batch_size)
    raise typer.Exit(_run(images, output, overwrite, {**load, **settings}))


def _run(images: list[Path], output: Optional[Path], overwrite: bool, captioner_args: dict) -> int:
    from vacap.captioner import Captioner
    from vacap.model import ModelLoadError
    from vacap.progress import RunProgress
    from vacap.records import RecordWriter

    progress = RunProgress(total=len(images))
    try:
        captioner = Captioner(**captioner_args)
    except (ModelLoadError, ValueError) as exc:
        # The flags are at fault: unknown model, unsupported architecture, no bitsandbytes, or a
        # layer setting the model does not have.
        from rich.text import Text

        # Text, not markup: messages contain brackets such as vacap[quant].
        progress.console.print(Text.assemble(("error: ", "red"), str(exc)))
        return 2
    with RecordWriter(output, overwrite=overwrite) as writer, progress:

        def skip(path: str, sha256: str, settings: str) -> bool:
            done = writer.is_done(path, sha256, settings)
            if done:
                progress.skipped()
            return done

        for record in captioner.records((str(p) for p in images), skip=skip):
            writer.write(record)
            progress.record(record)
    progress.console.print(progress.summary())
    return 1 if progress.counts["error"] else 0


if __name__ == "__main__":
    app()

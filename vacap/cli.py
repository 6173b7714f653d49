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
Batch = Annotated[
    int,
    typer.Option(
        min=1,
        help="Images decoded together. On CPU in fp32 each caption is bit for bit what batch size 1 gives; "
        "in bf16/fp16, or on a GPU, rounding depends on the batch shape, so a near-tied token can differ.",
    ),
]
Dtype = Annotated[
    Literal["auto", "bf16", "fp16", "fp32"],
    typer.Option(help="auto: on CPU bf16 where it is native (AVX512-BF16 or AMX), else fp32; on GPU bf16, else fp16."),
]
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
    alpha: Annotated[Optional[str], typer.Option(help="Comma-separated contrast weights for vasparse.")] = None,
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
            parse_list(alpha, float, "--alpha") if alpha else None,
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


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")]


def _print_report(title: str, rows: dict, columns: list[str], as_json: bool, extra: dict | None = None) -> None:
    """Results are the command's data: stdout, as a table or JSON."""
    import json

    from rich.console import Console

    from vacap.evaluate.report import metrics_table

    if as_json:
        typer.echo(json.dumps({**(extra or {}), "results": rows}, indent=2))
    else:
        Console().print(metrics_table(title, rows, columns))


@eval_app.command("chair")
def eval_chair(
    captions_jsonl: Annotated[Path, typer.Argument(help="Records written by vacap caption or compare.")],
    instances: Annotated[Path, typer.Option(help="COCO instances_*.json (segmentation objects).")],
    captions: Annotated[Optional[Path], typer.Option(help="COCO captions_*.json: objects in human captions.")] = None,
    per_image: Annotated[Optional[Path], typer.Option(help="Write the hallucinated words per record (JSONL).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """CHAIR_s, CHAIR_i, recall and length of captions, overall and per method."""
    import json

    from vacap.evaluate.chair import Chair

    try:
        chair = Chair.from_coco(instances, captions)
        with open(captions_jsonl, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, KeyError) as exc:
        raise _usage(exc) from exc
    result = chair.evaluate(records, per_image=per_image is not None)
    if per_image is not None:
        with open(per_image, "w", encoding="utf-8") as f:
            for entry in result["per_image"]:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    rows = {"overall": result["overall"], **result["by_method"]}
    counts = {"unmatched": result["unmatched"], "not_ok": result["not_ok"]}
    _print_report("CHAIR", rows, ["CHAIR_s", "CHAIR_i", "recall", "avg_len", "n"], as_json, counts)
    if result["unmatched"] or result["not_ok"]:
        typer.echo(f"{result['unmatched']} records without a known COCO image id, {result['not_ok']} not ok", err=True)


@eval_app.command("pope")
def eval_pope(
    images: Annotated[Path, typer.Argument(help="Folder holding the COCO images named in --instances.")],
    instances: Annotated[Path, typer.Option(help="COCO instances_*.json.")],
    split: Annotated[Literal["random", "popular", "adversarial"], typer.Option(help="How absent objects are chosen.")] = "random",
    limit: Annotated[Optional[int], typer.Option("--images", min=1, help="Use this many images (seeded choice).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the question sampling.")] = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write every answer (JSONL).")] = None,
    model: Model = DEFAULT_MODEL,
    method: Annotated[Literal["vasparse", "greedy", "vcd", "fastv"], typer.Option(help="Decoding method.")] = _D.method,
    sparsity: Annotated[float, typer.Option(help="VASparse sparsity, [0, 1).")] = _D.sparsity,
    max_new_tokens: MaxNew = 16,
    batch_size: Batch = 6,
    dtype: Dtype = "auto",
    device: Device = "auto",
    quant: Quant = "none",
    as_json: JsonFlag = False,
) -> None:
    """POPE: ask "Is there a {object} in the image?" for present and absent objects; score yes/no."""
    import json

    from rich.console import Console

    from vacap.evaluate import pope
    from vacap.images import ImageError

    try:
        questions = pope.build_questions(instances, split, images=limit, seed=seed)
    except (OSError, ValueError, KeyError) as exc:
        raise _usage(exc) from exc
    console = Console(stderr=True)
    captioner = _captioner(
        console, model=model, method=method, sparsity=sparsity, max_new_tokens=max_new_tokens,
        batch_size=batch_size, dtype=dtype, device=device, quant=quant,
    )  # fmt: skip
    by_image: dict[str, list] = {}
    for question in questions:
        by_image.setdefault(question.file_name, []).append(question)
    asked, answers, missing = [], [], 0
    from rich.progress import Progress

    with Progress(console=console) as progress:
        task = progress.add_task("asking", total=len(questions))
        for file_name, group in by_image.items():
            try:
                replies = captioner.answer(images / file_name, [q.text for q in group])
            except ImageError:
                missing += len(group)
                progress.advance(task, len(group))
                continue
            asked += group
            answers += replies
            progress.advance(task, len(group))
    if output is not None:
        with open(output, "w", encoding="utf-8") as f:
            for question, answer in zip(asked, answers):
                entry = {**question.__dict__, "answer": answer, "parsed": pope.parse_answer(answer)}
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    if not asked:
        console.print(f"error: none of the {len(questions)} questions' images were readable under {images}")
        raise typer.Exit(1)
    label = method if method != "vasparse" else f"vasparse sparsity={sparsity:g}"
    metrics = pope.score(asked, answers)
    columns = ["accuracy", "precision", "recall", "f1", "yes_ratio", "n"]
    _print_report(f"POPE ({split})", {label: metrics}, columns, as_json, {"split": split, "missing": missing})
    if missing:
        console.print(f"{missing} questions skipped: their images are missing or unreadable")


@eval_app.command("shapes")
def eval_shapes(
    model: Annotated[str, typer.Option(help="Model to evaluate; `demo` is the one trained on the shapes world.")] = "demo",
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "greedy,vasparse,vcd,fastv",
    sparsity: Annotated[Optional[str], typer.Option(help="Comma-separated sparsities for vasparse.")] = None,
    alpha: Annotated[Optional[str], typer.Option(help="Comma-separated contrast weights for vasparse.")] = None,
    ablation: Annotated[bool, typer.Option("--ablation/--no-ablation", help="Add VASparse with each mechanism alone.")] = True,
    scenes: Annotated[int, typer.Option("-n", "--scenes", min=1, help="Test scenes to caption.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the generated test scenes.")] = 1234,
    batch_size: Batch = 8,
    dtype: Annotated[
        Literal["auto", "bf16", "fp16", "fp32"],
        typer.Option(help="fp32, not auto (which depends on the CPU), so figures compare across machines."),
    ] = "fp32",
    device: Device = "auto",
    as_json: JsonFlag = False,
) -> None:
    """CHAIR-style hallucination figures on generated shapes scenes with known ground truth."""
    from vacap.compare import parse_list, settings_grid
    from vacap.evaluate.shapes import run_benchmark
    from vacap.model import ModelLoadError

    try:
        grid = settings_grid(
            parse_list(methods, str, "--methods"),
            parse_list(sparsity, float, "--sparsity") if sparsity else None,
            parse_list(alpha, float, "--alpha") if alpha else None,
            ablation,
        )
        rows = run_benchmark(model, grid, n=scenes, seed=seed, batch_size=batch_size, dtype=dtype, device=device)
    except (ValueError, ModelLoadError) as exc:
        raise _usage(exc) from exc
    table = {row["setting"]: {k: v for k, v in row.items() if k not in ("setting", "texts")} for row in rows}
    columns = ["CHAIR_s", "CHAIR_i", "recall", "mean_length", "tokens_per_s", "errors"]
    _print_report(f"shapes benchmark: {scenes} test scenes, seed {seed}", table, columns, as_json, {"model": model})


if __name__ == "__main__":
    app()

"""The `vacap` command. Thin: each command parses its flags, checks them and hands over.

Errors come in two kinds, each in one style. A usage error is a problem with the command line
(a flag's value, two flags that do not go together, a path that does not exist): click's usage
box, exit 2, before anything is loaded or written. A runtime error is found while working: one
line ``error: ...`` on stderr, exit 1, or 2 where a flag asks what the model or this machine
cannot do (``--quant 4bit`` without bitsandbytes). Lines starting ``vacap:`` are log lines.

torch and transformers are imported inside the commands, so `vacap --help` starts fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from vacap import options as o
from vacap.config import DEFAULT_MODEL, DEFAULT_PROMPT, DecodeConfig, OutputConfig, unused_message

# -h as well as --help, as most command-line tools take it.
HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="Caption images with a local LLaVA-family model and VASparse decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=HELP,
)
eval_app = typer.Typer(
    help="Hallucination metrics: CHAIR, POPE, and the shapes benchmark.", no_args_is_help=True, context_settings=HELP
)
app.add_typer(eval_app, name="eval")
D = o.DEFAULTS


def _print_version(value: bool) -> None:
    if value:
        from vacap import __version__

        typer.echo(f"vacap {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """vacap: batch image captioning with hallucination-aware decoding."""


# --- the two error styles, and what every command shares ----------------------------------------


def _usage(message: str) -> NoReturn:
    raise typer.BadParameter(message)


def _fail(message: str, code: int = 1) -> NoReturn:
    """A runtime error: one line on stderr. Not through rich: messages hold brackets (.[quant])."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _run_errors():
    """A ``RunError`` raised while working, as a runtime error."""
    from vacap.runs import RunError

    try:
        yield
    except RunError as exc:
        _fail(str(exc), exc.code)


def _setup(verbose: bool) -> None:
    """vacap's own log lines on stderr. Only on the `vacap` logger: libraries such as
    huggingface_hub print through handlers of their own, and a root handler printed each of
    their lines a second time."""
    logger = logging.getLogger("vacap")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("vacap: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # transformers' "Loading weights" bar: vacap's own progress says what a run is doing.
        # Read when transformers is imported, which no command has done yet.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _given(ctx: typer.Context, *names: str) -> list[str]:
    """Which of these parameters the command line (or an environment variable) set."""
    return [name for name in names if ctx.get_parameter_source(name).name in ("COMMANDLINE", "ENVIRONMENT")]


def _configs(ctx: typer.Context, grid: list[dict], **shared) -> DecodeConfig:
    """Every setting of ``grid`` checked; a flag the command line gave that changes nothing in
    any of them is a usage error (one rule in every command). Returns the last config."""
    try:
        configs = [DecodeConfig(**settings, **shared) for settings in grid]
    except ValueError as exc:
        _usage(str(exc))
    given = _given(ctx, *(name for name in shared if name in ctx.params))
    unused = [config.unused(given) for config in configs]
    nowhere = {name: when for name, when in unused[0].items() if all(name in u for u in unused)}
    if nowhere:
        _usage(unused_message(nowhere, "/".join(dict.fromkeys(c.method for c in configs))))
    return configs[-1]


def _check_vocabulary(risk: bool, vocabulary: Optional[Path]) -> None:
    """A --risk-vocab file is read once before anything loads: a bad line is a usage error."""
    if vocabulary is None:
        return
    if not risk:
        _usage("--risk-vocab names the words --risk scores: add --risk, or leave --risk-vocab out")
    from vacap.risk import read_vocabulary

    try:
        read_vocabulary(vocabulary)
    except ValueError as exc:
        _usage(str(exc))


def _prompt(prompt: str, prompt_file: Optional[Path]) -> str:
    """The prompt, from --prompt or --prompt-file."""
    from vacap.text import read_prompt_file

    if prompt_file is None:
        return prompt
    if prompt != DEFAULT_PROMPT:
        _usage("give --prompt or --prompt-file, not both")
    try:
        return read_prompt_file(prompt_file)
    except ValueError as exc:
        _usage(str(exc))


def _choose(paths, **choosing):
    """The images a run takes (a ``Listing``), or a usage error."""
    from vacap.images import choose

    try:
        return choose(paths or [], **choosing)
    except ValueError as exc:
        _usage(str(exc))


# --- caption ------------------------------------------------------------------------------------


@app.command()
def caption(
    ctx: typer.Context,
    paths: o.Paths = None,
    recursive: o.Recursive = True,
    files_from: o.FilesFrom = None,
    include: o.Include = None,
    exclude: o.Exclude = None,
    limit: o.Limit = None,
    shard: o.Shard = None,
    output: o.Output = None,
    overwrite: o.Overwrite = False,
    sidecar: o.Sidecar = None,
    sidecar_dir: o.SidecarDir = None,
    existing: o.Existing = "skip",
    prefix: o.Prefix = "",
    suffix: o.Suffix = "",
    clean: o.Clean = None,
    trim_incomplete: o.Trim = None,
    model: o.Model = DEFAULT_MODEL,
    dtype: o.Dtype = "auto",
    device: o.Device = "auto",
    threads: o.Threads = "auto",
    quant: o.Quant = "none",
    max_pixels: o.MaxPixels = None,
    min_pixels: o.MinPixels = None,
    batch_size: o.Batch = 1,
    compile: o.Compile = False,
    method: o.Method = D.method,
    prompt: o.Prompt = DEFAULT_PROMPT,
    prompt_file: o.PromptFile = None,
    max_new_tokens: o.MaxNew = D.max_new_tokens,
    seed: o.Seed = D.seed,
    sparsity: o.Sparsity = D.sparsity,
    lam: o.Lam = D.lam,
    alpha: o.Alpha = None,
    apc_beta: o.ApcBeta = D.apc_beta,
    sink_beta: o.SinkBeta = D.sink_beta,
    start_layer: o.StartLayer = D.start_layer,
    contrast_layers: o.ContrastLayers = D.contrast_layers,
    mask_rate: o.MaskRate = D.mask_rate,
    kv_budget: o.KvBudget = D.kv_budget,
    vista_lambda: o.VistaLambda = D.vista_lambda,
    vista_gamma: o.VistaGamma = D.vista_gamma,
    vista_window_start: o.VistaWindowStart = D.vista_window_start,
    vista_window_end: o.VistaWindowEnd = D.vista_window_end,
    var_p: o.VarP = D.var_p,
    var_rho: o.VarRho = D.var_rho,
    var_tau: o.VarTau = D.var_tau,
    var_image_floor: o.VarImageFloor = D.var_image_floor,
    var_start_layer: o.VarStartLayer = D.var_start_layer,
    var_dims: o.VarDims = "",
    pai_alpha: o.PaiAlpha = D.pai_alpha,
    pai_start_layer: o.PaiStartLayer = D.pai_start_layer,
    temperature: o.Temperature = D.temperature,
    top_p: o.TopP = D.top_p,
    repetition_penalty: o.RepetitionPenalty = D.repetition_penalty,
    no_repeat_ngram: o.NoRepeatNgram = D.no_repeat_ngram,
    diagnostics: o.Diagnostics = "none",
    risk: o.Risk = False,
    risk_vocab: o.RiskVocab = None,
    verbose: o.Verbose = False,
    ray: o.Ray = False,
    ray_address: o.RayAddress = None,
    workers: o.Workers = None,
    gpus_per_worker: o.GpusPerWorker = None,
) -> None:
    """Caption every image under PATHS, one JSONL record per image (and a caption file with --sidecar)."""
    from vacap import ray_run

    _setup(verbose)
    try:
        ray_options = ray_run.options_from_flags(ray, ray_address, workers, gpus_per_worker)
    except ValueError as exc:
        _usage(str(exc))
    if ray_options is not None and threads != "auto":
        _usage("--threads acts on a local run; under --ray each actor uses its share of the CPUs")
    # Caption files are datasets: there, clean-up and trimming are on unless turned off.
    files = sidecar is not None or sidecar_dir is not None
    if existing != "skip" and not files:
        _usage(f"--existing {existing} acts on caption files: add --sidecar txt|caption")
    if compile and quant != "none":
        # bitsandbytes layers break the compiled graph into pieces that recompile at every new shape.
        _usage(f"--compile cannot be used with --quant {quant}; use one or the other")
    _check_pixels(max_pixels, min_pixels)
    prompt = _prompt(prompt, prompt_file)
    settings = dict(
        method=method, prompt=prompt, max_new_tokens=max_new_tokens, sparsity=sparsity, lam=lam, alpha=alpha,
        apc_beta=apc_beta, sink_beta=sink_beta, start_layer=start_layer, contrast_layers=contrast_layers,
        mask_rate=mask_rate, kv_budget=kv_budget, seed=seed, diagnostics=diagnostics, compile=compile,
        temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty, no_repeat_ngram=no_repeat_ngram,
        risk=risk, vista_lambda=vista_lambda, vista_gamma=vista_gamma, vista_window_start=vista_window_start,
        vista_window_end=vista_window_end, var_p=var_p, var_rho=var_rho, var_tau=var_tau,
        var_image_floor=var_image_floor, var_start_layer=var_start_layer, var_dims=var_dims, pai_alpha=pai_alpha,
        pai_start_layer=pai_start_layer,
    )  # fmt: skip
    config = _configs(ctx, [{}], **settings)
    _check_vocabulary(risk, risk_vocab)
    listing = _choose(
        paths, recursive=recursive, files_from=files_from, include=include or (), exclude=exclude or (),
        shard=shard, limit=limit,
    )  # fmt: skip
    shaping = OutputConfig(
        prefix=prefix, suffix=suffix, clean=files if clean is None else clean,
        trim_incomplete=files if trim_incomplete is None else trim_incomplete,
    )  # fmt: skip

    from vacap import runs

    caption_files = runs.CaptionFiles(sidecar or "txt", sidecar_dir, existing) if files else None
    job = runs.Job(
        listing, config, settings, shaping, model,
        dict(dtype=dtype, device=device, quant=quant, max_pixels=max_pixels, min_pixels=min_pixels), batch_size,
        output, overwrite, caption_files, threads, ray_options, verbose, (include or (), exclude or ()), risk_vocab,
    )  # fmt: skip
    with _run_errors():
        raise typer.Exit(runs.caption(job))


def _check_pixels(max_pixels: int | None, min_pixels: int | None) -> None:
    if max_pixels is not None and min_pixels is not None and min_pixels > max_pixels:
        _usage(f"--min-pixels {min_pixels} is above --max-pixels {max_pixels}; give a min at most the max")


# --- compare ------------------------------------------------------------------------------------


@app.command()
def compare(
    ctx: typer.Context,
    paths: o.Paths = None,
    recursive: o.Recursive = True,
    files_from: o.FilesFrom = None,
    include: o.Include = None,
    exclude: o.Exclude = None,
    limit: o.Limit = None,
    shard: o.Shard = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output", "-o", metavar="FILE", rich_help_panel="Output", help="JSONL file to write; stdout when omitted."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", metavar="", rich_help_panel="Output",
            help="Replace the output file even if it holds something other than vacap records.",
        ),
    ] = False,  # fmt: skip
    model: o.Model = DEFAULT_MODEL,
    dtype: o.Dtype = "auto",
    device: o.Device = "auto",
    threads: o.Threads = "auto",
    quant: o.Quant = "none",
    max_pixels: o.MaxPixels = None,
    min_pixels: o.MinPixels = None,
    batch_size: o.Batch = 1,
    methods: o.Methods = "greedy,vasparse,vcd,fastv",
    prompt: o.Prompt = DEFAULT_PROMPT,
    prompt_file: o.PromptFile = None,
    max_new_tokens: o.MaxNew = D.max_new_tokens,
    seed: o.Seed = D.seed,
    sparsity: o.Sparsities = None,
    alpha: o.Alphas = None,
    lam: o.Lams = None,
    sink_beta: o.SinkBetas = None,
    kv_budget: o.KvBudgets = None,
    vista_lambda: o.VistaLambdas = None,
    vista_gamma: o.VistaGammas = None,
    var_p: o.VarPs = None,
    var_rho: o.VarRhos = None,
    var_tau: o.VarTaus = None,
    var_dims: o.VarDims = "",
    pai_alpha: o.PaiAlphas = None,
    ablation: o.Ablation = False,
    temperature: o.Temperature = D.temperature,
    top_p: o.TopP = D.top_p,
    repetition_penalty: o.RepetitionPenalty = D.repetition_penalty,
    no_repeat_ngram: o.NoRepeatNgram = D.no_repeat_ngram,
    diagnostics: Annotated[
        str,
        typer.Option(
            parser=o.choice("summary", "tokens"), metavar="LEVEL", rich_help_panel=o.DIAGNOSTICS,
            help="Attention statistics kept: summary or tokens.",
        ),
    ] = "summary",  # fmt: skip
    risk: o.Risk = False,
    risk_vocab: o.RiskVocab = None,
    verbose: o.Verbose = False,
) -> None:
    """Run several methods and settings on the same images: one JSONL, and a table on stderr.

    compare writes its output afresh each time (it resumes nothing).
    """
    from vacap.compare import parse_list, parse_sweeps, settings_grid

    _setup(verbose)
    prompt = _prompt(prompt, prompt_file)
    # Every setting of the grid shares these.
    shared = dict(
        prompt=prompt, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p,
        repetition_penalty=repetition_penalty, no_repeat_ngram=no_repeat_ngram, risk=risk,
    )  # fmt: skip
    _check_vocabulary(risk, risk_vocab)
    try:
        sweeps = parse_sweeps(
            sparsity=sparsity, alpha=alpha, lam=lam, sink_beta=sink_beta, kv_budget=kv_budget,
            vista_lambda=vista_lambda, vista_gamma=vista_gamma, var_p=var_p, var_rho=var_rho, var_tau=var_tau,
            pai_alpha=pai_alpha,
        )  # fmt: skip
        grid = settings_grid(parse_list(methods, str, "--methods"), sweeps, ablation, {"var_dims": var_dims})
    except ValueError as exc:
        _usage(str(exc))
    _configs(ctx, list(grid.values()), **shared)
    _check_pixels(max_pixels, min_pixels)
    listing = _choose(
        paths, recursive=recursive, files_from=files_from, include=include or (), exclude=exclude or (),
        shard=shard, limit=limit,
    )  # fmt: skip
    from vacap import runs

    loading = dict(
        model=model, dtype=dtype, device=device, quant=quant, batch_size=batch_size, diagnostics=diagnostics,
        risk_vocab=risk_vocab, max_pixels=max_pixels, min_pixels=min_pixels,
    )  # fmt: skip
    with _run_errors():
        raise typer.Exit(
            runs.compare(listing, grid, {**loading, **shared}, output, overwrite, threads, (include or (), exclude or ()))
        )


# --- show, export, doctor -----------------------------------------------------------------------


@app.command()
def show(
    records: Annotated[Path, typer.Argument(help="A JSONL file written by vacap.")],
    image: Annotated[
        str, typer.Option(metavar="PATH", help="Path, file name or unique part of the path of the image.")
    ],
    setting: Annotated[
        Optional[str], typer.Option(metavar="NAME", help="Only records of this method or compare setting.")
    ] = None,
    heatmap: Annotated[
        Optional[Path], typer.Option(metavar="FILE", help="Write the image with attention overlaid (PNG).")
    ] = None,
    token: Annotated[
        Optional[int], typer.Option(metavar="N", help="With --heatmap: token N's attention (from 0); default: mean.")
    ] = None,
    by: Annotated[
        str,
        typer.Option(
            "--by", parser=o.choice("attention", "risk"), metavar="NAME",
            help="What shades the caption: attention (each token's image attention) or risk (each object "
            "word's hallucination risk, from caption --risk).",
        ),
    ] = "attention",  # fmt: skip
) -> None:
    """Print a caption with its tokens coloured by image attention (or its object words by risk);
    optionally write a heatmap."""
    from rich.console import Console

    from vacap import show as view

    if token is not None and heatmap is None:
        _usage("--token chooses what --heatmap draws: add --heatmap FILE, or leave --token out")
    if by == "risk" and heatmap is not None:
        _usage("--heatmap draws attention, not risk: leave out --by risk, or --heatmap")
    try:
        matches = view.find(records, image, setting)
    except (OSError, ValueError) as exc:  # no such records file, or no record of that image
        _usage(str(exc))
    console = Console()
    try:
        if by == "risk":
            matches = view.with_risk(matches)
        shown = [view.render(record, console.color_system, by) for record in matches]
    except ValueError as exc:
        _fail(str(exc))
    for text in shown:
        console.print(text)
    if heatmap is not None:
        try:
            view.write_heatmap(matches[-1], heatmap, token)
        except ValueError as exc:
            _fail(str(exc))
        _say(f"heatmap written to {heatmap}")


@app.command()
def export(
    records: Annotated[Path, typer.Argument(help="A JSONL file written by vacap caption or compare.")],
    format: Annotated[
        str,
        typer.Option(
            "--format", parser=o.choice("hf-metadata", "csv", "parquet", "txt"), metavar="NAME",
            help="hf-metadata: metadata.jsonl of an imagefolder; csv, parquet: captions.csv/.parquet, one row "
            "per image; txt: <stem>.txt per image, mirroring the images' folders.",
        ),
    ],  # fmt: skip
    to: Annotated[Path, typer.Option("--to", metavar="DIR", help="Folder to write into (created when missing).")],
    copy_images: Annotated[
        bool,
        typer.Option("--copy-images", metavar="", help="With hf-metadata: copy images that are outside --to into it."),
    ] = False,
    settings: Annotated[
        Optional[str],
        typer.Option(metavar="KEY", help="Export the captions of one set of settings: a fingerprint, compare label "
                     "or method."),
    ] = None,  # fmt: skip
    max_risk: Annotated[
        Optional[float],
        typer.Option(metavar="X", help="Leave out captions whose risk score (caption --risk) is above X, in [0, 1]."),
    ] = None,
    mark_risk: Annotated[
        bool,
        typer.Option("--mark-risk", metavar="", help="Write each caption's risk score beside it: a risk column "
                     "(csv, parquet) or key (hf-metadata)."),
    ] = False,  # fmt: skip
) -> None:
    """Export captions for dataset tools. The last ok record per image wins; errors are left out."""
    from vacap import export as exporting

    if max_risk is not None and not 0 <= max_risk <= 1:
        _usage(f"--max-risk must be in [0, 1], got {max_risk!r}")
    if mark_risk and format == "txt":
        _usage(exporting.MARK_RISK_TXT)
    risk_flags = [flag for flag, on in (("--max-risk", max_risk is not None), ("--mark-risk", mark_risk)) if on]
    try:
        if format == "parquet":
            exporting._pyarrow()
        selection = exporting.select(exporting.read_records(records), settings)
        if risk_flags:
            exporting.by_risk(selection, " and ".join(risk_flags), max_risk)
    except exporting.ExportError as exc:
        _usage(str(exc))
    if not selection.records:
        _fail(selection.nothing_left())
    try:
        result = exporting.export(selection, format, to, copy_images=copy_images, mark_risk=mark_risk)
    except exporting.ExportError as exc:
        _fail(str(exc), 2)
    except OSError as exc:
        _fail(f"cannot write the export into {to}: {exc}")
    for line in result.lines(selection, to, copy_images):
        _say(line)
    raise typer.Exit(1 if result.incomplete else 0)


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the report as JSON.")] = False) -> None:
    """Versions, devices, what --dtype auto picks and why, and whether the default model is cached.

    Writes nothing, loads no model, needs no network.
    """
    import json

    from vacap.doctor import collect, render

    info = collect()
    typer.echo(json.dumps(info, indent=2) if as_json else render(info))


# --- eval ---------------------------------------------------------------------------------------


@eval_app.command("chair")
def eval_chair(
    captions_jsonl: Annotated[Path, typer.Argument(help="Records written by vacap caption or compare.")],
    instances: Annotated[Path, typer.Option(metavar="FILE", help="COCO instances_*.json (segmentation objects).")],
    captions: Annotated[
        Optional[Path], typer.Option(metavar="FILE", help="COCO captions_*.json: objects in human captions.")
    ] = None,
    per_image: Annotated[
        Optional[Path], typer.Option(metavar="FILE", help="Write the hallucinated words per record (JSONL).")
    ] = None,
    risk: Annotated[
        bool,
        typer.Option(
            "--risk", metavar="",
            help="Also score the records' risk scores (caption --risk) against CHAIR's hallucinated objects.",
        ),
    ] = False,  # fmt: skip
    as_json: o.JsonFlag = False,
) -> None:
    """CHAIR_s, CHAIR_i, recall and length of captions, overall and per method."""
    import json

    from vacap.evaluate.chair import Chair, nothing_scored
    from vacap.evaluate.report import print_report

    try:
        chair = Chair.from_coco(instances, captions)
        with open(captions_jsonl, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, KeyError) as exc:
        _fail(f"cannot read {exc.filename if isinstance(exc, OSError) else 'the input'}: {exc}", 2)
    result = chair.evaluate(records, per_image=per_image is not None)
    if not result["overall"]["n"]:
        _fail(nothing_scored(records, result, instances))
    if per_image is not None:
        with open(per_image, "w", encoding="utf-8") as f:
            for entry in result["per_image"]:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    rows = {"overall": result["overall"], **result["by_method"]}
    counts = {"unmatched": result["unmatched"], "not_ok": result["not_ok"]}
    if risk:
        figures = chair.risk_figures(records)
        if not figures["risk_mentions"]:
            _fail("none of the scored records carries risk scores: caption with --risk first")
        rows["overall"] = {**rows["overall"], **figures}
    columns = ["CHAIR_s", "CHAIR_i", "recall", "avg_len", "n"]
    print_report("CHAIR", rows, columns, as_json, counts)
    if risk and not as_json:
        print_report(
            "risk scores against CHAIR's hallucinated objects", {"overall": rows["overall"]},
            ["risk_auroc", "risk_auprc", "risk_caught_at_90", "risk_mentions", "risk_hallucinated"], False,
            headers={"risk_auroc": "AUROC", "risk_auprc": "AUPRC", "risk_caught_at_90": "caught@90",
                     "risk_mentions": "mentions", "risk_hallucinated": "halluc."},
        )  # fmt: skip
    if result["unmatched"] or result["not_ok"]:
        _say(f"{result['unmatched']} records without a known COCO image id, {result['not_ok']} not ok")


@eval_app.command("pope")
def eval_pope(
    ctx: typer.Context,
    images: Annotated[Path, typer.Argument(help="Folder holding the COCO images named in --instances.")],
    instances: Annotated[Path, typer.Option(metavar="FILE", help="COCO instances_*.json.", rich_help_panel=o.BENCHMARK)],
    split: Annotated[
        str,
        typer.Option(
            parser=o.choice("random", "popular", "adversarial"), metavar="NAME", rich_help_panel=o.BENCHMARK,
            help="How absent objects are chosen: random, popular or adversarial.",
        ),
    ] = "random",  # fmt: skip
    limit: Annotated[
        Optional[int],
        typer.Option(min=1, metavar="N", rich_help_panel=o.BENCHMARK, help="Ask about N images (a seeded choice)."),
    ] = None,
    sample_seed: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=o.BENCHMARK, help="Seed of the images and objects asked about.")
    ] = 0,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", metavar="FILE", rich_help_panel=o.OUTPUT, help="Write every answer (JSONL)."),
    ] = None,
    model: o.Model = DEFAULT_MODEL,
    dtype: o.Dtype = "auto",
    device: o.Device = "auto",
    threads: o.Threads = "auto",
    quant: o.Quant = "none",
    max_pixels: o.MaxPixels = None,
    min_pixels: o.MinPixels = None,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1, metavar="N", rich_help_panel=o.MODEL,
            help="Questions decoded together. 6 by default: an image's six questions in one batch.",
        ),
    ] = 6,  # fmt: skip
    method: o.Method = D.method,
    max_new_tokens: o.MaxNew = 16,
    sparsity: o.Sparsity = D.sparsity,
    as_json: o.JsonFlag = False,
) -> None:
    """POPE: ask "Is there a {object} in the image?" for present and absent objects; score yes/no.

    Each image annotated with at least 3 classes gets 3 questions about objects it holds and 3
    about objects it lacks; images with fewer classes are left out. An answer whose first
    sentence says neither yes nor no is counted as unanswered and left out of the scores.
    """
    _setup(False)
    from rich.progress import Progress

    from vacap import runs
    from vacap.evaluate import pope
    from vacap.evaluate.report import print_report
    from vacap.progress import console

    _configs(ctx, [{}], method=method, sparsity=sparsity, max_new_tokens=max_new_tokens)
    _check_pixels(max_pixels, min_pixels)
    try:
        questions = pope.build_questions(instances, split, images=limit, seed=sample_seed)
    except (OSError, ValueError, KeyError) as exc:
        _fail(f"cannot read --instances {instances}: {exc}", 2)
    with _run_errors():
        captioner = runs.load_captioner(
            threads, model=model, method=method, sparsity=sparsity, max_new_tokens=max_new_tokens,
            batch_size=batch_size, dtype=dtype, device=device, quant=quant, max_pixels=max_pixels,
            min_pixels=min_pixels,
        )  # fmt: skip
    with Progress(console=console()) as progress:
        task = progress.add_task("asking", total=len(questions))
        got = pope.ask(captioner, questions, images, lambda n: progress.advance(task, n))
    if output is not None:
        pope.write_answers(output, got)
    if not got.asked:
        _fail(f"none of the {len(questions)} questions' images were readable under {images}")
    metrics = pope.score(got.asked, got.answers)
    if not metrics["n"]:
        example = next((answer for answer in got.answers if answer.strip()), "")
        _fail(
            f"none of the {len(got.asked)} answers says yes or no, so there is nothing to score "
            f"(one answer: {example!r}); a model that is not trained to answer questions cannot be scored by POPE"
        )
    label = method if method != "vasparse" else f"vasparse sparsity={sparsity:g}"
    columns = ["accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unanswered"]
    print_report(f"POPE ({split})", {label: metrics}, columns, as_json, {"split": split, "missing": got.missing})
    if metrics["unanswered"]:
        _say(
            f"{metrics['unanswered']} of {len(got.asked)} answers say neither yes nor no: counted as unanswered "
            "and left out of the scores"
        )
    if got.missing:
        _say(f"{got.missing} questions skipped: their images are missing or unreadable")


@eval_app.command("shapes")
def eval_shapes(
    world: Annotated[
        str,
        typer.Option(
            parser=o.choice("shapes", "priors"), metavar="NAME", rich_help_panel=o.BENCHMARK,
            help="Scene world: shapes (the demo model's) or priors (demo-priors', where priors cause errors).",
        ),
    ] = "shapes",  # fmt: skip
    scenes: Annotated[
        int, typer.Option("-n", "--scenes", min=1, metavar="N", rich_help_panel=o.BENCHMARK, help="Test scenes.")
    ] = 300,
    scene_seed: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=o.BENCHMARK, help="Seed of the generated test scenes.")
    ] = 1234,
    model: Annotated[
        Optional[str],
        typer.Option(
            metavar="ID", rich_help_panel=o.MODEL,
            help="Model to evaluate; by default the one trained on --world: demo, or demo-priors.",
        ),
    ] = None,  # fmt: skip
    dtype: Annotated[
        str,
        typer.Option(
            parser=o.choice("auto", "bf16", "fp16", "fp32"), metavar="NAME", rich_help_panel=o.MODEL,
            help="fp32, not auto (which depends on the CPU), so that figures compare across machines.",
        ),
    ] = "fp32",  # fmt: skip
    device: o.Device = "auto",
    threads: o.Threads = "auto",
    batch_size: Annotated[
        int,
        typer.Option(
            min=1, metavar="N", rich_help_panel=o.MODEL,
            help="Scenes decoded together. 8 by default: in fp32 (the default here) figures do not depend on it.",
        ),
    ] = 8,  # fmt: skip
    methods: o.Methods = "greedy,vasparse,vcd,fastv",
    sparsity: o.Sparsities = None,
    alpha: o.Alphas = None,
    lam: o.Lams = None,
    sink_beta: o.SinkBetas = None,
    kv_budget: o.KvBudgets = None,
    contrast_layers: o.ContrastLayerCounts = None,
    mask_rate: o.MaskRates = None,
    vista_lambda: o.VistaLambdas = None,
    vista_gamma: o.VistaGammas = None,
    var_p: o.VarPs = None,
    var_rho: o.VarRhos = None,
    var_tau: o.VarTaus = None,
    var_dims: o.VarDims = "",
    pai_alpha: o.PaiAlphas = None,
    ablation: Annotated[
        Optional[bool],
        typer.Option(
            "--ablation/--no-ablation", metavar="", rich_help_panel=o.VASPARSE,
            help="Add VASparse with each mechanism alone; by default when vasparse is among --methods.",
        ),
    ] = None,  # fmt: skip
    risk: Annotated[
        bool,
        typer.Option(
            "--risk", metavar="", rich_help_panel=o.DIAGNOSTICS,
            help="Caption with --risk and score the risk scores against the scenes' truth, per setting.",
        ),
    ] = False,  # fmt: skip
    as_json: o.JsonFlag = False,
) -> None:
    """CHAIR-style hallucination figures on generated shapes scenes with known ground truth.

    Comma-separated values of a method's settings (--sparsity, --alpha, ...) add a run of each
    method they act in per combination of the values; --ablation adds VASparse with each
    mechanism alone, by default when vasparse is in --methods. The
    second table gives each setting's CHAIR minus greedy's with a paired bootstrap interval.
    CHAIR_i is split into prior-driven and perceptual hallucinations by the world's train
    priors, with the part chance alone would give and the excess over it; --json also has the
    hallucinations by kind and prior, and CHAIR_i by position in the caption.
    """
    _setup(False)
    from rich.progress import Progress

    from vacap import runs
    from vacap.compare import parse_list, parse_sweeps, settings_grid
    from vacap.evaluate.shapes import print_results, run_benchmark
    from vacap.model import ModelLoadError
    from vacap.progress import console

    try:
        chosen = parse_list(methods, str, "--methods")
        sweeps = parse_sweeps(
            sparsity=sparsity, alpha=alpha, lam=lam, sink_beta=sink_beta, kv_budget=kv_budget,
            contrast_layers=contrast_layers, mask_rate=mask_rate, vista_lambda=vista_lambda,
            vista_gamma=vista_gamma, var_p=var_p, var_rho=var_rho, var_tau=var_tau, pai_alpha=pai_alpha,
        )  # fmt: skip
        grid = settings_grid(
            chosen, sweeps, "vasparse" in chosen if ablation is None else ablation, {"var_dims": var_dims}
        )
        grid = {label: {**settings, "risk": risk} for label, settings in grid.items()}
        for settings in grid.values():
            DecodeConfig(**settings)
    except ValueError as exc:
        _usage(str(exc))
    model = model or ("demo-priors" if world == "priors" else "demo")
    runs.use_threads(threads)
    # Every setting captions every scene: hundreds of captions per setting, minutes in all.
    with Progress(console=console()) as progress:
        task = progress.add_task(f"{len(grid)} settings x {scenes} scenes", total=len(grid) * scenes)
        try:
            rows = run_benchmark(
                model, grid, n=scenes, seed=scene_seed, batch_size=batch_size, dtype=dtype, device=device,
                world=world, on_record=lambda: progress.advance(task),
            )  # fmt: skip
        except (ValueError, ModelLoadError) as exc:
            _fail(str(exc), 2)
    title = f"{world} benchmark: {scenes} test scenes, scene seed {scene_seed}"
    print_results(rows, world, title, {"model": model, "world": world}, as_json)



if __name__ == "__main__":
    app()

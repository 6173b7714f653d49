"""The `vacap` command. Thin: parse and validate flags, then hand over to the library.

torch and transformers are imported inside the commands, so `vacap --help` starts fast.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, List, Literal, Optional

import typer

from vacap.config import DEFAULT_MODEL, DEFAULT_PROMPT, DecodeConfig, OutputConfig

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
_D = DecodeConfig()
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_device(value: str) -> str:
    if not _DEVICE.match(value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value


def _check_threads(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise typer.BadParameter(f"{value!r} is not a thread count; use auto or a whole number of at least 1")
    return value


# Options shared by the commands that load a model.
# readable=False: click would refuse a path it cannot read, ending the run; vacap gives it an
# error record and goes on with the rest.
Paths = Annotated[List[Path], typer.Argument(help="Image files and folders.", readable=False)]
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
Threads = Annotated[
    str,
    typer.Option(
        callback=_check_threads,
        help="CPU threads of torch: a number, or auto: OMP_NUM_THREADS if set, else the cores that other "
        "processes leave idle now, at least 1.",
    ),
]
Quant = Annotated[Literal["none", "8bit", "4bit"], typer.Option(help="bitsandbytes quantization of the LLM.")]
Recursive = Annotated[bool, typer.Option("--recursive/--no-recursive", help="Descend into sub-folders.")]
Diagnostics = Annotated[
    Literal["none", "summary", "tokens"],
    typer.Option(help="Attention statistics in each record (see docs/diagnostics.md)."),
]
# Sampling (caption and compare); the ranges are checked by DecodeConfig, whose messages say them.
Seed = Annotated[int, typer.Option(help="Seed for the random parts: masks, VCD noise, sampling draws.")]
Temperature = Annotated[float, typer.Option(help="0 is greedy; above 0 samples (with the method's final logits).")]
TopP = Annotated[float, typer.Option(help="Sample from the smallest set of tokens holding this probability, (0, 1].")]
RepetitionPenalty = Annotated[
    float, typer.Option(help="Above 1 discourages tokens the caption already has (also under greedy); 1 is off.")
]
NoRepeatNgram = Annotated[int, typer.Option(help="Never repeat an n-gram of this many tokens in a caption; 0 is off.")]


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


def _note_unused_top_p(config: DecodeConfig) -> None:
    if config.top_p < 1 and config.temperature == 0:
        logging.getLogger("vacap").warning("--top-p acts only with a --temperature above 0; greedy ignores it")


def _usage(exc: Exception) -> typer.BadParameter:
    return typer.BadParameter(str(exc))


def _discover(paths: List[Path], recursive: bool, listed=()):
    """The images to caption (a ``Listing``); a path that does not exist is a usage error."""
    from vacap.images import discover

    try:
        return discover(paths, recursive=recursive, listed=listed)
    except FileNotFoundError as exc:
        raise _usage(exc) from exc


def _use_threads(threads: str) -> None:
    """Set torch's CPU thread count (``--threads``), and say it with -v."""
    import torch

    from vacap.model import resolve_threads

    count, why = resolve_threads(threads)
    torch.set_num_threads(count)
    logging.getLogger("vacap").info("torch threads: %d (%s)", count, why)


def _captioner(console, threads: str = "auto", **arguments):
    """Load the model; a flag the model cannot honour is a usage error (exit 2)."""
    from rich.text import Text

    from vacap.captioner import Captioner
    from vacap.model import ModelLoadError

    _use_threads(threads)
    try:
        return Captioner(**arguments)
    except (ModelLoadError, ValueError) as exc:
        # Text, not markup: messages contain brackets such as .[quant].
        console.print(Text.assemble(("error: ", "red"), str(exc)), soft_wrap=True)
        raise typer.Exit(2) from exc


# The caption command's dataset options: caption files, caption shaping, choosing inputs.
OptionalPaths = Annotated[
    Optional[List[Path]], typer.Argument(help="Image files and folders.", show_default=False, readable=False)
]
PromptFile = Annotated[
    Optional[Path],
    typer.Option(help="Read the prompt from this UTF-8 file; {filename}, {stem} and {folder} are filled per image."),
]
Sidecar = Annotated[
    Optional[Literal["txt", "caption"]],
    typer.Option(help="Also write each caption to <image stem>.txt (or .caption) beside its image."),
]
SidecarDir = Annotated[
    Optional[Path], typer.Option(help="Write the caption files into this folder, mirroring the input tree.")
]
Existing = Annotated[
    Literal["skip", "overwrite", "append", "prepend"],
    typer.Option(
        help="An image whose caption file exists: skip it (not captioned, file untouched), overwrite the file, "
        "or append/prepend the caption to it (as one more tag, or as a sentence after prose)."
    ),
]
Prefix = Annotated[str, typer.Option(help="Text put before each caption, such as a trigger word: 'ohwx, '.")]
Suffix = Annotated[str, typer.Option(help="Text put after each caption.")]
Clean = Annotated[
    Optional[bool],
    typer.Option(
        "--clean/--no-clean",
        help="Strip chat boilerplate around a caption (ASSISTANT:, <s>, quotes). Default: on with caption files.",
        show_default=False,
    ),
]
Trim = Annotated[
    Optional[bool],
    typer.Option(
        "--trim-incomplete/--no-trim-incomplete",
        help="Drop a last sentence cut off by --max-new-tokens. Default: on with caption files.",
        show_default=False,
    ),
]
FilesFrom = Annotated[
    Optional[str],
    typer.Option(help="Also caption the paths listed in this file, one per line; '-' reads stdin. # starts a comment."),
]
Include = Annotated[Optional[List[str]], typer.Option(help="Only images whose path in its folder matches this glob.")]
Exclude = Annotated[Optional[List[str]], typer.Option(help="Leave out images whose path matches this glob.")]
Limit = Annotated[Optional[int], typer.Option(min=1, help="Only the first N images, after the filters and --shard.")]
Shard = Annotated[Optional[str], typer.Option(help="I/N: only shard I (from 0) of N, split by a hash of each path.")]
Ray = Annotated[
    bool,
    typer.Option(
        "--ray",
        # The backslash keeps rich from reading [ray] as markup and dropping it from the help.
        help='Run the job on Ray Data: a pool of actors, each with the model loaded once; records in completion '
        'order. Needs the ray extra (pip install ".\\[ray]" in vacap\'s checkout).',
    ),
]
RayAddress = Annotated[
    Optional[str], typer.Option(help="With --ray: join the Ray cluster at this address; default: start a local one.")
]
Workers = Annotated[
    Optional[int], typer.Option(min=1, help="With --ray: actors in the pool; default one per GPU, else 1.")
]
GpusPerWorker = Annotated[
    Optional[float],
    typer.Option(min=0, help="With --ray: GPUs each actor takes; default 1 where the cluster has GPUs, else 0."),
]


@app.command()
def caption(
    paths: OptionalPaths = None,
    output: Output = None,
    model: Model = DEFAULT_MODEL,
    method: Annotated[Literal["vasparse", "greedy", "vcd", "fastv"], typer.Option(help="Decoding method.")] = _D.method,
    prompt: Prompt = DEFAULT_PROMPT,
    max_new_tokens: MaxNew = _D.max_new_tokens,
    batch_size: Batch = 1,
    dtype: Dtype = "auto",
    device: Device = "auto",
    threads: Threads = "auto",
    quant: Quant = "none",
    recursive: Recursive = True,
    overwrite: Annotated[bool, typer.Option(help="Start the output file afresh instead of resuming.")] = False,
    sparsity: Annotated[float, typer.Option(help="Fraction of cached tokens dropped per step, [0, 1).")] = _D.sparsity,
    lam: Annotated[float, typer.Option(help="Weight of visual saliency in token selection, >= 0.")] = _D.lam,
    alpha: Annotated[
        Optional[float], typer.Option(help="Contrastive decoding weight, >= 0; by default 0.1 for vasparse, 1 for vcd.")
    ] = None,
    apc_beta: Annotated[float, typer.Option(help="Adaptive plausibility cut-off, [0, 1].")] = _D.apc_beta,
    sink_beta: Annotated[float, typer.Option(help="Sink attention penalty strength, >= 0.")] = _D.sink_beta,
    start_layer: Annotated[int, typer.Option(help="First decoder layer selection and sink touch.")] = _D.start_layer,
    contrast_layers: Annotated[int, typer.Option(help="Decoder layers of the contrast branch.")] = _D.contrast_layers,
    mask_rate: Annotated[float, typer.Option(help="Image slots hidden in the contrast branch, [0, 1].")] = _D.mask_rate,
    kv_budget: Annotated[float, typer.Option(help="Fraction of the prompt cache kept, (0, 1]; 1 = off.")] = _D.kv_budget,
    seed: Seed = _D.seed,
    temperature: Temperature = _D.temperature,
    top_p: TopP = _D.top_p,
    repetition_penalty: RepetitionPenalty = _D.repetition_penalty,
    no_repeat_ngram: NoRepeatNgram = _D.no_repeat_ngram,
    diagnostics: Diagnostics = "none",
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Decode steps as one torch.compile'd static-shape step (greedy, vcd, fastv; other methods "
            "fall back and say so). The first batch pays the compilation.",
        ),
    ] = False,
    prompt_file: PromptFile = None,
    sidecar: Sidecar = None,
    sidecar_dir: SidecarDir = None,
    existing: Existing = "skip",
    prefix: Prefix = "",
    suffix: Suffix = "",
    clean: Clean = None,
    trim_incomplete: Trim = None,
    files_from: FilesFrom = None,
    include: Include = None,
    exclude: Exclude = None,
    limit: Limit = None,
    shard: Shard = None,
    ray: Ray = False,
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log loading details on stderr.")] = False,
) -> None:
    """Caption every image under PATHS, one JSONL record per image (and a caption file with --sidecar)."""
    _setup(verbose)
    ray_options = _ray_options(ray, ray_address, workers, gpus_per_worker)
    if ray_options is not None and threads != "auto":
        raise _usage(ValueError("--threads acts on a local run; under --ray each actor uses its share of the CPUs"))
    if prompt_file is not None:
        prompt = _read_prompt(prompt_file, prompt)
    # Caption files are datasets: there, clean-up and trimming are on unless turned off.
    files = sidecar is not None or sidecar_dir is not None
    if existing != "skip" and not files:
        raise _usage(ValueError(f"--existing {existing} acts on caption files: add --sidecar txt|caption"))
    shaping = OutputConfig(
        prefix=prefix, suffix=suffix, clean=files if clean is None else clean,
        trim_incomplete=files if trim_incomplete is None else trim_incomplete,
    )  # fmt: skip
    settings = dict(
        method=method, prompt=prompt, max_new_tokens=max_new_tokens, sparsity=sparsity, lam=lam, alpha=alpha,
        apc_beta=apc_beta, sink_beta=sink_beta, start_layer=start_layer, contrast_layers=contrast_layers,
        mask_rate=mask_rate, kv_budget=kv_budget, seed=seed, diagnostics=diagnostics, compile=compile,
        temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty, no_repeat_ngram=no_repeat_ngram,
    )  # fmt: skip
    try:
        config = DecodeConfig(**settings)
    except ValueError as exc:
        raise _usage(exc) from exc
    _note_unused_top_p(config)
    if compile and quant != "none":
        # bitsandbytes layers break the compiled graph into pieces that recompile at every new shape.
        raise _usage(ValueError(f"--compile cannot be used with --quant {quant}; use one or the other"))
    listing = _choose(paths or [], recursive, files_from, include, exclude, shard, limit)
    images = listing.files

    from rich.console import Console

    from vacap.records import make_record, settings_key
    from vacap.sidecars import SidecarRun, Sidecars

    console = Console(stderr=True)
    run = None
    if files:
        run = SidecarRun(Sidecars(sidecar or "txt", sidecar_dir, existing), listing.files, listing.roots)
        refusal = run.refusal()
        if refusal is not None:
            console.print(f"error: {refusal}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        if output is None:
            output = Path(os.devnull)  # the caption files are the output; `-o -` streams records too
    from vacap.stops import Stops

    writer = _open_output(console, output, overwrite=overwrite, resume=True)
    with writer, Stops(console, writer, run) as stops:
        if not images and not listing.problems:
            console.print(_nothing_chosen(listing, include, exclude), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(0)
        pool = None
        if ray_options is not None:
            from vacap import ray_run

            pool = _ray_step(console, ray_run.connect, ray_options)
            params = _ray_step(
                console, ray_run.worker_params, pool, config, shaping, dtype=dtype, device=device, quant=quant
            )
        else:
            params = _record_params(console, config, shaping, dtype=dtype, device=device, quant=quant)
        problems = [
            make_record(path=path, status="error", error=reason, model=model, method=config.method, params=params)
            for path, reason in listing.problems
        ]
        uncaptioned = run.unwritten(images) if run else images
        todo = _still_to_do(uncaptioned, writer, settings_key(model, params), run)
        if run is not None:
            run.sweep()
            _say_edited(console, run.edited)
        if not todo and not problems:
            files_too = " or with a caption file" if len(uncaptioned) < len(images) else ""
            console.print(f"all {len(images)} images already captioned with these settings{files_too}")
            raise typer.Exit(0)

        from vacap.progress import RunProgress

        progress = RunProgress(total=len(images) + len(problems), console=console)
        progress.skipped(len(images) - len(todo))
        records = iter(problems)
        loading = dict(model=model, dtype=dtype, device=device, quant=quant, batch_size=batch_size, output=shaping)
        if todo and pool is not None:
            captioned = ray_run.caption(pool, todo, {**loading, **settings}, verbose=verbose)
            records = itertools.chain(problems, captioned)
        elif todo:  # folders that could not be listed alone need no model
            captioner = _captioner(console, threads, **loading, **settings)

            def skip(path: str, sha256: str, settings_key: str) -> bool:
                done = writer.is_done(path, sha256, settings_key)
                if done:
                    progress.skipped()
                return done

            records = itertools.chain(problems, captioner.records((str(p) for p in todo), skip=skip, folders=False))
        stops.captioning = True
        with progress:
            if pool is None:
                _write_records(console, writer, progress, records, run)
            else:  # the actors start as the first records are asked for
                _ray_step(console, _write_records, console, writer, progress, records, run)
    progress.print_summary()
    raise typer.Exit(1 if progress.counts["error"] else 0)


def _read_prompt(path: Path, prompt: str) -> str:
    """The prompt template in a --prompt-file, its trailing newline dropped."""
    if prompt != DEFAULT_PROMPT:
        raise _usage(ValueError("give --prompt or --prompt-file, not both"))
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise _usage(ValueError(f"cannot read --prompt-file {path}: {why}")) from exc


def _ray_options(ray: bool, address, workers, gpus_per_worker):
    """The ``RayOptions`` of a --ray run, None without --ray; the Ray flags without --ray, or
    --ray where Ray is not installed, are usage errors."""
    given = {"--ray-address": address, "--workers": workers, "--gpus-per-worker": gpus_per_worker}
    if not ray:
        stray = [flag for flag, value in given.items() if value is not None]
        if stray:
            raise _usage(ValueError(f"{', '.join(stray)} acts only with --ray"))
        return None
    from vacap.ray_run import RayOptions, RayUnavailable, require_ray

    try:
        require_ray()
    except RayUnavailable as exc:
        raise _usage(exc) from exc
    return RayOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker)


def _ray_step(console, step, *args, **kwargs):
    """``step(*args, **kwargs)``, where Ray that cannot start, cannot be reached or whose workers
    cannot load the model (``RayUnavailable``) exits 2 with the reason."""
    from vacap.ray_run import RayUnavailable

    try:
        return step(*args, **kwargs)
    except RayUnavailable as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _choose(paths, recursive, files_from, include, exclude, shard, limit):
    """The images this run takes (a ``Listing``): PATHS and the --files-from list, filtered,
    sharded and limited; any bad value or missing PATH is a usage error."""
    from vacap.images import parse_shard, read_path_list, select

    try:
        chosen_shard = parse_shard(shard) if shard is not None else None
    except ValueError as exc:
        raise _usage(exc) from exc
    listed: list[str] = []
    if files_from is not None:
        try:
            data = sys.stdin.buffer.read() if files_from == "-" else Path(files_from).read_bytes()
        except OSError as exc:
            raise _usage(ValueError(f"cannot read --files-from {files_from}: {exc.strerror or exc}")) from exc
        listed = read_path_list(data)
    elif not paths:
        raise _usage(ValueError("give image files or folders, or --files-from FILE"))
    listing = _discover(paths, recursive, listed)
    return select(listing, include=include or (), exclude=exclude or (), shard=chosen_shard, limit=limit)


def _nothing_chosen(listing, include, exclude) -> str:
    """What a run that found nothing to caption says: how many images the filters left out, and
    how their patterns are matched, the usual cause when a filter keeps nothing."""
    if not listing.found:
        return "no images to caption"
    patterns = " and ".join(flag for flag, given in (("--include", include), ("--exclude", exclude)) if given)
    how = (
        f"; {patterns} patterns are matched against each image's path inside the folder it was found "
        "under (for dataset/cats/a.png found under dataset: cats/a.png, so cats/*.png or *.png)"
        if patterns
        else ""
    )
    return f"no images to caption: the {listing.found} images found were all left out by the filters{how}"


def _open_output(console, output: Optional[Path], **mode):
    """The output opened, locked and checked, before any model loads; any problem exits 2."""
    from vacap.records import OutputError, RecordWriter

    try:
        return RecordWriter(output, **mode)
    except OutputError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _record_params(console, config: DecodeConfig, output: OutputConfig, **precision) -> dict:
    """The records' params (and so the resume key), worked out as the Captioner will, without
    loading the model."""
    from vacap.captioner import record_params
    from vacap.model import ModelLoadError

    try:
        return record_params(config, output=output, **precision)
    except ModelLoadError as exc:  # --device cuda without CUDA
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _still_to_do(images: List[Path], writer, key: str, run=None) -> list[Path]:
    """The images without an ok record for their current bytes under these settings. With
    caption files (``run``), a done image's caption file is brought to what its record says
    (written when it is missing or the run stopped before writing it).

    Only an image whose path has such a record is hashed; the rest are read once, when captioned.
    """
    from vacap.images import ImageError, file_sha256

    todo = []
    for image in images:
        done = writer.done_hashes(str(image), key)
        if done:
            try:
                sha256 = file_sha256(image)
                if sha256 in done and (run is None or run.restore(image, done[sha256])):
                    continue
            except ImageError:
                pass  # captioning it will say what is wrong, as an error record
        todo.append(image)
    return todo


def _say_edited(console, edited: list[str]) -> None:
    """Say once which caption files resume left as they are, since they were changed after their run."""
    if edited:
        more = f" and {len(edited) - 3} more" if len(edited) > 3 else ""
        one = len(edited) == 1
        files, records = ("file holds", "its record says") if one else ("files hold", "their records say")
        left = "it is" if one else "they are"
        console.print(
            f"{len(edited)} caption {files} neither what {records} was written nor what was there before "
            f"(changed since?); left as {left}: {', '.join(edited[:3])}{more}",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip


def _write_records(console, writer, progress, records, run=None) -> None:
    """Write and count each record, and with caption files (``run``) each file after its
    record; an output that fails mid-run ends the run with exit 1, a reader that went away with
    141 and no word, as a Unix tool that SIGPIPE ends."""
    from vacap.records import OutputError, ReaderGone

    logged = run.logged(records, writer) if run is not None else _logged(records, writer)
    try:
        # Closed on the way out (a stop, a failed write), so the caption files of the records
        # already written are written before the output is closed.
        with contextlib.closing(logged):
            for record in logged:
                progress.record(record)
    except ReaderGone:
        # Anything still buffered for stdout would fail again at exit, with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except OutputError as exc:
        kept = "; the records written before are kept, and a new run continues from them" if writer.resumable else ""
        console.print(f"error: {exc}{kept}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _logged(records, writer):
    for record in records:
        writer.write(record)
        yield record


# Comma-separated values of a VASparse setting, one VASparse run per value (compare, eval shapes).
Sparsities = Annotated[Optional[str], typer.Option("--sparsity", help="Comma-separated sparsities for vasparse.")]
Alphas = Annotated[Optional[str], typer.Option("--alpha", help="Comma-separated contrast weights for vasparse.")]
Lams = Annotated[Optional[str], typer.Option("--lam", help="Comma-separated saliency weights for vasparse.")]
SinkBetas = Annotated[Optional[str], typer.Option("--sink-beta", help="Comma-separated sink penalties for vasparse.")]
KvBudgets = Annotated[Optional[str], typer.Option("--kv-budget", help="Comma-separated KV budgets for vasparse.")]
ContrastLayerCounts = Annotated[
    Optional[str],
    typer.Option("--contrast-layers", help="Comma-separated decoder-layer counts of vasparse's contrast branch."),
]
MaskRates = Annotated[
    Optional[str], typer.Option("--mask-rate", help="Comma-separated shares of image slots hidden in the contrast branch.")
]


@app.command()
def compare(
    paths: Paths,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "greedy,vasparse,vcd,fastv",
    sparsity: Sparsities = None,
    alpha: Alphas = None,
    lam: Lams = None,
    sink_beta: SinkBetas = None,
    kv_budget: KvBudgets = None,
    ablation: Annotated[bool, typer.Option(help="Add VASparse with each mechanism alone.")] = False,
    output: Output = None,
    model: Model = DEFAULT_MODEL,
    prompt: Prompt = DEFAULT_PROMPT,
    max_new_tokens: MaxNew = _D.max_new_tokens,
    batch_size: Batch = 1,
    dtype: Dtype = "auto",
    device: Device = "auto",
    threads: Threads = "auto",
    quant: Quant = "none",
    recursive: Recursive = True,
    diagnostics: Annotated[Literal["summary", "tokens"], typer.Option(help="Attention statistics kept.")] = "summary",
    seed: Seed = _D.seed,
    temperature: Temperature = _D.temperature,
    top_p: TopP = _D.top_p,
    repetition_penalty: RepetitionPenalty = _D.repetition_penalty,
    no_repeat_ngram: NoRepeatNgram = _D.no_repeat_ngram,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the output file even if it holds something other than vacap records.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log loading details on stderr.")] = False,
) -> None:
    """Run several methods and settings on the same images: one JSONL, and a table on stderr."""
    from vacap.compare import parse_list, parse_sweeps, settings_grid, summary_table

    _setup(verbose)
    # Every setting of the grid shares these.
    shared = dict(
        prompt=prompt, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p,
        repetition_penalty=repetition_penalty, no_repeat_ngram=no_repeat_ngram,
    )  # fmt: skip
    try:
        sweeps = parse_sweeps(sparsity=sparsity, alpha=alpha, lam=lam, sink_beta=sink_beta, kv_budget=kv_budget)
        grid = settings_grid(parse_list(methods, str, "--methods"), sweeps, ablation)
        for settings in grid.values():
            config = DecodeConfig(**settings, **shared)
    except ValueError as exc:
        raise _usage(exc) from exc
    _note_unused_top_p(config)
    listing = _discover(paths, recursive)
    images = [str(p) for p in listing.files]

    from rich.console import Console

    from vacap.progress import RunProgress

    console = Console(stderr=True)
    # compare replaces its output each time, so it resumes nothing; it still refuses a file
    # that is not vacap records (or is being written by another run) before the model loads.
    with _open_output(console, output, overwrite=overwrite, resume=False) as writer:
        if not images and not listing.problems:
            console.print("no images to compare")
            raise typer.Exit(0)
        progress = RunProgress(total=(len(images) + len(listing.problems)) * len(grid), console=console)
        base = _captioner(
            console, threads, model=model, dtype=dtype, device=device, quant=quant, batch_size=batch_size,
            diagnostics=diagnostics, **shared,
        )  # fmt: skip
        written: list[dict] = []

        def labelled():
            for label, settings in grid.items():
                captioner = base.with_settings(**settings)
                problems = (captioner.error_record(str(path), reason) for path, reason in listing.problems)
                for record in itertools.chain(problems, captioner.records(images, folders=False)):
                    record["setting"] = label
                    written.append(record)
                    yield record

        with progress:
            _write_records(console, writer, progress, labelled())
    console.print(summary_table(written, list(grid)))
    progress.print_summary()
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
        console.print(view.render(record, console.color_system))
    if heatmap is not None:
        try:
            view.write_heatmap(matches[-1], heatmap, token)
        except ValueError as exc:
            Console(stderr=True).print(f"error: {exc}", markup=False)
            raise typer.Exit(1) from exc
        Console(stderr=True).print(f"heatmap written to {heatmap}", markup=False)


@app.command()
def export(
    records: Annotated[Path, typer.Argument(help="A JSONL file written by vacap caption or compare.")],
    format: Annotated[
        Literal["hf-metadata", "csv", "parquet", "txt"],
        typer.Option(
            "--format",
            help="hf-metadata: metadata.jsonl of an imagefolder; csv, parquet: captions.csv/.parquet, one row "
            "per image; txt: <stem>.txt per image, mirroring the images' folders.",
        ),
    ],
    to: Annotated[Path, typer.Option("--to", help="Folder to write into (created when missing).")],
    copy_images: Annotated[
        bool, typer.Option("--copy-images", help="hf-metadata: copy images that are outside --to into it.")
    ] = False,
    settings: Annotated[
        Optional[str],
        typer.Option(help="Export the captions of one set of settings: a fingerprint, compare label or method."),
    ] = None,
) -> None:
    """Export captions for dataset tools. The last ok record per image wins; errors are left out."""
    from vacap import export as exporting

    try:
        if format == "parquet":
            exporting._pyarrow()
        selection = exporting.select(exporting.read_records(records), settings)
        if not selection.records:
            typer.echo(f"error: no ok caption to export ({selection.errors} images have only error records)", err=True)
            raise typer.Exit(1)
        result = exporting.export(selection, format, to, copy_images=copy_images)
    except exporting.ExportError as exc:
        raise _usage(exc) from exc
    except OSError as exc:
        typer.echo(f"error: cannot write the export into {to}: {exc}", err=True)
        raise typer.Exit(1) from None
    if result.finished:
        typer.echo(f"finished first the export a stopped run had left ready in {to}", err=True)
    copied = ""
    if copy_images:
        copied = f", {result.copied} images copied, {result.identical} already there with the same bytes"
    typer.echo(f"exported {result.written} captions to {result.where}{copied}", err=True)
    left_out = {
        "images with only error records": selection.errors,
        "earlier ok records superseded by a later one": selection.superseded,
        "records of other settings": selection.other_settings,
    }
    for what, count in left_out.items():
        if count:
            typer.echo(f"left out: {count} {what}", err=True)
    problems = (
        ("images not found", result.missing),
        ("images whose caption files clash", result.clashes),
        ("files that cannot be written", result.unwritable),
    )
    for what, paths in problems:
        if paths:
            more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
            typer.echo(f"left out: {len(paths)} {what}: {', '.join(paths[:5])}{more}", err=True)
    raise typer.Exit(1 if any(paths for _, paths in problems) else 0)


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")]


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Versions, devices, what --dtype auto picks and why, and whether the default model is cached.

    Writes nothing, loads no model, needs no network.
    """
    import json

    from vacap.doctor import collect, render

    info = collect()
    typer.echo(json.dumps(info, indent=2) if as_json else render(info))


def _print_report(
    title: str, rows: dict, columns: list[str], as_json: bool, extra: dict | None = None, **table
) -> None:
    """Results are the command's data: stdout, as a table or JSON (``table``: headers, formats)."""
    import json

    from rich.console import Console

    from vacap.evaluate.report import metrics_table

    if as_json:
        typer.echo(json.dumps({**(extra or {}), "results": rows}, indent=2))
    else:
        Console().print(metrics_table(title, rows, columns, **table))


def _interval(figure: list[float]) -> str:
    """(difference, low, high) as fractions -> '+1.2 [-0.3, +2.6]' in percentage points."""
    difference, low, high = (100 * value for value in figure)
    return f"{difference:+.1f} [{low:+.1f}, {high:+.1f}]"


def _nothing_to_score(records: list[dict], result: dict, instances: Path) -> str:
    """Why CHAIR scored no record, with what the user can check."""
    if not records:
        return "the records file holds no record"
    if not result["unmatched"]:
        return f"none of the {len(records)} records is ok (status other than ok), so no caption is scored"
    names = [Path(str(r.get("path"))).name for r in records if r.get("status") == "ok"]
    return (
        f"none of the {result['unmatched']} ok records matches an image of {instances}: CHAIR finds an "
        "image by its COCO id, from an image_id field or a file name such as COCO_val2014_000000123456.jpg "
        f"or 000000123456.jpg, and these records' files are named like {', '.join(names[:3])}"
    )


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
    if not result["overall"]["n"]:
        typer.echo(f"error: {_nothing_to_score(records, result, instances)}", err=True)
        raise typer.Exit(1)
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
    threads: Threads = "auto",
    quant: Quant = "none",
    as_json: JsonFlag = False,
) -> None:
    """POPE: ask "Is there a {object} in the image?" for present and absent objects; score yes/no.

    Each image annotated with at least 3 classes gets 3 questions about objects it holds and 3
    about objects it lacks; images with fewer classes are left out. An answer whose first
    sentence says neither yes nor no is counted as unanswered and left out of the scores.
    """
    _setup(False)
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
        console, threads, model=model, method=method, sparsity=sparsity, max_new_tokens=max_new_tokens,
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
        console.print(
            f"error: none of the {len(questions)} questions' images were readable under {images}", markup=False
        )
        raise typer.Exit(1)
    label = method if method != "vasparse" else f"vasparse sparsity={sparsity:g}"
    metrics = pope.score(asked, answers)
    if not metrics["n"]:
        example = next((answer for answer in answers if answer.strip()), "")
        console.print(
            f"error: none of the {len(asked)} answers says yes or no, so there is nothing to score "
            f"(one answer: {example!r}); a model that is not trained to answer questions cannot be "
            "scored by POPE",
            markup=False,
        )
        raise typer.Exit(1)
    columns = ["accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unanswered"]
    _print_report(f"POPE ({split})", {label: metrics}, columns, as_json, {"split": split, "missing": missing})
    if metrics["unanswered"]:
        console.print(
            f"{metrics['unanswered']} of {len(asked)} answers say neither yes nor no: counted as unanswered "
            "and left out of the scores",
            markup=False,
        )
    if missing:
        console.print(f"{missing} questions skipped: their images are missing or unreadable", markup=False)


@eval_app.command("shapes")
def eval_shapes(
    world: Annotated[
        Literal["shapes", "priors"],
        typer.Option(help="Scene world: shapes (the demo model's) or priors (demo-priors', where priors cause errors)."),
    ] = "shapes",
    model: Annotated[
        Optional[str],
        typer.Option(help="Model to evaluate; by default the one trained on --world: demo, or demo-priors."),
    ] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] = "greedy,vasparse,vcd,fastv",
    sparsity: Sparsities = None,
    alpha: Alphas = None,
    lam: Lams = None,
    sink_beta: SinkBetas = None,
    kv_budget: KvBudgets = None,
    contrast_layers: ContrastLayerCounts = None,
    mask_rate: MaskRates = None,
    ablation: Annotated[
        Optional[bool],
        typer.Option(
            "--ablation/--no-ablation",
            help="Add VASparse with each mechanism alone; by default when vasparse is among --methods.",
        ),
    ] = None,
    scenes: Annotated[int, typer.Option("-n", "--scenes", min=1, help="Test scenes to caption.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the generated test scenes.")] = 1234,
    batch_size: Batch = 8,
    dtype: Annotated[
        Literal["auto", "bf16", "fp16", "fp32"],
        typer.Option(help="fp32, not auto (which depends on the CPU), so figures compare across machines."),
    ] = "fp32",
    device: Device = "auto",
    threads: Threads = "auto",
    as_json: JsonFlag = False,
) -> None:
    """CHAIR-style hallucination figures on generated shapes scenes with known ground truth.

    --sparsity, --alpha, --lam, --sink-beta, --kv-budget, --contrast-layers, --mask-rate and
    --ablation add VASparse runs (one per combination of the listed values), so they need
    vasparse in --methods; the ablation rows are on by default when it is there. The
    second table gives each setting's CHAIR minus greedy's with a paired bootstrap interval.
    CHAIR_i is split into prior-driven and perceptual hallucinations by the world's train
    priors; --json also has CHAIR_i by position in the caption.
    """
    _setup(False)
    from vacap.compare import parse_list, parse_sweeps, settings_grid
    from vacap.evaluate.shapes import compare_to_baseline, run_benchmark
    from vacap.model import ModelLoadError

    try:
        chosen = parse_list(methods, str, "--methods")
        sweeps = parse_sweeps(
            sparsity=sparsity, alpha=alpha, lam=lam, sink_beta=sink_beta, kv_budget=kv_budget,
            contrast_layers=contrast_layers, mask_rate=mask_rate,
        )  # fmt: skip
        grid = settings_grid(chosen, sweeps, "vasparse" in chosen if ablation is None else ablation)
        for settings in grid.values():
            DecodeConfig(**settings)
        model = model or ("demo-priors" if world == "priors" else "demo")
    except ValueError as exc:
        raise _usage(exc) from exc
    from rich.console import Console
    from rich.progress import Progress

    _use_threads(threads)
    # Every setting captions every scene: hundreds of captions per setting, minutes in all.
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task(f"{len(grid)} settings x {scenes} scenes", total=len(grid) * scenes)
        try:
            rows = run_benchmark(
                model, grid, n=scenes, seed=seed, batch_size=batch_size, dtype=dtype, device=device, world=world,
                on_record=lambda: progress.advance(task),
            )  # fmt: skip
        except (ValueError, ModelLoadError) as exc:
            raise _usage(exc) from exc
    baseline = "greedy" if "greedy" in grid else rows[0]["setting"]
    differences = compare_to_baseline(rows, baseline)
    hidden = ("setting", "texts", "scores")
    table = {
        row["setting"]: {**{k: v for k, v in row.items() if k not in hidden}, **differences.get(row["setting"], {})}
        for row in rows
    }
    # Six figures fit in 80 columns beside a long sweep label; the rest (CHAIR_s on the priors world,
    # CHAIR_i_perceptual, CHAIR_i by position) are in --json.
    first = ["CHAIR_i", "CHAIR_i_prior"] if world == "priors" else ["CHAIR_s", "CHAIR_i"]
    columns = [*first, "recall", "mean_length", "tokens_per_s", "errors"]
    title = f"{world} benchmark: {scenes} test scenes, seed {seed}"
    extra = {"model": model, "world": world, "baseline": baseline}
    _print_report(
        title, table, columns, as_json, extra,
        headers={"CHAIR_i_prior": "prior", "mean_length": "words", "tokens_per_s": "tok/s", "errors": "err"},
        formats={name: ".3f" for name in columns[:3]} | {"mean_length": ".1f", "tokens_per_s": ".1f"},
    )  # fmt: skip
    if differences and not as_json:
        # Two intervals fit in 80 columns; on the priors world, the two that say whether a setting
        # cuts prior-driven hallucinations without losing objects (all of them are in --json).
        shown = ["CHAIR_i_prior", "recall"] if world == "priors" else ["CHAIR_s", "CHAIR_i"]
        _print_report(
            f"minus {baseline}, in points [95% paired bootstrap]",
            {label: {k: _interval(v) for k, v in figures.items()} for label, figures in differences.items()},
            [f"{name}_diff" for name in shown], False,
            headers={"CHAIR_s_diff": "CHAIR_s", "CHAIR_i_diff": "CHAIR_i", "CHAIR_i_prior_diff": "prior",
                     "recall_diff": "recall"},
        )  # fmt: skip


if __name__ == "__main__":
    app()

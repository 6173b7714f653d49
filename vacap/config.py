"""Decode settings: one frozen dataclass, validated once, carried everywhere.

The CLI turns a ``ValueError`` raised here into a usage error (exit 2), so the allowed ranges
live in this file only. No torch import: ``vacap --help`` must stay fast.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

from vacap.text import prompt_problem

METHODS = ("vasparse", "greedy", "vcd", "fastv", "vista", "var", "pai")
# Contrastive weight when none is given: VASparse's default, VCD's published alpha = 1, and PAI's
# guidance gamma = 1.1 (alpha = gamma - 1, docs/PAI.md).
METHOD_ALPHA = {"vasparse": 0.1, "vcd": 1.0, "pai": 0.1}
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DIAGNOSTICS = ("none", "summary", "tokens")
DEFAULT_PROMPT = "Please describe this image in detail."


@dataclass(frozen=True)
class DecodeConfig:
    """Everything that decides which tokens a caption gets (see docs/VASPARSE.md)."""

    method: str = "vasparse"
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 128
    # 1. visual-aware token selection
    sparsity: float = 0.5
    lam: float = 1.0
    start_layer: int = 2
    # 2. sink attention penalty
    sink_beta: float = 0.1
    # 3. sparse visual contrastive decoding; None: the method's own weight (METHOD_ALPHA)
    alpha: float | None = None
    apc_beta: float = 0.1
    contrast_layers: int = 0
    mask_rate: float = 0.5
    # 4. KV budget with density-peak aggregation
    kv_budget: float = 1.0
    cluster_ratio: float = 0.1
    knn: int = 5
    # baselines
    vcd_noise_step: int = 500
    fastv_layer: int = 2
    fastv_ratio: float = 0.5
    # var: visual attention redistribution (docs/VAR.md). var_p is the share of a sink's
    # attention kept (the paper's p; 1 is off); var_dims empty: the model's own sink dimensions.
    var_p: float = 0.6
    var_rho: float = 0.5
    var_tau: float = 20.0
    var_image_floor: float = 0.2
    var_start_layer: int = 2
    var_dims: tuple[int, ...] = ()
    seed: int = 0
    # vista (docs/VISTA.md): the visual steering vector's strength, the self-logits augmentation's
    # weight, and its window of layers as fractions of the depth (layers 25-30 of 32)
    vista_lambda: float = 0.17
    vista_gamma: float = 0.3
    vista_window_start: float = 0.78125
    vista_window_end: float = 0.9375
    # pai (docs/PAI.md): image attention amplification from pai_start_layer on; its guidance is
    # alpha (gamma - 1) and apc_beta
    pai_alpha: float = 0.5
    pai_start_layer: int = 2
    # Sampling (vacap/sampling.py): temperature 0 is greedy; the penalty and the n-gram ban also
    # act on greedy. Records state them only away from these defaults (``as_params``).
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    # What the records say about attention: none, summary, or tokens (per token).
    diagnostics: str = "none"
    # Decode steps as one torch.compile'd static-shape step (vacap.decode.static_step). How the
    # tokens are computed, not which: the same arithmetic in another kernel order, so like the
    # batch size it can move a near-tied token only by rounding, and records leave it out.
    compile: bool = False
    # Per-token risk signals beside each caption (vacap/risk_signals.py, Generated.signals), from
    # which each record gets its ``risk`` object. They change no token.
    risk: bool = False

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ValueError("; ".join(problems))

    def resolved(self) -> DecodeConfig:
        """The settings the method really uses: mechanisms a method does not have are off.

        Records store this, so that a `greedy` record does not claim a sparsity it never used.
        A contrastive method takes the user's ``alpha`` and ``apc_beta`` as given; without an
        ``alpha`` it takes its own default (``METHOD_ALPHA``). Greedy (temperature 0) has no top-p.
        """
        alpha = METHOD_ALPHA.get(self.method, 0.0) if self.alpha is None else self.alpha
        top_p = 1.0 if self.temperature == 0 else self.top_p
        own = {
            name: value for method, off in METHOD_OFF.items() if method != self.method for name, value in off.items()
        }
        if self.method == "vasparse":
            return dataclasses.replace(self, alpha=alpha, top_p=top_p, **own)
        off = dict(sparsity=0.0, lam=0.0, sink_beta=0.0, alpha=0.0, contrast_layers=0, kv_budget=1.0, top_p=top_p)
        if self.method in ("vcd", "pai"):
            return dataclasses.replace(self, **{**off, **own, "alpha": alpha})
        return dataclasses.replace(self, **off, **own)

    def check_layers(self, n_layers: int) -> None:
        """Raise ValueError for layer settings the loaded model does not have."""
        c = self.resolved()
        problems = [
            f"{name} must be below the model's {n_layers} decoder layers, got {value}"
            for name, value, used in (
                ("start_layer", c.start_layer, c.method == "vasparse"),
                ("fastv_layer", c.fastv_layer, c.method == "fastv"),
                ("pai_start_layer", c.pai_start_layer, c.pai_alpha > 0),
            )
            if used and value >= n_layers
        ]
        if c.method == "var" and c.var_p < 1 and c.var_start_layer > n_layers - 2:
            # VAR leaves the last layer alone, so it needs a layer from var_start_layer to the one before.
            problems.append(
                f"var_start_layer must be at most {n_layers - 2} (the model's {n_layers} decoder layers but the "
                f"last), got {c.var_start_layer}"
            )
        if c.contrast_layers > n_layers:
            problems.append(f"contrast_layers must be at most the model's {n_layers} decoder layers")
        if problems:
            raise ValueError("; ".join(problems))

    def as_params(self) -> dict:
        """The settings a record states (its ``params``): every field but ``compile``, and the
        sampling fields and ``risk`` only where they are not at their defaults. Records made
        before vacap could sample keep their meaning and their resume key
        (``records.settings_key``): a greedy run finds them done, and a sampled run, whose
        params differ, does not. ``risk`` changes no token but adds the record's ``risk``
        object, so a run with it does not take records without it as done."""
        c = self.resolved()
        params = dataclasses.asdict(c)
        del params["compile"]
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        for name in (*SAMPLING_FIELDS, "risk"):
            if params[name] == defaults[name]:
                del params[name]
        # Knobs of the methods added in issue 26 appear under their own method only, so that the
        # records of every other method keep the params, and the resume keys, they had.
        for method, names in METHOD_KNOBS.items():
            if method != self.method:
                for name in names:
                    del params[name]
        return params

    def unused(self, given: Iterable[str]) -> dict[str, str]:
        """Of the settings ``given`` (by name), those that change no token under these
        settings, each with the condition under which it would act. The command line refuses a
        flag given for nothing, in every command: a silent no-op hides a mistaken command."""
        c = self.resolved()
        vasparse, contrast = c.method == "vasparse", c.alpha > 0
        acts = {
            **{name: vasparse for name in ("sparsity", "sink_beta", "start_layer", "kv_budget")},
            "alpha": c.method in METHOD_ALPHA,
            "apc_beta": c.method in METHOD_ALPHA and contrast,
            "lam": vasparse and (c.sparsity > 0 or c.kv_budget < 1),
            "contrast_layers": vasparse and contrast,
            "mask_rate": vasparse and contrast and c.contrast_layers > 0,
            "top_p": c.temperature > 0,
            "vista_lambda": c.method == "vista",
            "vista_gamma": c.method == "vista",
            "vista_window_start": c.method == "vista" and c.vista_gamma > 0,
            "vista_window_end": c.method == "vista" and c.vista_gamma > 0,
            "pai_alpha": c.method == "pai",
            "pai_start_layer": c.method == "pai" and c.pai_alpha > 0,
            "seed": c.temperature > 0 or c.method == "vcd" or c.risk or (vasparse and contrast and c.contrast_layers > 0),
            "var_p": c.method == "var",
            **{name: c.method == "var" and c.var_p < 1 for name in METHOD_KNOBS["var"] if name != "var_p"},
        }
        return {name: _WHEN_USED[name] for name in given if not acts.get(name, True)}


SAMPLING_FIELDS = ("temperature", "top_p", "repetition_penalty", "no_repeat_ngram")
# Each method's own knobs, where records state them only for that method (``as_params``).
METHOD_KNOBS = {
    "vista": ("vista_lambda", "vista_gamma", "vista_window_start", "vista_window_end"),
    "var": ("var_p", "var_rho", "var_tau", "var_image_floor", "var_start_layer", "var_dims"),
    "pai": ("pai_alpha", "pai_start_layer"),
}
# Each such method's mechanisms off, for the other methods' resolved settings: VAR's sinks keep
# all their attention, VISTA neither steers nor mixes logits, PAI amplifies nothing.
METHOD_OFF = {"vista": dict(vista_lambda=0.0, vista_gamma=0.0), "var": dict(var_p=1.0), "pai": dict(pai_alpha=0.0)}
# Where a setting that only some settings use acts (DecodeConfig.unused).
_WHEN_USED = {
    **{name: "--method vasparse" for name in ("sparsity", "sink_beta", "start_layer", "kv_budget")},
    "alpha": "--method vasparse, vcd or pai",
    "apc_beta": "--method vasparse, vcd or pai with an --alpha above 0",
    "lam": "--method vasparse with a --sparsity above 0 or a --kv-budget below 1",
    "contrast_layers": "--method vasparse with an --alpha above 0",
    "mask_rate": "--method vasparse with --contrast-layers and --alpha above 0",
    "pai_alpha": "--method pai",
    "pai_start_layer": "--method pai with a --pai-alpha above 0",
    "top_p": "a --temperature above 0",
    "vista_lambda": "--method vista",
    "vista_gamma": "--method vista",
    "vista_window_start": "--method vista with a --vista-gamma above 0",
    "vista_window_end": "--method vista with a --vista-gamma above 0",
    "seed": "something drawn at random: a --temperature above 0, --method vcd, --risk, or vasparse's "
    "contrast branch (--contrast-layers and --alpha above 0)",
    "var_p": "--method var",
    **{name: "--method var with a --var-p below 1" for name in METHOD_KNOBS["var"] if name != "var_p"},
}


def flag(name: str) -> str:
    """A setting's command-line flag: sink_beta -> --sink-beta."""
    return "--" + name.replace("_", "-")


def unused_message(unused: dict[str, str], method: str) -> str:
    """One usage error for the flags ``DecodeConfig.unused`` found."""
    listed = ", ".join(f"{flag(name)} (acts only with {when})" for name, when in unused.items())
    them = "it" if len(unused) == 1 else "them"
    return f"given but changing nothing with --method {method}: {listed}; leave {them} out"


@dataclass(frozen=True)
class OutputConfig:
    """How a decoded caption is shaped before it is written anywhere (vacap.text.finish_caption).

    Apart from DecodeConfig because it never changes a token; it still changes the caption, so
    records state it in ``params`` and resume tells it apart."""

    prefix: str = ""
    suffix: str = ""
    clean: bool = False  # strip chat boilerplate ("ASSISTANT:", "<s>", quotes around the caption)
    trim_incomplete: bool = False  # drop a last sentence cut off by max_new_tokens

    def as_params(self) -> dict:
        """The shaping in use, for ``params``: settings left at their default are left out, so
        a plain run's records (and their resume) are what they were before these settings."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value}


def _in_unit(name: str, value: float, *, closed_high: bool = False, open_low: bool = False) -> str | None:
    if not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value <= 1 if closed_high else value < 1
    if low_ok and high_ok:
        return None
    low = "(0" if open_low else "[0"
    high = "1]" if closed_high else "1)"
    return f"{name} must be in {low}, {high}, got {value!r}"


def _problems(c: DecodeConfig):
    if c.method not in METHODS:
        yield f"method must be one of {', '.join(METHODS)}, got {c.method!r}"
    if c.diagnostics not in DIAGNOSTICS:
        yield f"diagnostics must be one of {', '.join(DIAGNOSTICS)}, got {c.diagnostics!r}"
    if c.compile and c.diagnostics != "none":
        yield "compile needs diagnostics none: the static step computes no attention probabilities to report"
    if not c.prompt.strip():
        yield "prompt must not be empty"
    elif problem := prompt_problem(c.prompt):
        yield problem
    if c.max_new_tokens < 1:
        yield f"max_new_tokens must be at least 1, got {c.max_new_tokens}"
    yield from filter(
        None,
        (
            _in_unit("sparsity", c.sparsity),
            _in_unit("mask_rate", c.mask_rate, closed_high=True),
            _in_unit("apc_beta", c.apc_beta, closed_high=True),
            _in_unit("kv_budget", c.kv_budget, closed_high=True, open_low=True),
            _in_unit("cluster_ratio", c.cluster_ratio, closed_high=True),
            _in_unit("fastv_ratio", c.fastv_ratio),
            _in_unit("vista_gamma", c.vista_gamma, closed_high=True),
            _in_unit("vista_window_start", c.vista_window_start, closed_high=True, open_low=True),
            _in_unit("vista_window_end", c.vista_window_end, closed_high=True, open_low=True),
        ),
    )
    for name in ("lam", "alpha", "sink_beta", "vista_lambda", "pai_alpha"):
        value = getattr(c, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            yield f"{name} must be a finite number >= 0, got {value!r}"
    for name in ("start_layer", "contrast_layers", "pai_start_layer"):
        if getattr(c, name) < 0:
            yield f"{name} must be >= 0, got {getattr(c, name)}"
    if c.vista_window_start > c.vista_window_end:
        yield (
            f"vista_window_start must be at most vista_window_end, got {c.vista_window_start!r} > "
            f"{c.vista_window_end!r}"
        )
    if c.fastv_layer < 1:
        yield f"fastv_layer must be >= 1, got {c.fastv_layer}"
    if c.kv_budget < 1 and c.contrast_layers > c.start_layer:
        # The contrast branch hides image slots by their prompt position, which compaction
        # (from start_layer on) no longer preserves.
        yield "with kv_budget < 1, contrast_layers must be <= start_layer"
    if not (math.isfinite(c.temperature) and c.temperature >= 0):
        yield f"temperature must be a finite number >= 0 (0 is greedy), got {c.temperature!r}"
    if not (math.isfinite(c.top_p) and 0 < c.top_p <= 1):
        yield f"top_p must be in (0, 1] (1 keeps every token), got {c.top_p!r}"
    if not (math.isfinite(c.repetition_penalty) and c.repetition_penalty > 0):
        yield (
            "repetition_penalty must be a finite number > 0 (1 is off, above 1 discourages repeats), "
            f"got {c.repetition_penalty!r}"
        )
    if c.no_repeat_ngram < 0:
        yield f"no_repeat_ngram must be >= 0 (0 is off), got {c.no_repeat_ngram}"
    if c.knn < 1:
        yield f"knn must be at least 1, got {c.knn}"
    if not 1 <= c.vcd_noise_step <= 999:
        yield f"vcd_noise_step must be in [1, 999], got {c.vcd_noise_step}"
    yield from _var_problems(c)


def _var_problems(c: DecodeConfig):
    yield from filter(
        None,
        (
            _in_unit("var_p", c.var_p, closed_high=True),
            _in_unit("var_rho", c.var_rho, closed_high=True),
            _in_unit("var_image_floor", c.var_image_floor, closed_high=True),
        ),
    )
    if not (math.isfinite(c.var_tau) and c.var_tau > 0):
        yield f"var_tau must be a finite number > 0 (a sink's RMS-normalised activation), got {c.var_tau!r}"
    if c.var_start_layer < 1:
        # Layer l's sinks are read from layer l - 1's output (docs/VAR.md).
        yield f"var_start_layer must be >= 1, got {c.var_start_layer}"
    if not isinstance(c.var_dims, tuple) or not all(isinstance(d, int) and d >= 0 for d in c.var_dims):
        yield f"var_dims must be a tuple of hidden dimensions (whole numbers >= 0), got {c.var_dims!r}"
    elif len(set(c.var_dims)) != len(c.var_dims):
        yield f"var_dims must not repeat a dimension, got {c.var_dims!r}"

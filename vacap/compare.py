"""Several decoding settings on the same images: the grid of settings and its summary table."""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from rich.table import Table

from vacap.config import METHODS, DecodeConfig
from vacap.evaluate.report import compact_table

# VASparse with one mechanism at a time (the others off), for ablations.
MECHANISMS_ALONE = {
    "vasparse selection only": dict(method="vasparse", alpha=0.0, sink_beta=0.0),
    "vasparse sink only": dict(method="vasparse", sparsity=0.0, alpha=0.0),
    "vasparse contrast only": dict(method="vasparse", sparsity=0.0, sink_beta=0.0),
}


def parse_list(text: str, kind: type, name: str) -> list:
    """'a,b,c' -> [kind(a), ...]; ValueError naming the flag on a bad item."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{name} needs at least one value")
    try:
        return [kind(item) for item in items]
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc


# Settings a sweep may vary, with the flag that sets each (sweep labels use the flag's name).
SWEEP_FLAGS = {
    "sparsity": "--sparsity",
    "alpha": "--alpha",
    "lam": "--lam",
    "sink_beta": "--sink-beta",
    "kv_budget": "--kv-budget",
    "contrast_layers": "--contrast-layers",
    "mask_rate": "--mask-rate",
    "vista_lambda": "--vista-lambda",
    "vista_gamma": "--vista-gamma",
    "var_p": "--var-p",
    "var_rho": "--var-rho",
    "var_tau": "--var-tau",
    "pai_alpha": "--pai-alpha",
}
# Settings that compare and eval shapes take once, for every run they act in.
FIXED_FLAGS = {"var_dims": "--var-dims"}
# A layer count is a whole number; every other swept setting is a float.
_SWEEP_KINDS = {"contrast_layers": int}


def parse_sweeps(**texts: str | None) -> dict[str, list[float]]:
    """Comma-separated flag values -> {setting: values}, for the settings given (SWEEP_FLAGS)."""
    return {
        name: parse_list(text, _SWEEP_KINDS.get(name, float), SWEEP_FLAGS[name]) for name, text in texts.items() if text
    }


def settings_grid(
    methods: Sequence[str],
    sweeps: Mapping[str, Sequence[float]] | None = None,
    ablation: bool = False,
    fixed: Mapping[str, object] | None = None,
) -> dict[str, dict]:
    """Label -> settings: each method once per combination of the swept values that act in it
    (``sweeps``: setting -> values, e.g. {"sparsity": [0.3, 0.7], "alpha": [0.1, 1]}), plus
    VASparse's ablations. ``fixed`` settings (``FIXED_FLAGS``, e.g. {"var_dims": (3, 5)}) join
    every run they act in, without a label of their own.

    A swept setting applies to the methods it acts in (``DecodeConfig.unused``): ``--alpha`` to
    vasparse and vcd, ``--sparsity`` to vasparse only; a method in which none acts runs once.
    A sweep or ablation that acts in none of ``methods`` is a ValueError naming the flags,
    rather than settings silently not run.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    sweeps = {name: values for name, values in (sweeps or {}).items() if values}
    combinations = [dict(zip(sweeps, values)) for values in itertools.product(*sweeps.values())]
    grid: dict[str, dict] = {}
    acted: set[str] = set()
    when: dict[str, str] = {}  # where each swept setting acts, for the error below
    for method in methods:
        for combination in combinations:
            idle = DecodeConfig(method=method, **combination).unused(combination)
            acting = {name: value for name, value in combination.items() if name not in idle}
            when.update(idle)
            acted |= acting.keys()
            label = " ".join([method, *(f"{SWEEP_FLAGS[name][2:]}={value:g}" for name, value in acting.items())])
            grid[label] = dict(method=method, **acting)
    fixed = {name: value for name, value in (fixed or {}).items() if value}
    for settings in grid.values():
        idle = DecodeConfig(**settings, **fixed).unused(fixed)
        when.update(idle)
        settings.update({name: value for name, value in fixed.items() if name not in idle})
        acted |= fixed.keys() - idle.keys()
    flags = {**SWEEP_FLAGS, **FIXED_FLAGS}
    idle_flags = {flags[name]: when[name] for name in [*sweeps, *fixed] if name not in acted}
    if ablation and "vasparse" not in methods:
        idle_flags["--ablation"] = "--method vasparse"
    if idle_flags:
        listed = ", ".join(f"{flag} (acts only with {when})" for flag, when in idle_flags.items())
        them = "it" if len(idle_flags) == 1 else "them"
        raise ValueError(
            f"{listed}: no run among --methods ({', '.join(methods)}) uses {them}; "
            f"add such a method to --methods or leave {them} out"
        )
    if ablation:
        grid.update(MECHANISMS_ALONE)
    return grid


def summary_table(records: Iterable[dict], labels: Sequence[str]) -> Table:
    """Caption length, speed and image attention per setting, and how often captions differ
    from the first setting's (records carry their setting's label in ``setting``)."""
    by_label: dict[str, dict[str, dict]] = defaultdict(dict)
    for record in records:
        by_label[record["setting"]][record["path"]] = record
    first = by_label.get(labels[0], {})
    table = compact_table(f"vacap compare (differs: caption unlike {labels[0]}'s)", labels)
    for column in ("ok", "tokens", "tok/s", "image attn", "differs"):
        table.add_column(column, justify="right", no_wrap=True)
    for label in labels:
        ok = [r for r in by_label.get(label, {}).values() if r["status"] == "ok"]
        tokens = sum(r["tokens"] for r in ok)
        seconds = sum(r["seconds"] for r in ok)
        shares = [r["diagnostics"]["image_attention"] for r in ok if r.get("diagnostics")]
        shares = [s for s in shares if s is not None]
        differ = sum(1 for r in ok if r["path"] in first and first[r["path"]].get("caption") != r["caption"])
        table.add_row(
            label,
            str(len(ok)),
            f"{tokens / len(ok):.1f}" if ok else "-",
            f"{tokens / seconds:.1f}" if seconds else "-",
            f"{statistics.mean(shares):.3f}" if shares else "-",
            f"{differ}/{len(ok)}" if label != labels[0] else "-",
        )
    return table

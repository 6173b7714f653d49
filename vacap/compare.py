"""Several decoding settings on the same images: the grid of settings and its summary table."""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from typing import Iterable, Sequence

from rich.table import Table

from vacap.config import METHODS
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


def settings_grid(
    methods: Sequence[str],
    sparsities: Sequence[float] | None = None,
    alphas: Sequence[float] | None = None,
    ablation: bool = False,
) -> dict[str, dict]:
    """Label -> settings: every method once, VASparse once per (sparsity, alpha) pair given,
    plus the ablations.

    Sweeps and ablations are variants of VASparse, so they need ``vasparse`` among ``methods``:
    a ValueError naming the flags otherwise, rather than settings silently not run.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if "vasparse" not in methods:
        flags = (("--sparsity", sparsities), ("--alpha", alphas), ("--ablation", ablation))
        given = [flag for flag, value in flags if value]
        if given:
            raise ValueError(
                f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} VASparse runs, but vasparse is not "
                f"among --methods ({', '.join(methods)}); add it to --methods or leave {' and '.join(given)} out"
            )
    sweeps = [("sparsity", values) for values in [sparsities] if values] + [("alpha", a) for a in [alphas] if a]
    grid: dict[str, dict] = {}
    for method in methods:
        if method != "vasparse" or not sweeps:
            grid[method] = dict(method=method)
            continue
        for combination in itertools.product(*(values for _, values in sweeps)):
            settings = dict(zip((name for name, _ in sweeps), combination))
            label = " ".join(f"{name}={value:g}" for name, value in settings.items())
            grid[f"vasparse {label}"] = dict(method="vasparse", **settings)
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

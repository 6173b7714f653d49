"""Metric tables for the `vacap eval` commands (rich on a terminal, Markdown for files)."""

from __future__ import annotations

from typing import Mapping, Sequence

from rich import box
from rich.table import Table


def _cell(value, spec: str = ".4f") -> str:
    if isinstance(value, float):
        return format(value, spec)
    return "-" if value is None else str(value)


def compact_table(title: str, labels: Sequence[str]) -> Table:
    """A table whose first column, ``setting``, always shows its labels whole.

    Sweep labels differ only at their end ("vasparse sparsity=0.3 alpha=0.1"), so a cut label
    makes rows impossible to tell apart; borders are left out to leave room for them in 80
    columns, and the numbers get what is left.
    """
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("setting", no_wrap=True, min_width=max(map(len, labels), default=0))
    return table


def metrics_table(
    title: str,
    rows: Mapping[str, Mapping],
    columns: Sequence[str],
    headers: Mapping[str, str] | None = None,
    formats: Mapping[str, str] | None = None,
) -> Table:
    """One row per label (method or setting), one column per metric.

    ``headers`` gives a column a shorter heading than its metric's name, ``formats`` a float
    format other than 4 decimals (format specs such as ".1f").
    """
    headers, formats = headers or {}, formats or {}
    table = compact_table(title, list(rows))
    for column in columns:
        table.add_column(headers.get(column, column), justify="right", no_wrap=True)
    for label, metrics in rows.items():
        table.add_row(label, *(_cell(metrics.get(column), formats.get(column, ".4f")) for column in columns))
    return table


def markdown_table(rows: Mapping[str, Mapping], columns: Sequence[str]) -> str:
    lines = ["| setting | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, metrics in rows.items():
        lines.append(f"| {label} | " + " | ".join(_cell(metrics.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def print_report(title: str, rows: Mapping[str, Mapping], columns: Sequence[str], as_json: bool,
                 extra: Mapping | None = None, **table) -> None:
    """Results are a command's data: stdout, as a table or JSON (``table``: headers, formats)."""
    import json

    from rich.console import Console

    if as_json:
        print(json.dumps({**(extra or {}), "results": rows}, indent=2))
    else:
        Console().print(metrics_table(title, rows, columns, **table))


def interval_text(figure: Sequence[float]) -> str:
    """(difference, low, high) as fractions -> '+1.2 [-0.3, +2.6]' in percentage points."""
    difference, low, high = (100 * value for value in figure)
    return f"{difference:+.1f} [{low:+.1f}, {high:+.1f}]"

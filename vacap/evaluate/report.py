"""Metric tables for the `vacap eval` commands (rich on a terminal, Markdown for files)."""

from __future__ import annotations

from typing import Mapping, Sequence

from rich.table import Table


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def metrics_table(title: str, rows: Mapping[str, Mapping], columns: Sequence[str]) -> Table:
    """One row per label (method or setting), one column per metric."""
    table = Table(title=title)
    table.add_column("setting")
    for column in columns:
        table.add_column(column, justify="right")
    for label, metrics in rows.items():
        table.add_row(label, *(_cell(metrics.get(column)) for column in columns))
    return table


def markdown_table(rows: Mapping[str, Mapping], columns: Sequence[str]) -> str:
    lines = ["| setting | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, metrics in rows.items():
        lines.append(f"| {label} | " + " | ".join(_cell(metrics.get(c)) for c in columns) + " |")
    return "\n".join(lines)

"""Markdown tables and the numbers in them, written one way for every report, study and
benchmark the CLI writes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_RULE = {"l": "---", "r": "--:"}


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], align: str = ""
) -> list[str]:
    """The lines of a markdown table: ``header``, its rule, then ``rows``. ``align`` holds one
    letter per column, ``l`` (the default, unmarked) or ``r`` (right-aligned, for numbers);
    missing letters count as ``l``. An empty cell is written as a single space."""
    if set(align) - set(_RULE):
        raise ValueError(f"align takes the letters l and r; got {align!r}")
    rule = "|" + "".join(_RULE[a] + "|" for a in align.ljust(len(header), "l"))
    return [_line(header), rule, *(_line(row) for row in rows)]


def _line(cells: Sequence[str]) -> str:
    return "|" + "".join(f" {c} |" if c else " |" for c in cells)


def si(x: float) -> str:
    """``x`` with an SI prefix and 3 significant digits: ``1.23 G``."""
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``1 epoch``, ``10 epochs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` as a CSV shows it: floats to 12 significant digits, so that float noise
    (``0.19999999999999996`` for 1 - 0.8) reads as the number meant; the run's own files keep
    the exact values."""
    return {k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in row.items()}


def percent(x: float | None) -> str:
    """A fraction as a percentage with two decimals; None as a dash."""
    return "—" if x is None else f"{100 * x:.2f}%"

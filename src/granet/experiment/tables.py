"""Markdown tables, built one way for every report, study and benchmark the CLI writes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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

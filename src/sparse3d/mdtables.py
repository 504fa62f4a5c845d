"""Markdown tables as cells (layer 0): the results files of ``experiments/`` read back."""

from __future__ import annotations

import re


def md_tables(text: str) -> list[list[list[str]]]:
    """The markdown tables of ``text``: rows of cells, header first, separator rows dropped."""
    tables: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows)
            rows = []
    return tables

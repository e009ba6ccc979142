"""Plain-text tables for the command line: columns as wide as their widest cell."""

from __future__ import annotations


def text_table(header: list[str], rows: list[list[object]], right: set[int] = frozenset()) -> str:
    """`rows` under `header`, two spaces between columns; the columns numbered in `right` are aligned right."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[index]) for row in cells) for index in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(cell.rjust(width) if index in right else cell.ljust(width)
                         for index, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()

    return "\n".join(line(row) for row in cells)

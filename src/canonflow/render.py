"""Tables for people: one rendering path for every table the CLI and the benchmark print.

- A cell shows its value as it is: tenant ids, subjects and error texts such as ``[urgent]``,
  ``[/]`` or ``:x:`` are never read as rich markup or emoji codes (every title, caption and
  cell becomes a :class:`rich.text.Text`).
- Id columns (job ids) and number columns never shrink below their widest value: a job id
  stays whole, to be copied into ``canonflow status JOB_ID``, and a long tenant id cannot
  blank the numbers. Text columns (tenants, table labels, values) fold onto more lines
  instead of being cut with an ellipsis, but never below their header's width; the first
  column is the row's label and keeps at least :data:`LABEL_WIDTH` cells.
- When the columns cannot fit the terminal that way, or folding makes the rows taller than
  one block per row would be, the rows are stacked: each row's label on its own line, then
  its ``header: value`` pairs. Nothing is cropped at the terminal's edge.
- Lines break at spaces and after ``=`` and ``/``, so in ``tenant=job-…`` or
  ``tenant/crm.contacts`` the job id and the table name stay whole on one line.
- Output that is not a terminal (a pipe, a CI log) is never cut to a guessed width: the
  console is as wide as the widest table needs.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TextIO

from rich.cells import cell_len, chop_cells
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

PIPE_WIDTH = 100_000  # "unlimited": a table takes only the width it measures
LABEL_WIDTH = 16  # a folded row label keeps this much: "acme/" then "crm.contacts"
INDENT = "  "  # a stacked row's pairs sit under its label
GAP = "  "  # between two pairs on one stacked line

ColumnKind = Literal["id", "number", "text"]
KINDS: tuple[ColumnKind, ...] = ("id", "number", "text")

# the pieces a line may break between: runs of spaces, and words that end after "=" or "/"
_PIECES = re.compile(r"\s+|[^\s=/]*[=/]|[^\s=/]+")


def console(stderr: bool = False, file: TextIO | None = None) -> Console:
    """A console that never interprets markup or emoji in what it prints: on a terminal as
    wide as the terminal, elsewhere wide enough for any table."""
    stream = file or (sys.stderr if stderr else sys.stdout)
    width = None if stream.isatty() else PIPE_WIDTH
    return Console(file=file, stderr=stderr, width=width, markup=False, emoji=False,
                   highlight=False)


def literal(value: object) -> Text:
    """A cell, title or caption exactly as given (None: empty)."""
    return Text("" if value is None else str(value))


def _widest_line(text: str) -> int:
    """A value's width as printed: a value with line breaks is as wide as its widest line."""
    return max(cell_len(line) for line in text.split("\n"))


def _longest_piece(text: str) -> int:
    """The widest piece no line break can split (see :func:`fold`)."""
    return max((cell_len(p) for p in _PIECES.findall(text) if not p.isspace()), default=0)


def fold(text: str, width: int) -> list[str]:
    """``text`` as lines of at most ``width`` cells, broken at spaces and after ``=`` or
    ``/`` so that ids and table names stay whole; only a piece wider than a whole line is
    cut, at the width (folded, never dropped). A line that fits is kept exactly as is."""
    width = max(width, 1)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        if cell_len(paragraph) <= width:
            lines.append(paragraph)
            continue
        line, space, started = "", "", False
        for piece in _PIECES.findall(paragraph):
            if piece.isspace():
                if started:
                    space = piece  # between two words on one line; dropped at a break
                else:
                    line = piece  # a value's leading spaces are part of it
                continue
            if cell_len(line) + cell_len(space) + cell_len(piece) <= width:
                line += space + piece
            else:
                if line.strip():
                    lines.append(line)
                line = piece
                while cell_len(line) > width:
                    head, *rest = chop_cells(line, width)
                    lines.append(head)
                    line = "".join(rest)
            space, started = "", True
        lines += chop_cells(line, width) or [""]  # (only blanks can still be too wide)
    return lines


@dataclass(frozen=True)
class Column:
    """A column with the two widths the layout weighs: what its widest value needs, and
    how far folding may narrow it before the rows are better stacked."""

    header: str
    kind: ColumnKind
    natural: int  # the widest of the header and the values: no fold needed
    least: int  # what folding leaves it: a text column never gets narrower


class FittedTable:
    """A table that fits the width it is printed in: as a bordered table when its columns
    fit (text columns folded if need be), else as stacked rows. Decided at print time,
    since only then the width is known (a terminal's, or :data:`PIPE_WIDTH` in a pipe)."""

    def __init__(self, title: str | None, caption: str | None,
                 columns: Sequence[tuple[str, ColumnKind]], rows: Sequence[Sequence[str]],
                 sections: Iterable[int]) -> None:
        self.title, self.caption = title or "", caption or ""
        self.rows = [list(r) + [""] * (len(columns) - len(r)) for r in rows]
        self.sections = frozenset(sections)
        self.columns: list[Column] = []
        for i, (header, kind) in enumerate(columns):
            natural = max([cell_len(header), *(_widest_line(r[i]) for r in self.rows)])
            if kind != "text":
                least = natural
            elif i == 0:  # the row's label: readable, not a sliver
                least = min(natural, max(LABEL_WIDTH, cell_len(header)))
            else:
                least = cell_len(header)
            self.columns.append(Column(header, kind, natural, least))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        widths = self._widths(width)
        folded = widths != [c.natural for c in self.columns]
        stacked = self._stacked(width) if folded else []
        if widths is None or (folded and self._table_height(widths) > len(stacked)):
            yield from self._annotation(self.title, "table.title", width, None)
            yield from stacked
            yield from self._annotation(self.caption, "table.caption", width, None)
            yield Text()  # the blocks have no bottom border: a blank line ends them
            return
        table_width = sum(widths) + 3 * len(widths) + 1  # padding 1 + 1, a border each
        yield from self._annotation(self.title, "table.title", width, table_width)
        yield self._table(widths)
        yield from self._annotation(self.caption, "table.caption", width, table_width)

    def _widths(self, width: int) -> list[int] | None:
        """Each column's width in a table ``width`` wide; None when it cannot fit. The
        widest text columns fold first, so narrow ones (a status, a date) stay whole."""
        room = width - 3 * len(self.columns) - 1
        if sum(c.least for c in self.columns) > room:
            return None
        if sum(c.natural for c in self.columns) <= room:
            return [c.natural for c in self.columns]

        def under(cap: int) -> list[int]:
            return [min(c.natural, max(c.least, cap)) for c in self.columns]

        low, high = 0, max(c.natural for c in self.columns)
        while low < high:  # the widest cap that fits
            mid = (low + high + 1) // 2
            if sum(under(mid)) <= room:
                low = mid
            else:
                high = mid - 1
        widths = under(low)
        spare = room - sum(widths)
        for i, c in enumerate(self.columns):  # fewer than one cell each: hand them out
            if spare and widths[i] < c.natural:
                widths[i] += 1
                spare -= 1
        return widths

    def _cell(self, value: str, column: Column, width: int) -> str:
        """A cell folded here rather than by rich, which breaks only at spaces: this way a
        label breaks after its tenant's ``/`` and keeps the table name whole."""
        return "\n".join(fold(value, width)) if column.kind == "text" else value

    def _table_height(self, widths: list[int]) -> int:
        """The lines the table's rows take (borders aside): folding makes them taller."""
        return sum(max(len(self._cell(v, c, w).split("\n"))
                       for v, c, w in zip(row, self.columns, widths, strict=True))
                   for row in self.rows) + len(self.sections)

    def _table(self, widths: list[int]) -> Table:
        table = Table()
        for column, width in zip(self.columns, widths, strict=True):
            table.add_column(literal(column.header), width=width,
                             no_wrap=column.kind != "text", overflow="fold",
                             justify="right" if column.kind == "number" else "left")
        for i, row in enumerate(self.rows):
            table.add_row(*(literal(self._cell(v, c, w))
                            for v, c, w in zip(row, self.columns, widths, strict=True)),
                          end_section=i in self.sections)
        return table

    def _stacked(self, width: int) -> list[Text]:
        """One block per row: its label (the first column) on its own lines, then the
        other columns as ``header: value`` pairs, as many to a line as fit. Empty values
        are left out."""
        lines: list[Text] = []
        room = max(width - cell_len(INDENT), 1)
        for i, (label, *values) in enumerate(self.rows):
            lines += [Text(part, style="bold") for part in fold(label, width)]
            line = ""
            for column, value in zip(self.columns[1:], values, strict=True):
                if not value:
                    continue
                pair = f"{column.header}: {value}"
                if line and cell_len(line) + cell_len(GAP) + cell_len(pair) <= room:
                    line += GAP + pair
                    continue
                if line:
                    lines.append(Text(INDENT + line))
                line = pair
                if cell_len(pair) > room or "\n" in pair:  # a pair of its own, folded
                    lines += [Text(INDENT + part) for part in fold(pair, room)]
                    line = ""
            if line:
                lines.append(Text(INDENT + line))
            if i in self.sections:
                widest = max(shown.cell_len for shown in lines)
                lines.append(Text("\u2500" * min(width, widest), style="dim"))
        return lines

    @staticmethod
    def _annotation(text: str, style: str, width: int, centre_in: int | None) -> list[Text]:
        """A title or caption folded, not cut: as wide as the table (centred under it)
        where that keeps ids whole, else as wide as the output allows."""
        if not text:
            return []
        wrap = width if centre_in is None else min(width, max(centre_in, _longest_piece(text)))
        lines = [Text(line, style=style) for line in fold(text, wrap)]
        if centre_in is not None:
            for line in lines:
                if line.cell_len < centre_in:
                    line.align("center", centre_in)
        return lines


class View:
    """Build a table column by column, then row by row; ``render`` returns it ready to print
    (a :class:`FittedTable`).

    Column kinds: ``id`` (one line, never narrower than its widest value), ``number`` (the
    same, right-aligned) and ``text`` (folds: whole values, never an ellipsis). The first
    column is the row's label: in the stacked layout it heads the row's block."""

    def __init__(self, title: str | None = None, caption: str | None = None) -> None:
        self.title = title
        self.caption = caption
        self._columns: list[tuple[str, ColumnKind]] = []
        self._rows: list[list[str]] = []
        self._sections: set[int] = set()

    def column(self, header: str, kind: ColumnKind = "text") -> View:
        if kind not in KINDS:
            raise ValueError(f"unknown column kind {kind!r}")
        self._columns.append((header, kind))
        return self

    def columns(self, headers: Iterable[str], kind: ColumnKind = "text") -> View:
        for header in headers:
            self.column(header, kind)
        return self

    def row(self, *values: object) -> View:
        """A row of values (as ``str`` shows them); missing trailing values are empty."""
        if len(values) > len(self._columns):
            raise ValueError(f"{len(values)} values for {len(self._columns)} columns")
        self._rows.append([literal(v).plain for v in values])
        return self

    def section(self) -> View:
        """A line under the rows added so far."""
        self._sections.add(len(self._rows) - 1)
        return self

    def render(self) -> FittedTable:
        return FittedTable(self.title, self.caption, self._columns, self._rows,
                           self._sections)


def rows_view(headers: Sequence[str], rows: Iterable[Sequence[object]],
              title: str | None = None) -> FittedTable:
    """A table of text columns (query results, listings)."""
    view = View(title).columns(headers)
    for r in rows:
        view.row(*r)
    return view.render()

"""Tables for people: one rendering path for every table the CLI and the benchmark print.

- A cell shows its value as it is: tenant ids, subjects and error texts such as ``[urgent]``,
  ``[/]`` or ``:x:`` are never read as rich markup or emoji codes (every title, caption and
  cell becomes a :class:`rich.text.Text`).
- Id columns (job ids) and number columns never shrink below their widest value: a job id
  stays whole, to be copied into ``canonflow status JOB_ID``, and a long tenant id cannot
  blank the numbers. Text columns (tenants, table labels, values) fold onto more lines
  instead of being cut with an ellipsis.
- Output that is not a terminal (a pipe, a CI log) is never cut to a guessed width: the
  console is as wide as the widest table needs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

PIPE_WIDTH = 100_000  # "unlimited": a table takes only the width it measures


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


class View:
    """Build a table column by column, then row by row; ``render`` returns the rich table.

    Column kinds: ``id`` (one line, never narrower than its widest value), ``number`` (the
    same, right-aligned) and ``text`` (folds: whole values, never an ellipsis)."""

    def __init__(self, title: str | None = None, caption: str | None = None) -> None:
        self.title = title
        self.caption = caption
        self._columns: list[tuple[str, str]] = []
        self._rows: list[list[Text]] = []
        self._sections: set[int] = set()

    def column(self, header: str, kind: str = "text") -> View:
        if kind not in ("id", "number", "text"):
            raise ValueError(f"unknown column kind {kind!r}")
        self._columns.append((header, kind))
        return self

    def columns(self, headers: Iterable[str], kind: str = "text") -> View:
        for header in headers:
            self.column(header, kind)
        return self

    def row(self, *values: object) -> View:
        self._rows.append([literal(v) for v in values])
        return self

    def section(self) -> View:
        """A line under the rows added so far."""
        self._sections.add(len(self._rows) - 1)
        return self

    def render(self) -> Table:
        table = Table(title=None if self.title is None else literal(self.title),
                      caption=None if self.caption is None else literal(self.caption))
        for i, (header, kind) in enumerate(self._columns):
            widest = max([len(header), *(r[i].cell_len for r in self._rows if i < len(r))])
            if kind in ("id", "number"):
                table.add_column(literal(header), no_wrap=True, min_width=widest,
                                 justify="right" if kind == "number" else "left")
            else:
                table.add_column(literal(header), overflow="fold")
        for i, cells in enumerate(self._rows):
            table.add_row(*cells, end_section=i in self._sections)
        return table


def rows_view(headers: Sequence[str], rows: Iterable[Sequence[object]],
              title: str | None = None) -> Table:
    """A table of text columns (query results, listings)."""
    view = View(title).columns(headers)
    for r in rows:
        view.row(*r)
    return view.render()

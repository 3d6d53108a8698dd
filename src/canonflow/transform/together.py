"""Map several small raw files in one pass, and hand each file its own part of the result.

A mapping costs about 175 Arrow kernel calls whatever the number of rows (1.5 ms for a file
of 100 records, 3.5 ms for 5,000): a group commit of 16 small tenants' requests paid them
16 times. The files of a group (one source table, one mapping) are concatenated, mapped
once, and the result is cut back into per-file parts whose row numbers are the file's own,
exactly what mapping each file alone returns; each request then accounts, quarantines and
writes its files as before.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import pairwise

import pyarrow as pa
import pyarrow.compute as pc

from canonflow.transform.mapping import (
    ChildMapped,
    CompiledMapping,
    Mapped,
    StructColumns,
)
from canonflow.transform.reader import RawFile

FileMapping = tuple[Mapped, list[ChildMapped]]  # a file's rows, and its children's


def map_together(mapping: CompiledMapping, files: list[RawFile]) -> list[FileMapping | None]:
    """Each file's mapping (and its child rows), from one pass over the files whose columns
    agree in type (a column all null in one file, or absent, agrees with any); None for a
    file left to be mapped alone (the fast reader could not type it, or no other file's
    columns agree with its: a value that is text in one file may be a timestamp in the
    next, and the two would map differently)."""
    out: list[FileMapping | None] = [None] * len(files)
    groups: list[tuple[dict[str, pa.DataType], list[int]]] = []
    for n, f in enumerate(files):
        if not isinstance(f.columns, StructColumns) or f.broken:
            continue
        types = {field.name: field.type for field in f.columns.table.schema}
        for merged, members in groups:
            if _agree(merged, types):
                merged.update({k: t for k, t in types.items() if not pa.types.is_null(t)})
                members.append(n)
                break
        else:
            groups.append((dict(types), [n]))
    for _, members in groups:
        if len(members) < 2:
            continue
        try:
            parts = _one_pass(mapping, [files[n] for n in members])
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            continue  # Arrow could not unify them after all: each alone
        for n, part in zip(members, parts, strict=True):
            out[n] = part
    return out


def _agree(a: dict[str, pa.DataType], b: dict[str, pa.DataType]) -> bool:
    """Columns of the same name have the same type, or one of them is all null."""
    return all(a[k] == t or pa.types.is_null(a[k]) or pa.types.is_null(t)
               for k, t in b.items() if k in a)


def _one_pass(mapping: CompiledMapping, files: list[RawFile]) -> list[FileMapping]:
    tables = [f.columns.table for f in files if isinstance(f.columns, StructColumns)]
    starts = [0]
    for t in tables:
        starts.append(starts[-1] + t.num_rows)

    def line(row: int) -> bytes:
        at = bisect_right(starts, row) - 1
        return files[at].raw_line(row - starts[at])

    source = StructColumns(pa.concat_tables(tables, promote_options="default"))
    mapped = mapping.apply(source, line)
    children = mapping.apply_children(source, mapped.kept) \
        if mapping.children and mapped.canonical.num_rows else []
    kept, rejected = mapped.kept.to_pylist(), mapped.rejected.to_pylist()
    kids = [(c.parents.to_pylist(), c.rejected_parents.to_pylist()) for c in children]
    return [(_part(mapped, kept, rejected, start, end),
             [_child_part(c, *rows, start, end) for c, rows in zip(children, kids, strict=True)])
            for start, end in pairwise(starts)]


def _span(sorted_rows: list[int], start: int, end: int) -> tuple[int, int]:
    """(offset, length) of the rows ``start <= r < end`` in ascending row numbers."""
    lo = bisect_left(sorted_rows, start)
    return lo, bisect_left(sorted_rows, end) - lo


def _rebased(rows: pa.Array, start: int) -> pa.Array:
    return pc.subtract(rows, pa.scalar(start, rows.type))


def _part(m: Mapped, kept: list[int], rejected: list[int], start: int, end: int) -> Mapped:
    good, bad = _span(kept, start, end), _span(rejected, start, end)
    return Mapped(
        m.canonical.slice(*good), _rebased(m.rejected.slice(*bad), start),
        m.reasons.slice(*bad), m.fields.slice(*bad), _rebased(m.kept.slice(*good), start),
        m.keys.slice(*bad),
        None if m.deleted is None else m.deleted.slice(*good),
        None if m.deleted_at is None else m.deleted_at.slice(*good),
        {why: rows.slice(start, end - start) for why, rows in m.nulled_rows.items()})


def _child_part(c: ChildMapped, parents: list[int], rejected: list[int], start: int,
                end: int) -> ChildMapped:
    good, bad = _span(parents, start, end), _span(rejected, start, end)
    return ChildMapped(
        c.entity, c.rows.slice(*good), _rebased(c.parents.slice(*good), start),
        _rebased(c.rejected_parents.slice(*bad), start), c.reasons.slice(*bad),
        c.fields.slice(*bad), c.keys.slice(*bad), c.items.slice(*bad))

"""Read one raw batch file (zstd JSON Lines) into columns, never losing a line.

Fast path: pyarrow.json (multi-threaded, typed columns). When a file cannot be read that way
(a broken line, or a field whose type changes between records), the slow path parses line by
line: broken lines become quarantine rows, the rest become per-path columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.json as pj

from canonflow import jsonio
from canonflow.transform.mapping import PathColumns, SourceColumns, StructColumns

_BLOCK = 8 << 20


@dataclass
class RawFile:
    key: str
    columns: SourceColumns
    lines: list[bytes] | None  # kept only by the slow path; see raw_line()
    data: bytes
    broken: list[tuple[int, bytes, str]] = field(default_factory=list)  # (line no, raw, why)
    good_lines: list[int] | None = None  # slow path: line number of each column row

    def raw_line(self, row: int) -> bytes:
        if self.lines is None:
            self.lines = [ln for ln in self.data.split(b"\n") if ln.strip()]
        line_no = row if self.good_lines is None else self.good_lines[row]
        return self.lines[line_no]

    def line_number(self, row: int) -> int:
        return row if self.good_lines is None else self.good_lines[row]


def decompress(data: bytes, key: str) -> bytes:
    if key.endswith(".zst"):
        stream = pa.CompressedInputStream(pa.BufferReader(data), "zstd")
        return bytes(stream.read())
    if key.endswith(".gz"):
        stream = pa.CompressedInputStream(pa.BufferReader(data), "gzip")
        return bytes(stream.read())
    return data


def text_schema(paths: Iterable[str]) -> pa.Schema | None:
    """A pyarrow.json schema that reads each dotted path as text, whatever it looks like
    (``[]`` steps into a list's elements); every other field is inferred as usual. A path
    that is also the parent of another is read as the parent."""
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node.setdefault(leaf, None)
    return pa.schema([(name, _text_type(node)) for name, node in tree.items()]) if tree else None


def _text_type(node: dict[str, Any] | None) -> pa.DataType:
    if node is None:
        return pa.string()
    if set(node) == {"[]"}:
        return pa.list_(_text_type(node["[]"]))
    return pa.struct([(name, _text_type(child)) for name, child in node.items() if name != "[]"])


def read_raw(key: str, compressed: bytes, paths: Iterable[str],
             text_paths: Iterable[str] = ()) -> RawFile:
    """``text_paths`` are read as text by the fast path (values there that are not text
    send the file to the slow path, which keeps every value as it came)."""
    data = decompress(compressed, key)
    if not data.strip():
        return RawFile(key, PathColumns({}, 0), [], data)
    schema = text_schema(text_paths)
    try:
        table = pj.read_json(
            pa.BufferReader(data), read_options=pj.ReadOptions(block_size=_BLOCK),
            parse_options=pj.ParseOptions(explicit_schema=schema,
                                          unexpected_field_behavior="infer"))
        # pyarrow.json can build an invalid list column (a list whose first elements are
        # nulls, e.g. [null, "a"]); reading it later fails the whole file: take the slow path
        table.validate()
        return RawFile(key, StructColumns(table), None, data)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _read_slow(key, data, list(paths))


def _leaf(record: object, path: str) -> object:
    node = record
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _column(values: list[object]) -> pa.Array:
    """Typed when the values agree (lists and objects included), else their text."""
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) <= 1 or kinds <= {int, float}:
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass
    return pa.array(
        [None if v is None else v if isinstance(v, str) else jsonio.dumps_str(v) for v in values],
        pa.string(),
    )


def _read_slow(key: str, data: bytes, paths: list[str]) -> RawFile:
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    broken: list[tuple[int, bytes, str]] = []
    records: list[object] = []
    good: list[int] = []
    for i, line in enumerate(lines):
        try:
            rec = jsonio.loads(line)
        except jsonio.JSONDecodeError as exc:
            broken.append((i, line, f"invalid JSON at byte {exc.pos}: {exc.msg}"))
            continue
        if not isinstance(rec, dict):
            broken.append((i, line, "record is not a JSON object"))
            continue
        records.append(rec)
        good.append(i)
    columns = {p: _column([_leaf(r, p) for r in records]) for p in paths}
    return RawFile(key, PathColumns(columns, len(records)), lines, data, broken, good)

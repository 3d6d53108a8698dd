"""The mapping engine: a mapping compiled to pyarrow compute over whole columns.

No per-record Python on the hot path: each canonical field is extracted, cast and checked as
one array; a row that fails any field is routed to quarantine with the first reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from canonflow.mappings import Entity, FieldRule, MappingSpec

DECIMAL = pa.decimal128(38, 6)
ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "decimal": DECIMAL,
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}
LINEAGE: list[tuple[str, pa.DataType]] = [
    ("_tenant_id", pa.string()),
    ("_service_name", pa.string()),
    ("_source_table", pa.string()),
    ("_source_file", pa.string()),
    ("_job_id", pa.string()),
    ("_request_id", pa.string()),
]
_INT_RE = r"^\s*[+-]?\d+\s*$"
_FLOAT_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
_TRUE = ["true", "1", "yes", "y", "t"]
_FALSE = ["false", "0", "no", "n", "f"]


def entity_schema(entity: Entity) -> pa.Schema:
    fields = [pa.field(n, ARROW_TYPES[d.type]) for n, d in entity.fields.items()]
    return pa.schema(fields + [pa.field(n, t) for n, t in LINEAGE])


class SourceColumns(Protocol):
    @property
    def num_rows(self) -> int: ...

    def get(self, path: str) -> pa.Array | None: ...


@dataclass
class StructColumns:
    """Columns of a table read by pyarrow.json; dotted paths walk nested structs."""

    table: pa.Table

    @property
    def num_rows(self) -> int:
        return int(self.table.num_rows)

    def get(self, path: str) -> pa.Array | None:
        head, *rest = path.split(".")
        if head not in self.table.column_names:
            return None
        arr = self.table.column(head).combine_chunks()
        for part in rest:
            if not pa.types.is_struct(arr.type) or arr.type.get_field_index(part) < 0:
                return None
            arr = pc.struct_field(arr, part)
        return arr


@dataclass
class PathColumns:
    """Columns built by the slow path (files pyarrow.json cannot type), keyed by path."""

    columns: dict[str, pa.Array]
    num_rows: int

    def get(self, path: str) -> pa.Array | None:
        return self.columns.get(path)


@dataclass
class Mapped:
    canonical: pa.Table  # good rows, entity schema without lineage
    rejected: pa.Array  # indices of rows that failed
    reasons: pa.Array  # reason per rejected row
    fields: pa.Array  # field per rejected row


def _fail(src: pa.Array, out: pa.Array) -> pa.Array:
    return pc.and_(pc.is_valid(src), pc.is_null(out))


def cast_column(src: pa.Array, ftype: str, rule: FieldRule) -> tuple[pa.Array, pa.Array]:
    """(values, failed) where failed marks non-null inputs that could not be cast."""
    target = ARROW_TYPES[ftype]
    t = src.type
    if pa.types.is_null(t):
        out = pa.nulls(len(src), target)
        return out, pa.array([False] * len(src))
    if pa.types.is_struct(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        out = pa.nulls(len(src), target)
        return out, _fail(src, out)
    is_str = pa.types.is_string(t) or pa.types.is_large_string(t)
    if ftype == "string":
        if pa.types.is_timestamp(t):
            out = pc.strftime(src, format="%Y-%m-%dT%H:%M:%SZ")
        else:
            out = pc.cast(src, pa.string())
        return out, _fail(src, out)
    if ftype in ("int", "float", "decimal"):
        if is_str:
            ok = pc.match_substring_regex(src, _INT_RE if ftype == "int" else _FLOAT_RE)
            clean = pc.if_else(ok, pc.utf8_trim_whitespace(src), None)
            out = pc.cast(clean, pa.float64() if ftype == "decimal" else target)
            if ftype == "decimal":
                out = pc.cast(pc.round(out, 6), target)
        elif pa.types.is_floating(t) and ftype == "int":
            integral = pc.equal(pc.floor(src), src)
            out = pc.cast(pc.if_else(integral, src, None), target)
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            out = pc.cast(src, pa.float64()) if ftype == "decimal" else pc.cast(src, target)
            if ftype == "decimal":
                out = pc.cast(pc.round(out, 6), target)
        else:
            out = pa.nulls(len(src), target)
        return out, _fail(src, out)
    if ftype == "bool":
        if pa.types.is_boolean(t):
            out = src
        elif is_str:
            low = pc.utf8_lower(pc.utf8_trim_whitespace(src))
            out = pc.if_else(pc.is_in(low, pa.array(_TRUE)), True,
                             pc.if_else(pc.is_in(low, pa.array(_FALSE)), False, None))
        elif pa.types.is_integer(t):
            out = pc.not_equal(src, 0)
        else:
            out = pa.nulls(len(src), target)
        return pc.cast(out, target), _fail(src, out)
    # timestamp
    if pa.types.is_timestamp(t):
        out = pc.cast(src, pa.timestamp("us", tz=t.tz)) if t.tz else pc.assume_timezone(
            pc.cast(src, pa.timestamp("us")), rule.timezone or "UTC")
        out = pc.cast(out, target)
    elif is_str:
        fmt = rule.format or "%Y-%m-%dT%H:%M:%S%z"
        parsed = pc.strptime(src, format=fmt, unit="us", error_is_null=True)
        if parsed.type.tz is None:
            parsed = pc.assume_timezone(parsed, rule.timezone or "UTC")
        out = pc.cast(parsed, target)
    elif pa.types.is_integer(t):
        out = pc.cast(pc.multiply(pc.cast(src, pa.int64()), 1_000_000),
                      pa.timestamp("us", tz="UTC"))
    else:
        out = pa.nulls(len(src), target)
    return out, _fail(src, out)


def _default(rule: FieldRule, ftype: str, n: int) -> pa.Array:
    value: Any = rule.default
    scalar = pa.scalar(value) if value is not None else None
    if scalar is None:
        return pa.nulls(n, ARROW_TYPES[ftype])
    arr = pa.array([value] * n)
    out, _ = cast_column(arr, ftype, rule)
    return out


class CompiledMapping:
    def __init__(self, spec: MappingSpec, entity: Entity) -> None:
        self.spec = spec
        self.entity = entity
        self.schema = pa.schema([pa.field(n, ARROW_TYPES[d.type])
                                 for n, d in entity.fields.items()])
        self.paths = sorted({r.path for r in spec.fields.values()})

    def apply(self, source: SourceColumns) -> Mapped:
        n = source.num_rows
        columns: list[pa.Array] = []
        reason: pa.Array = pa.nulls(n, pa.string())
        field: pa.Array = pa.nulls(n, pa.string())
        for name, fdef in self.entity.fields.items():
            rule = self.spec.fields.get(name)
            if rule is None:
                columns.append(pa.nulls(n, ARROW_TYPES[fdef.type]))
                continue
            src = source.get(rule.path)
            if src is None:
                out, failed = _default(rule, fdef.type, n), pa.array([False] * n)
            else:
                out, failed = cast_column(src, fdef.type, rule)
                if rule.default is not None:
                    out = pc.coalesce(out, _default(rule, fdef.type, n))
            why = f"cannot cast {rule.path!r} to {fdef.type}"
            reason, field = self._note(reason, field, failed, why, name)
            if fdef.required:
                missing = pc.is_null(out)
                reason, field = self._note(
                    reason, field, missing, f"required field {rule.path!r} is missing", name
                )
            columns.append(out)
        bad = pc.is_valid(reason)
        table = pa.Table.from_arrays(columns, schema=self.schema)
        good = table.filter(pc.invert(bad))
        idx = pc.indices_nonzero(bad)
        return Mapped(good, idx, pc.take(reason, idx), pc.take(field, idx))

    @staticmethod
    def _note(reason: pa.Array, field: pa.Array, mask: pa.Array, why: str,
              name: str) -> tuple[pa.Array, pa.Array]:
        new = pc.and_(pc.fill_null(mask, False), pc.is_null(reason))
        if not pc.any(new).as_py():
            return reason, field
        return pc.if_else(new, why, reason), pc.if_else(new, name, field)

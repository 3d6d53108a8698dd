"""The mapping engine: a mapping compiled to pyarrow compute over whole columns.

No per-record Python on the hot path: each canonical field is extracted, cast and checked as
one array; a row that fails any field is routed to quarantine with the first reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

from canonflow import jsonio
from canonflow.mappings import ChildMapping, Entity, FieldDef, FieldRule, MappingSpec
from canonflow.mappings.catalog import EXTRA, ITEM

DECIMAL = pa.decimal128(38, 6)
ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "decimal": DECIMAL,
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "enum": pa.string(),
}
LINEAGE: list[tuple[str, pa.DataType]] = [
    ("_tenant_id", pa.string()),
    ("_service_name", pa.string()),
    ("_source_table", pa.string()),
    ("_source_file", pa.string()),
    ("_job_id", pa.string()),
    ("_request_id", pa.string()),
    ("_extracted_at", pa.timestamp("us", tz="UTC")),
    ("_deleted_at", pa.timestamp("us", tz="UTC")),  # soft delete: when the source deleted it
]
_INT_RE = r"^\s*[+-]?\d+\s*$"
_FLOAT_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
# ISO 8601 text: a time of hours, minutes or seconds (with fractions), with an offset (Z,
# +02, +0200, +02:00) or without one (then in the field's zone); a date alone is midnight
_ISO_TIME = r"[T ]\d{2}(:\d{2}(:\d{2}(\.\d{1,9})?)?)?"
_ISO_RE = rf"^\d{{4}}-\d{{2}}-\d{{2}}{_ISO_TIME}(Z|[+-]\d{{2}}(:?\d{{2}})?)$"
_ISO_LOCAL_RE = rf"^\d{{4}}-\d{{2}}-\d{{2}}({_ISO_TIME})?$"
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
class ChildColumns:
    """The rows of a child entity: one per element of an array of each parent record.
    ``$item`` (and ``$item.x``) name the element; other paths read the parent record."""

    parent: SourceColumns
    elements: pa.Array
    parents: pa.Array  # index of each element's parent row

    @classmethod
    def explode(cls, parent: SourceColumns, path: str) -> ChildColumns:
        arr = parent.get(path)
        if arr is None or not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            return cls(parent, pa.array([], pa.null()), pa.array([], pa.int64()))
        return cls(parent, pc.list_flatten(arr), pc.list_parent_indices(arr))

    @property
    def num_rows(self) -> int:
        return len(self.elements)

    def get(self, path: str) -> pa.Array | None:
        if path == ITEM:
            return self.elements
        if path.startswith(ITEM + "."):
            arr = self.elements
            for part in path[len(ITEM) + 1:].split("."):
                if not pa.types.is_struct(arr.type) or arr.type.get_field_index(part) < 0:
                    return None
                arr = pc.struct_field(arr, part)
            return arr
        parent = self.parent.get(path)
        return None if parent is None else pc.take(parent, self.parents)


@dataclass
class Mapped:
    canonical: pa.Table  # good rows, entity schema without lineage
    rejected: pa.Array  # indices of rows that failed
    reasons: pa.Array  # reason per rejected row
    fields: pa.Array  # field per rejected row
    kept: pa.Array  # indices of the good rows in the source
    keys: pa.Array  # key text per rejected row (null when the key is missing or bad)
    deleted: pa.Array | None = None  # per good row: a deletion (tombstone)
    deleted_at: pa.Array | None = None  # per good row: when (null: at extraction)
    # reason -> per source row: an optional value of a record that lands nulled for it
    nulled_rows: dict[str, pa.Array] = dc_field(default_factory=dict)

    @property
    def nulled(self) -> dict[str, int]:
        """reason -> optional values nulled (of the records that land)."""
        return {why: c for why, rows in self.nulled_rows.items() if (c := count_true(rows))}


def count_true(mask: pa.Array) -> int:
    return int(pc.sum(pc.cast(pc.fill_null(mask, False), pa.int64())).as_py() or 0)


@dataclass
class ChildMapped:
    """The child rows of the kept parent rows, good and rejected."""

    entity: Entity
    rows: pa.Table  # good child rows, entity schema without lineage
    parents: pa.Array  # source index of each good row's parent
    rejected_parents: pa.Array  # source index of each rejected row's parent
    reasons: pa.Array  # reason per rejected row
    fields: pa.Array  # field per rejected row
    keys: pa.Array  # child key text per rejected row (null when missing or bad)
    items: pa.Array  # the array element each rejected row came from


def key_column(rows: pa.Table, keys: list[str]) -> pa.Array:
    """One comparable value per row for a (possibly composite) key; null when a part is."""
    if len(keys) == 1:
        return pc.cast(rows.column(keys[0]), pa.string()).combine_chunks()
    parts = [pc.cast(rows.column(k), pa.string()).combine_chunks() for k in keys]
    return pc.binary_join_element_wise(*parts, "\x1f")


def constant(value: object, n: int, type_: pa.DataType | None = None) -> pa.Array:
    """``n`` copies of one value, built in Arrow (no Python list of length n)."""
    return pa.repeat(pa.scalar(value, type_) if type_ is not None else pa.scalar(value), n)


def sequence(start: int, n: int) -> pa.Array:
    """start, start+1, ..., start+n-1 as int64."""
    if n == 0:
        return pa.array([], pa.int64())
    return pc.add(pc.cumulative_sum(constant(1, n, pa.int64())), start - 1)


def per_value(op: Callable[[pa.Array], pa.Array], src: pa.Array,
              target: pa.DataType) -> pa.Array:
    """``op`` over the whole column; when one value makes it raise (a number too big for
    the target type, a date that does not exist, a local time a DST gap skips), only that
    value becomes null, so the row fails its cast instead of the whole request. Halving
    finds the bad values in O(k log n) calls; the common case is one call."""
    try:
        return op(src)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if len(src) <= 1:
            return pa.nulls(len(src), target)
    half = len(src) // 2
    return pa.concat_arrays([per_value(op, src.slice(0, half), target),
                             per_value(op, src.slice(half), target)])


def _cast(src: pa.Array, target: pa.DataType) -> pa.Array:
    return per_value(lambda a: pc.cast(a, target), src, target)


def _finite(src: pa.Array) -> pa.Array:
    """Floating values with NaN and infinities as null: no canonical type holds them."""
    if pa.types.is_floating(src.type):
        return pc.if_else(pc.is_finite(src), src, None)
    return src


def _fail(src: pa.Array, out: pa.Array) -> pa.Array:
    return pc.and_(pc.is_valid(src), pc.is_null(out))


def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t))


def _first(src: pa.Array) -> pa.Array:
    """The first element of each list (null for null or empty lists)."""
    lengths = pc.fill_null(pc.list_value_length(src), 0)
    has = pc.greater(lengths, 0)
    flat = pc.list_flatten(pc.list_slice(src, 0, 1))
    position = pc.subtract(pc.cumulative_sum(pc.cast(has, pa.int64())), 1)
    return pc.take(flat, pc.if_else(has, position, None))


def _as_text(src: pa.Array) -> pa.Array:
    if pa.types.is_string(src.type) or pa.types.is_large_string(src.type):
        return src
    if pa.types.is_timestamp(src.type):
        return pc.strftime(src, format="%Y-%m-%dT%H:%M:%SZ")
    return pc.cast(src, pa.string())


def shape(src: pa.Array, rule: FieldRule) -> pa.Array:
    """Empty text and null markers, array handling and value maps, before the type cast."""
    if rule.empty == "null" and (pa.types.is_string(src.type) or pa.types.is_large_string(
            src.type)):
        src = pc.if_else(pc.equal(pc.utf8_trim_whitespace(src), ""), None, src)
    if rule.nulls and not pa.types.is_null(src.type) and not _is_list(src.type) \
            and not pa.types.is_struct(src.type):
        src = pc.if_else(pc.is_in(_as_text(src), value_set=pa.array(rule.nulls)), None, src)
    if rule.array is not None and _is_list(src.type):
        if rule.array == "first":
            src = _first(src)
        else:
            value_type = src.type.value_type
            if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
                src = pc.cast(src, pa.list_(pa.string()))
            src = pc.binary_join(src, rule.separator)
    if rule.values is not None and not pa.types.is_null(src.type) and not _is_list(src.type):
        text = _as_text(src)
        keys = pa.array(list(rule.values), pa.string())
        mapped = pc.take(pa.array(list(rule.values.values()), pa.string()),
                         pc.index_in(text, value_set=keys))
        src = pc.coalesce(mapped, text)
    return src


def cast_column(src: pa.Array, ftype: str, rule: FieldRule,
                fdef: FieldDef | None = None) -> tuple[pa.Array, pa.Array]:
    """(values, failed) where failed marks non-null inputs that could not be cast."""
    src = shape(src, rule)
    target = ARROW_TYPES[ftype]
    t = src.type
    if pa.types.is_null(t):
        out = pa.nulls(len(src), target)
        return out, constant(False, len(src))
    if pa.types.is_struct(t) or _is_list(t):
        out = pa.nulls(len(src), target)
        return out, _fail(src, out)
    is_str = pa.types.is_string(t) or pa.types.is_large_string(t)
    if ftype in ("string", "enum"):
        out = _as_text(src)
        if ftype == "enum" and fdef is not None and fdef.values:
            out = pc.if_else(pc.is_in(out, value_set=pa.array(fdef.values)), out, None)
        return out, _fail(src, out)
    if ftype in ("int", "float", "decimal"):
        if is_str:
            ok = pc.match_substring_regex(src, _INT_RE if ftype == "int" else _FLOAT_RE)
            clean = pc.if_else(ok, pc.utf8_trim_whitespace(src), None)
            out = _finite(_cast(clean, pa.float64() if ftype == "decimal" else target))
        elif pa.types.is_floating(t) and ftype == "int":
            finite = _finite(src)
            integral = pc.equal(pc.floor(finite), finite)
            out = _cast(pc.if_else(integral, finite, None), target)
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
            finite = _finite(src)
            out = _cast(finite, pa.float64()) if ftype == "decimal" else _cast(finite, target)
        else:
            out = pa.nulls(len(src), target)
        if ftype == "decimal" and not pa.types.is_decimal(out.type):
            out = _cast(pc.round(out, 6), target)
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
    zone = rule.timezone or "UTC"
    if pa.types.is_timestamp(t):
        out = _cast(src, pa.timestamp("us", tz=t.tz)) if t.tz else _in_zone(
            _cast(src, pa.timestamp("us")), zone)
        out = pc.cast(out, target)
    elif is_str and rule.format is None:
        # ISO 8601 with an offset or Z, with or without fractions of a second
        iso = pc.match_substring_regex(src, _ISO_RE)
        out = _cast(pc.if_else(iso, src, None), target)
        local = pc.match_substring_regex(src, _ISO_LOCAL_RE)
        if pc.any(local).as_py():  # no offset: in the rule's zone (default UTC)
            naive = _cast(pc.if_else(local, src, None), pa.timestamp("us"))
            out = pc.if_else(local, pc.cast(_in_zone(naive, zone), target), out)
        numeric = pc.match_substring_regex(src, _FLOAT_RE)
        if pc.any(numeric).as_py():  # epoch numbers that arrived as text
            epoch = _epoch(_cast(pc.if_else(numeric, src, None), pa.float64()), rule)
            out = pc.if_else(numeric, epoch, out)
    elif is_str:
        parsed = pc.strptime(src, format=rule.format, unit="us", error_is_null=True)
        if parsed.type.tz is None:
            parsed = _in_zone(parsed, zone)
        out = pc.cast(parsed, target)
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        out = _epoch(src, rule)
    else:
        out = pa.nulls(len(src), target)
    return out, _fail(src, out)


# ISO 4217 currencies whose minor unit is not 1/100 (all others: exponent 2)
EXPONENTS: dict[str, int] = {
    **dict.fromkeys(["BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF",
                     "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"], 0),
    **dict.fromkeys(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"], 3),
    "CLF": 4, "UYW": 4,
}


def exponents(currency: pa.Array, overrides: dict[str, int] | None = None) -> pa.Array:
    """The ISO 4217 exponent of each currency code (any case); null for a value that is not
    a three-letter code."""
    table = {**EXPONENTS, **{k.upper(): v for k, v in (overrides or {}).items()}}
    code = pc.utf8_upper(pc.utf8_trim_whitespace(_as_text(currency)))
    known = pc.take(pa.array(list(table.values()), pa.int64()),
                    pc.index_in(code, value_set=pa.array(list(table), pa.string())))
    letters = pc.match_substring_regex(code, r"^[A-Z]{3}$")
    return pc.if_else(letters, pc.fill_null(known, 2), None)


def major_units(amount: pa.Array, exponent: pa.Array) -> pa.Array:
    """Integer amounts in minor units, in major units (float64, rounded to 6 decimals, more
    than any exponent has): 223757 USD -> 2237.57, 349 JPY -> 349, 1234 KWD -> 1.234; null
    without an exponent or for an amount with a fraction."""
    value = _finite(pc.cast(amount, pa.float64()))
    integral = pc.equal(pc.floor(value), value)
    scale = pc.power(pa.scalar(10.0), pc.cast(exponent, pa.float64()))
    return pc.if_else(integral, pc.round(pc.divide(value, scale), 6), None)


def _in_zone(naive: pa.Array, zone: str) -> pa.Array:
    if zone == "UTC":  # the same instants; a cast costs 1/50 of ``assume_timezone``
        return pc.cast(naive, pa.timestamp(naive.type.unit, tz="UTC"))
    return per_value(lambda a: pc.assume_timezone(a, zone), naive,
                     pa.timestamp(naive.type.unit, tz=zone))


def _epoch(src: pa.Array, rule: FieldRule) -> pa.Array:
    scale = 1_000 if rule.unit == "ms" else 1_000_000
    scaled = pc.round(pc.multiply(_finite(pc.cast(src, pa.float64())), scale))
    micros = _cast(scaled, pa.int64())
    return pc.cast(micros, pa.timestamp("us", tz="UTC"))


def _literal(value: object, n: int) -> pa.Array:
    return constant(value, n)


def _template(source: SourceColumns, template: str, n: int) -> pa.Array:
    """``{path}`` placeholders filled from the record; null parts are empty, and a row whose
    parts are all null stays null."""
    pieces = re.split(r"\{([^{}]+)\}", template)
    parts: list[pa.Array | str] = []
    any_value = constant(False, n)
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece:
                parts.append(piece)
            continue
        arr = source.get(piece)
        if arr is None or pa.types.is_null(arr.type):
            continue
        text = _as_text(arr)
        text = pc.if_else(pc.equal(pc.utf8_trim_whitespace(text), ""), None, text)
        any_value = pc.or_(any_value, pc.is_valid(text))
        parts.append(pc.fill_null(text, ""))
    if not parts:
        return pa.nulls(n, pa.string())
    joined = pc.binary_join_element_wise(*parts, "") if len(parts) > 1 else (
        parts[0] if isinstance(parts[0], pa.Array) else _literal(parts[0], n))
    # a null part leaves its separators behind: trimmed, and runs of spaces made one
    joined = pc.replace_substring_regex(pc.utf8_trim_whitespace(joined), r"  +", " ")
    return pc.if_else(any_value, joined, None)


def _drop(record: dict[str, object], path: list[str]) -> None:
    """Remove a dotted path from a record, and the objects it leaves empty."""
    head, *rest = path
    if not rest:
        record.pop(head, None)
        return
    inner = record.get(head)
    if isinstance(inner, dict):
        _drop(inner, rest)
        if not inner:
            del record[head]


def unmapped(lines: list[bytes], paths: list[str]) -> pa.Array:
    """Each raw record without the paths a mapping reads, as JSON text (null when nothing
    is left). One JSON parse per record: only mappings with ``keep_unmapped`` pay it."""
    split = [p.split(".") for p in paths]
    out: list[str | None] = []
    for line in lines:
        record = jsonio.loads(line)
        if not isinstance(record, dict):
            out.append(None)
            continue
        for path in split:
            _drop(record, path)
        out.append(jsonio.dumps_str(record) if record else None)
    return pa.array(out, pa.string())


class CompiledMapping:
    def __init__(self, spec: MappingSpec | ChildMapping, entity: Entity,
                 entities: dict[str, Entity] | None = None) -> None:
        self.spec = spec
        self.entity = entity
        self.schema = pa.schema([pa.field(n, ARROW_TYPES[d.type])
                                 for n, d in entity.fields.items()])
        self.children: list[tuple[str, CompiledMapping]] = []
        self.paths: list[str] = []
        self.text_paths: list[str] = []  # paths read as text (``[]``: a list's elements)
        self.parent_key: dict[str, str] = {}  # a child's: child field -> parent key field
        if isinstance(spec, MappingSpec):
            for child in spec.children:
                if entities is None or child.entity not in entities:
                    raise ValueError(f"unknown child entity {child.entity!r}")
                compiled = CompiledMapping(child, entities[child.entity])
                compiled.parent_key = child.parent_link(spec, entity)
                self.children.append((child.explode, compiled))
        paths = {p for r in spec.fields.values() for p in r.paths}
        paths |= {r.minor_units for r in spec.fields.values() if r.minor_units}
        if isinstance(spec, MappingSpec) and spec.deleted is not None:
            paths |= {spec.deleted.path} if spec.deleted.path else set()
            paths |= set(spec.deleted.at.paths) if spec.deleted.at else set()
        for explode, compiled in self.children:
            paths.add(explode)
            paths |= {p for p in compiled.paths if not p.startswith(ITEM)}
        self.paths = sorted(paths)
        # timestamps read in a zone of their own are read as text: pyarrow.json turns ISO
        # text into UTC instants, those with an offset and those without alike, so the
        # zone could no longer be applied to the second kind only
        rules = [(r, entity.fields.get(name)) for name, r in spec.fields.items()]
        if isinstance(spec, MappingSpec) and spec.deleted is not None and spec.deleted.at:
            rules.append((spec.deleted.at, None))
        text = {p for r, fdef in rules if r.timezone not in (None, "UTC")
                and (fdef is None or fdef.type == "timestamp") for p in r.paths}
        for explode, compiled in self.children:  # ``$item``: the elements of the list
            text |= {f"{explode}.[]{p[len(ITEM):]}" if p.startswith(ITEM) else p
                     for p in compiled.text_paths}
        self.text_paths = sorted(text)

    def _column(self, source: SourceColumns, name: str, fdef: FieldDef,
                rule: FieldRule, n: int) -> tuple[pa.Array, pa.Array, str]:
        """(values, failed, what) for one canonical field."""
        if rule.value is not None:
            out, failed = cast_column(_literal(rule.value, n), fdef.type, rule, fdef)
            return out, failed, "value"
        if rule.template is not None:
            out, failed = cast_column(_template(source, rule.template, n), fdef.type, rule, fdef)
            return out, failed, f"template {rule.template!r}"
        paths = rule.paths
        out = pa.nulls(n, ARROW_TYPES[fdef.type])
        failed = constant(False, n)
        decided = failed
        exponent = None
        if rule.minor_units is not None:
            currency = source.get(rule.minor_units)
            exponent = exponents(pa.nulls(n, pa.string()) if currency is None or pa.types.is_null(
                currency.type) else currency, rule.exponents)
        for path in paths:  # one path, or the first non-null of several
            src = source.get(path)
            if src is None:
                continue
            if exponent is not None:  # money in minor units: to major units first
                number, not_number = cast_column(src, "float", rule)
                major = major_units(number, exponent)
                value, bad = cast_column(major, fdef.type, rule, fdef)
                bad = pc.or_(not_number, _fail(number, major))
            else:
                value, bad = cast_column(src, fdef.type, rule, fdef)
            # a value that shaping made null (empty text, a null marker) does not decide
            present = pc.or_(pc.is_valid(value), bad)
            take = pc.and_(pc.invert(decided), present)
            out = pc.if_else(take, value, out)
            failed = pc.if_else(take, bad, failed)
            decided = pc.or_(decided, present)
        return out, failed, repr(paths[0]) if len(paths) == 1 else f"first of {paths}"

    @property
    def keeps_unmapped(self) -> bool:
        return isinstance(self.spec, MappingSpec) and self.spec.keep_unmapped

    def apply(self, source: SourceColumns,
              lines: Callable[[int], bytes] | None = None) -> Mapped:
        """Map every row of ``source``; ``lines`` (row -> its raw JSON line) feeds
        ``keep_unmapped``: the good rows' other fields, as JSON in ``_extra``."""
        n = source.num_rows
        columns: dict[str, pa.Array] = {}
        reason: pa.Array = pa.nulls(n, pa.string())
        field: pa.Array = pa.nulls(n, pa.string())
        nulled: dict[str, pa.Array] = {}  # reason -> rows whose optional value it nulled
        deleted = self._deleted(source, n)
        live = pc.invert(deleted)
        for name, fdef in self.entity.fields.items():
            rule = self.spec.fields.get(name)
            if rule is None:
                if name not in columns:
                    columns[name] = pa.nulls(n, ARROW_TYPES[fdef.type])
                continue
            out, failed, what = self._column(source, name, fdef, rule, n)
            if rule.default is not None:
                default, _ = cast_column(_literal(rule.default, n), fdef.type, rule, fdef)
                out = pc.coalesce(out, default)
            allowed = f" (one of {', '.join(fdef.values)})" if fdef.values else ""
            why = f"cannot cast {what} to {fdef.type}{allowed}"
            policy = "quarantine" if fdef.required else (
                rule.unknown if fdef.values and rule.unknown else rule.on_error or "null")
            if policy not in ("null", "quarantine") and pc.any(failed).as_py():
                # an unknown enum value: mapped to the policy's value, the raw one kept
                raw, _, _ = self._column(source, name, FieldDef(type="string"),
                                         rule.model_copy(update={"values": None}), n)
                columns[f"{name}_raw"] = pc.if_else(failed, raw, None)
                out = pc.if_else(failed, policy, out)
                nulled[f"{name}: {why}; mapped to {policy!r}"] = failed
            elif policy != "quarantine":
                # an optional field that cannot be cast becomes null, the record lands
                if pc.any(failed).as_py():
                    nulled[f"{name}: {why}"] = failed
            else:
                # a deletion (tombstone) needs its key only: other fields may be absent
                reason, field = self._note(reason, field, failed if name in self.entity.keys
                                           else pc.and_(failed, live), why, name)
            if fdef.required:
                missing = pc.is_null(out)
                reason, field = self._note(
                    reason, field, missing if name in self.entity.keys
                    else pc.and_(missing, live), f"required field {what} is missing", name)
            columns[name] = out
        bad = pc.is_valid(reason)
        table = pa.Table.from_arrays([columns[f.name] for f in self.schema],
                                     schema=self.schema)
        good = table.filter(pc.invert(bad))
        idx = pc.indices_nonzero(bad)
        kept = pc.indices_nonzero(pc.invert(bad))
        if self.keeps_unmapped and lines is not None and good.num_rows:
            extra = unmapped([lines(i) for i in kept.to_pylist()], self.paths)
            good = good.set_column(good.schema.get_field_index(EXTRA), EXTRA, extra)
        keys = pc.take(key_column(table, self.entity.keys), idx)
        lands = pc.invert(bad)  # only the records that land count
        nulled = {why: pc.and_(rows, lands) for why, rows in nulled.items()}
        deleted_at = None
        if isinstance(self.spec, MappingSpec) and self.spec.deleted is not None:
            drule = self.spec.deleted
            when = pa.nulls(n, ARROW_TYPES["timestamp"])
            if drule.at is not None:
                when, _, _ = self._column(source, "_deleted_at", FieldDef(type="timestamp"),
                                          drule.at, n)
            when = pc.coalesce(when, columns[self.entity.ordering])
            deleted_at = pc.filter(pc.if_else(deleted, when, None), lands)
        return Mapped(good, idx, pc.take(reason, idx), pc.take(field, idx), kept, keys,
                      pc.filter(deleted, lands), deleted_at, nulled)

    def _deleted(self, source: SourceColumns, n: int) -> pa.Array:
        """Which records are deletions, per the mapping's ``deleted`` rule."""
        rule = self.spec.deleted if isinstance(self.spec, MappingSpec) else None
        if rule is None:
            return constant(False, n)
        if rule.always:
            return constant(True, n)
        src = source.get(rule.path or "")
        if src is None or pa.types.is_null(src.type):
            return constant(False, n)
        if rule.values is not None:
            flag = pc.is_in(_as_text(src), value_set=pa.array(rule.values, pa.string()))
        else:
            flag, _ = cast_column(src, "bool", FieldRule(path=rule.path))
        return pc.fill_null(flag, False)

    def apply_children(self, source: SourceColumns, kept: pa.Array) -> list[ChildMapped]:
        """Child rows of the kept parent rows, per child entity. A child row that fails
        its own mapping is returned as rejected (to quarantine, counted as
        ``child_rows_rejected``) with its parent kept."""
        out = []
        whole = len(kept) == source.num_rows
        for explode, child in self.children:
            cols = ChildColumns.explode(source, explode)
            mapped = child.apply(cols)
            parents = pc.take(cols.parents, mapped.kept)
            rejected_parents = pc.take(cols.parents, mapped.rejected)
            items = pc.take(cols.elements, mapped.rejected)
            rows, reasons, fields, keys = (
                mapped.canonical, mapped.reasons, mapped.fields, mapped.keys)
            if not whole:
                mask = pc.is_in(parents, value_set=kept)
                rows, parents = rows.filter(mask), parents.filter(mask)
                bad = pc.is_in(rejected_parents, value_set=kept)
                rejected_parents, reasons, fields, keys, items = (
                    a.filter(bad) for a in (rejected_parents, reasons, fields, keys, items))
            out.append(ChildMapped(child.entity, rows, parents, rejected_parents, reasons,
                                   fields, keys, items))
        return out

    @staticmethod
    def _note(reason: pa.Array, field: pa.Array, mask: pa.Array, why: str,
              name: str) -> tuple[pa.Array, pa.Array]:
        new = pc.and_(pc.fill_null(mask, False), pc.is_null(reason))
        if not pc.any(new).as_py():
            return reason, field
        return pc.if_else(new, why, reason), pc.if_else(new, name, field)

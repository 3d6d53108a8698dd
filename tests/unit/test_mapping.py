from datetime import UTC, datetime
from decimal import Decimal

import pyarrow as pa
import pytest

from canonflow.mappings import Entity, FieldDef, FieldRule, MappingSpec, load_catalog
from canonflow.mappings.catalog import SourceRef
from canonflow.transform.mapping import CompiledMapping, PathColumns, StructColumns, cast_column


def cast(values: list[object], ftype: str, **rule: object) -> tuple[list[object], list[bool]]:
    out, failed = cast_column(pa.array(values), ftype, FieldRule(path="x", **rule))
    return out.to_pylist(), failed.to_pylist()


def test_int_from_strings_floats_and_garbage() -> None:
    assert cast(["1", " 2 ", "x", None, "3.5"], "int") == (
        [1, 2, None, None, None], [False, False, True, False, True])
    assert cast([1.0, 2.5], "int") == ([1, None], [False, True])


def test_decimal_and_float() -> None:
    out, failed = cast(["12.50", "n/a", "1e3"], "decimal")
    assert out == [Decimal("12.5"), None, Decimal("1000")] and failed == [False, True, False]
    assert cast([1, 2], "float") == ([1.0, 2.0], [False, False])


def test_bool_from_strings_and_ints() -> None:
    assert cast(["true", "No", "maybe"], "bool") == ([True, False, None], [False, False, True])
    assert cast([0, 3], "bool") == ([False, True], [False, False])


def test_timestamps_with_offsets_formats_and_zones() -> None:
    out, failed = cast(["2026-01-01T00:00:00Z", "2026-01-01T02:00:00+02:00", "yesterday"],
                       "timestamp")
    assert out[0] == out[1] == datetime(2026, 1, 1, tzinfo=UTC)
    assert failed == [False, False, True]
    out, _ = cast(["01/02/2026 10:00"], "timestamp", format="%d/%m/%Y %H:%M",
                  timezone="Europe/Berlin")
    assert out == [datetime(2026, 2, 1, 9, 0, tzinfo=UTC)]
    out, _ = cast([0], "timestamp")
    assert out == [datetime(1970, 1, 1, tzinfo=UTC)]


def test_string_from_numbers_and_structs_fail() -> None:
    assert cast([1, 2], "string") == (["1", "2"], [False, False])
    _, failed = cast_column(pa.array([{"a": 1}]), "string", FieldRule(path="x"))
    assert failed.to_pylist() == [True]


ENTITY = Entity(name="thing", primary_key="id", ordering="updated_at", fields={
    "id": FieldDef(type="string", required=True),
    "size": FieldDef(type="int"),
    "label": FieldDef(type="string"),
    "updated_at": FieldDef(type="timestamp", required=True),
})
SPEC = MappingSpec(source=SourceRef(service="svc", table="things"), entity="thing", fields={
    "id": FieldRule(path="id"),
    "size": FieldRule(path="props.size"),
    "label": FieldRule(path="props.label", default="none"),
    "updated_at": FieldRule(path="updated_at"),
})


def test_mapping_routes_bad_rows_with_the_first_reason() -> None:
    table = pa.Table.from_pylist([
        {"id": "1", "props": {"size": "10", "label": "a"}, "updated_at": "2026-01-01T00:00:00Z"},
        {"id": None, "props": {"size": "10", "label": "b"}, "updated_at": "2026-01-01T00:00:00Z"},
        {"id": "3", "props": {"size": "big", "label": None}, "updated_at": "2026-01-01T00:00:00Z"},
        {"id": "4", "props": {"size": None, "label": None}, "updated_at": "2026-01-01T00:00:00Z"},
    ])
    mapped = CompiledMapping(SPEC, ENTITY).apply(StructColumns(table))
    # an optional field that cannot be cast is null, the record lands, the reason counted
    assert mapped.canonical.column("id").to_pylist() == ["1", "3", "4"]
    assert mapped.canonical.column("size").to_pylist() == [10, None, None]
    assert mapped.canonical.column("label").to_pylist() == ["a", "none", "none"]
    assert mapped.nulled == {"size: cannot cast 'props.size' to int": 1}
    assert mapped.rejected.to_pylist() == [1]
    assert mapped.fields.to_pylist() == ["id"]
    assert mapped.reasons.to_pylist()[0] == "required field 'id' is missing"
    strict = SPEC.model_copy(update={"fields": {
        **SPEC.fields, "size": FieldRule(path="props.size", on_error="quarantine")}})
    mapped = CompiledMapping(strict, ENTITY).apply(StructColumns(table))
    assert mapped.canonical.column("id").to_pylist() == ["1", "4"]
    assert mapped.rejected.to_pylist() == [1, 2]
    assert mapped.fields.to_pylist() == ["id", "size"]


def test_missing_paths_become_nulls_not_errors() -> None:
    cols = PathColumns({"id": pa.array(["1"]),
                        "updated_at": pa.array(["2026-01-01T00:00:00Z"])}, 1)
    mapped = CompiledMapping(SPEC, ENTITY).apply(cols)
    assert mapped.canonical.to_pylist()[0]["size"] is None
    assert len(mapped.rejected) == 0


def test_builtin_catalog_is_consistent() -> None:
    catalog = load_catalog()
    assert {"contact", "company", "deal", "ticket", "user"} <= set(catalog.entities)
    assert catalog.entity_for("crm", "contacts").name == "contact"


def test_mapping_errors_name_file_and_field(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: {service: crm, table: contacts}\nentity: contact\n"
                   "fields:\n  id: {path: id}\n  updated_at: {path: u}\n  nope: {path: x}\n")
    from canonflow.errors import ConfigError
    with pytest.raises(ConfigError, match=r"bad.yaml: field 'nope' is not a field of entity"):
        load_catalog([tmp_path])

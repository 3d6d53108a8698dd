"""Money in minor units, unknown enum values kept raw, and how a mapping says so."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from canonflow.errors import ConfigError
from canonflow.mappings import Entity, FieldDef, FieldRule, MappingSpec, load_catalog
from canonflow.mappings.catalog import SourceRef
from canonflow.transform.mapping import CompiledMapping, PathColumns

ENTITY = Entity(name="bill", primary_key="id", ordering="updated_at", fields={
    "id": FieldDef(type="string", required=True),
    "currency": FieldDef(type="string"),
    "amount": FieldDef(type="decimal"),
    "stage": FieldDef(type="enum", values=["lead", "customer", "other"]),
    "stage_raw": FieldDef(type="string"),
    "updated_at": FieldDef(type="timestamp", required=True),
})


def _map(columns: dict[str, list[object]], **rules: FieldRule) -> tuple[list[dict[str, object]],
                                                                         dict[str, int]]:
    fields = {"id": FieldRule(path="id"), "currency": FieldRule(path="currency"),
              "amount": FieldRule(path="amount", minor_units="currency"),
              "stage": FieldRule(path="stage", values={"customer": "customer"},
                                 unknown="other"),
              "updated_at": FieldRule(path="ts", unit="s"), **rules}
    spec = MappingSpec(source=SourceRef(service="s", table="bills"), entity="bill",
                       fields=fields)
    n = len(columns["id"])
    cols = {"ts": pa.array([1_700_000_000] * n), **{k: pa.array(v) for k, v in columns.items()}}
    mapped = CompiledMapping(spec, ENTITY).apply(PathColumns(cols, n))
    assert len(mapped.rejected) == 0
    return mapped.canonical.select(["id", "amount", "stage", "stage_raw"]).to_pylist(), \
        mapped.nulled


def test_minor_units_become_major_units_by_the_currencys_exponent() -> None:
    rows, nulled = _map({
        "id": ["usd", "jpy", "kwd", "eur", "krw", "none", "bad"],
        "currency": ["usd", "jpy", "KWD", "eur", "krw", None, "usd"],
        "amount": [223757, 349, 1234, -5, 1_000_000, 100, None],
        "stage": ["customer"] * 7})
    assert [(r["id"], r["amount"]) for r in rows] == [
        ("usd", Decimal("2237.570000")), ("jpy", Decimal("349.000000")),
        ("kwd", Decimal("1.234000")), ("eur", Decimal("-0.050000")),
        ("krw", Decimal("1000000.000000")), ("none", None), ("bad", None)]
    # an amount without a currency cannot be converted: null, counted
    assert nulled == {"amount: cannot cast 'amount' to decimal": 1}


def test_minor_units_from_numeric_text_and_exponent_overrides() -> None:
    rows, _ = _map({"id": ["a", "b"], "currency": ["mga", "usd"], "amount": ["1500", "1500"],
                    "stage": [None, None]},
                   amount=FieldRule(path="amount", minor_units="currency",
                                    exponents={"MGA": 0}))
    assert [r["amount"] for r in rows] == [Decimal("1500"), Decimal("15")]


def test_unknown_enum_values_map_to_other_and_keep_the_raw_value() -> None:
    rows, nulled = _map({"id": ["1", "2", "3", "4"], "currency": ["usd"] * 4,
                         "amount": [1] * 4, "stage": ["customer", "12345678", None, ""]})
    assert [(r["stage"], r["stage_raw"]) for r in rows] == [
        ("customer", None), ("other", "12345678"), (None, None), (None, None)]
    assert nulled == {"stage: cannot cast 'stage' to enum (one of lead, customer, other); "
                      "mapped to 'other'": 1}


def _catalog_with(tmp_path: Path, body: str) -> None:
    (tmp_path / "m.yaml").write_text(body)
    load_catalog([tmp_path])


@pytest.mark.parametrize(("rule", "message"), [
    ("lifecycle_stage: {path: s, unknown: vip}",
     "unknown 'vip' is not a value of the enum"),
    ("email: {path: e, unknown: quarantine}", "unknown is for enum fields"),
    ("email: {path: e, minor_units: currency}", "minor_units is for decimal or float"),
    ("updated_at: {path: u, on_error: 'null'}", "is required: a value that cannot be cast"),
])
def test_mapping_options_are_checked_at_load(tmp_path: Path, rule: str, message: str) -> None:
    body = ("source: {service: x, table: people}\nentity: contact\nfields:\n"
            "  id: {path: id}\n  " + rule + "\n")
    if "updated_at" not in rule:
        body += "  updated_at: {path: u}\n"
    with pytest.raises(ConfigError, match=message):
        _catalog_with(tmp_path, body)


def test_major_units_are_exact_in_float_columns_too() -> None:
    from canonflow.transform.mapping import exponents, major_units

    exp = exponents(pa.array(["usd", "JPY", "kwd", "usd", "xx", None]))
    assert exp.to_pylist() == [2, 0, 3, 2, None, None]
    out = major_units(pa.array([223757, 349, 1234, 10.5, 100, 100]), exp)
    assert out.to_pylist() == [2237.57, 349.0, 1.234, None, None, None]

"""Every feature of the mapping language, and every way a value can fail."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from canonflow.chunk import encode_batch
from canonflow.errors import ConfigError
from canonflow.mappings import Entity, FieldDef, FieldRule, MappingSpec, load_catalog
from canonflow.mappings.catalog import ChildMapping, SourceRef
from canonflow.transform.mapping import CompiledMapping
from canonflow.transform.reader import read_raw

ENTITY = Entity(name="thing", primary_key="id", ordering="updated_at", fields={
    "id": FieldDef(type="string", required=True),
    "name": FieldDef(type="string"),
    "email": FieldDef(type="string"),
    "kind": FieldDef(type="enum", values=["small", "large"]),
    "first_tag": FieldDef(type="string"),
    "tags": FieldDef(type="string"),
    "source": FieldDef(type="string"),
    "seen_at": FieldDef(type="timestamp"),
    "score": FieldDef(type="float"),
    "updated_at": FieldDef(type="timestamp", required=True),
})
CHILD = Entity(name="thing_tag", primary_key=["thing_id", "tag"], ordering="updated_at",
               fields={"thing_id": FieldDef(type="string", required=True),
                       "tag": FieldDef(type="string", required=True),
                       "weight": FieldDef(type="int"),
                       "updated_at": FieldDef(type="timestamp", required=True)})
SPEC = MappingSpec(
    source=SourceRef(service="svc", table="things"), entity="thing",
    fields={
        "id": FieldRule(path="id"),
        "name": FieldRule(template="{first} {last}"),
        "email": FieldRule(coalesce=["work.email", "home.email"]),
        "kind": FieldRule(path="size", values={"S": "small", "L": "large"}),
        "first_tag": FieldRule(path="tags", array="first"),
        "tags": FieldRule(path="tags", array="join", separator="|"),
        "source": FieldRule(value="import"),
        "seen_at": FieldRule(path="seen_ms", unit="ms"),
        "score": FieldRule(path="score", nulls=["n/a", ""]),
        "updated_at": FieldRule(path="updated_at"),
    },
    children=[ChildMapping(entity="thing_tag", explode="labels", fields={
        "thing_id": FieldRule(path="id"), "tag": FieldRule(path="$item.name"),
        "weight": FieldRule(path="$item.weight"), "updated_at": FieldRule(path="updated_at")})],
)
TS = "2026-01-01T00:00:00Z"


def record(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "1", "first": "Ada", "last": "Lovelace", "work": {"email": "w@x"},
        "home": {"email": "h@x"}, "size": "S", "tags": ["a", "b"], "seen_ms": 1_500,
        "score": "2.5", "labels": [{"name": "x", "weight": 1}], "updated_at": TS}
    base.update(kw)
    return base


def apply(*records: dict[str, object]):
    """Through the real read path: JSON Lines → reader (fast or slow path) → mapping."""
    compiled = CompiledMapping(SPEC, ENTITY, {"thing": ENTITY, "thing_tag": CHILD})
    data = encode_batch([orjson.dumps(r) for r in records])
    source = read_raw("raw/t/s/things/j/c/part-00000.jsonl.zst", data, compiled.paths).columns
    return compiled, source, compiled.apply(source)


def test_every_feature_on_a_good_record() -> None:
    _, _, mapped = apply(record())
    (row,) = mapped.canonical.to_pylist()
    assert row == {
        "id": "1", "name": "Ada Lovelace", "email": "w@x", "kind": "small", "first_tag": "a",
        "tags": "a|b", "source": "import",
        "seen_at": datetime(1970, 1, 1, 0, 0, 1, 500_000, tzinfo=UTC), "score": 2.5,
        "updated_at": datetime(2026, 1, 1, tzinfo=UTC)}


def test_coalesce_takes_the_first_non_null_path() -> None:
    _, _, mapped = apply(record(work={"email": None}), record(id="2", work=None))
    assert mapped.canonical.column("email").to_pylist() == ["h@x", "h@x"]


def test_template_with_missing_parts_is_trimmed() -> None:
    _, _, mapped = apply(record(last=None), record(id="2", first=None, last=None),
                         record(id="3", first="", last="Hopper"),
                         record(id="4", first="  ", last=""))
    assert mapped.canonical.column("name").to_pylist() == ["Ada", None, "Hopper", None]


def test_arrays_first_and_join_handle_empty_and_null_lists() -> None:
    _, _, mapped = apply(record(tags=[]), record(id="2", tags=None), record(id="3", tags=["z"]))
    assert mapped.canonical.column("first_tag").to_pylist() == [None, None, "z"]
    assert mapped.canonical.column("tags").to_pylist() == ["", None, "z"]


def test_null_markers_become_null_not_failures() -> None:
    _, _, mapped = apply(record(score="n/a"), record(id="2", score=""))
    assert mapped.canonical.column("score").to_pylist() == [None, None]
    assert len(mapped.rejected) == 0


def test_enum_value_not_allowed_becomes_null_and_is_counted() -> None:
    _, _, mapped = apply(record(size="XL"), record(id="2", size="large"))
    assert mapped.canonical.column("kind").to_pylist() == [None, "large"]
    assert len(mapped.rejected) == 0
    assert mapped.nulled == {"kind: cannot cast 'size' to enum (one of small, large)": 1}


def test_enum_value_not_allowed_is_quarantined_when_the_mapping_says_so() -> None:
    rules = {**SPEC.fields, "kind": FieldRule(path="size", values={"S": "small"},
                                              unknown="quarantine")}
    compiled = CompiledMapping(SPEC.model_copy(update={"fields": rules, "children": []}),
                               ENTITY)
    data = encode_batch([orjson.dumps(r) for r in (record(size="XL"), record(id="2"))])
    source = read_raw("raw/t/s/things/j/c/part-00000.jsonl.zst", data, compiled.paths).columns
    mapped = compiled.apply(source)
    assert mapped.canonical.column("kind").to_pylist() == ["small"]
    assert mapped.fields.to_pylist() == ["kind"]
    assert mapped.reasons.to_pylist() == ["cannot cast 'size' to enum (one of small, large)"]
    assert mapped.nulled == {}


@pytest.mark.parametrize(("patch", "field", "reason"), [
    ({"id": None}, "id", "required field 'id' is missing"),
    ({"updated_at": "yesterday"}, "updated_at", "cannot cast 'updated_at' to timestamp"),
    ({"updated_at": ""}, "updated_at", "required field 'updated_at' is missing"),
])
def test_each_failure_of_a_required_field_names_field_and_reason(patch, field, reason) -> None:
    _, _, mapped = apply(record(**patch), record(id="ok"))
    assert mapped.canonical.column("id").to_pylist() == ["ok"]
    assert (mapped.fields.to_pylist(), mapped.reasons.to_pylist()) == ([field], [reason])


@pytest.mark.parametrize(("patch", "field", "reason"), [
    ({"score": "high"}, "score", "cannot cast 'score' to float"),
    ({"seen_ms": "soon"}, "seen_at", "cannot cast 'seen_ms' to timestamp"),
    ({"size": {"nested": 1}}, "kind", "cannot cast 'size' to enum (one of small, large)"),
])
def test_an_optional_field_that_cannot_be_cast_is_null_with_its_reason_counted(
        patch, field, reason) -> None:
    _, _, mapped = apply(record(**patch), record(id="ok"), record(id="bad", updated_at="x",
                                                                  **patch))
    assert mapped.canonical.column("id").to_pylist() == ["1", "ok"]
    assert mapped.canonical.column(field).to_pylist()[0] is None
    assert mapped.canonical.column(field).to_pylist()[1] is not None
    # the record quarantined for its required field does not count as nulled
    assert mapped.nulled == {f"{field}: {reason}": 1}
    assert mapped.fields.to_pylist() == ["updated_at"]

    rules = {**SPEC.fields, field: SPEC.fields[field].model_copy(update={"on_error":
                                                                          "quarantine"})}
    if field == "kind":
        rules[field] = rules[field].model_copy(update={"unknown": "quarantine"})
    compiled = CompiledMapping(SPEC.model_copy(update={"fields": rules, "children": []}),
                               ENTITY)
    data = encode_batch([orjson.dumps(r) for r in (record(**patch), record(id="ok"))])
    source = read_raw("raw/t/s/things/j/c/part-00000.jsonl.zst", data, compiled.paths).columns
    strict = compiled.apply(source)
    assert strict.canonical.column("id").to_pylist() == ["ok"]
    assert (strict.fields.to_pylist(), strict.reasons.to_pylist()) == ([field], [reason])


def test_empty_text_is_null_unless_kept() -> None:
    _, _, mapped = apply(record(work={"email": ""}, home={"email": "h@x"}),
                         record(id="2", work={"email": " "}, home={"email": ""}))
    assert mapped.canonical.column("email").to_pylist() == ["h@x", None]
    rules = {**SPEC.fields, "email": FieldRule(path="work.email", empty="keep")}
    compiled = CompiledMapping(SPEC.model_copy(update={"fields": rules, "children": []}),
                               ENTITY)
    data = encode_batch([orjson.dumps(record(work={"email": ""}))])
    source = read_raw("raw/t/s/things/j/c/part-00000.jsonl.zst", data, compiled.paths).columns
    assert compiled.apply(source).canonical.column("email").to_pylist() == [""]


def test_explode_into_a_child_entity_keeps_only_good_parents() -> None:
    compiled, source, mapped = apply(
        record(labels=[{"name": "x", "weight": 1}, {"name": "y", "weight": 2}]),
        record(id="2", labels=[]), record(id="bad", updated_at="never",
                                          labels=[{"name": "z", "weight": 3}]))
    (child,) = compiled.apply_children(source, mapped.kept)
    assert child.entity.name == "thing_tag"
    assert child.rows.select(["thing_id", "tag", "weight"]).to_pylist() == [
        {"thing_id": "1", "tag": "x", "weight": 1}, {"thing_id": "1", "tag": "y", "weight": 2}]
    assert child.parents.to_pylist() == [0, 0]
    assert len(child.rejected_parents) == 0  # the bad parent's child is not even mapped


def test_a_rule_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one of path, coalesce, template, value"):
        FieldRule(path="a", value=1)
    with pytest.raises(ValueError, match="got none"):
        FieldRule()


def write(folder: Path, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "m.yaml").write_text(text)
    return folder


def test_mapping_errors_name_the_file_and_field(tmp_path: Path) -> None:
    bad_enum = write(tmp_path / "a", "source: {service: crm, table: deals}\nentity: deal\n"
                     "fields:\n  id: {path: id}\n  updated_at: {path: u}\n"
                     "  stage: {path: s, values: {x: maybe}}\n")
    with pytest.raises(ConfigError, match=r"m.yaml: field 'stage': value map targets \['maybe'\]"):
        load_catalog([bad_enum])
    two_sources = write(tmp_path / "b", "source: {service: crm, table: deals}\nentity: deal\n"
                        "fields:\n  id: {path: id, value: 3}\n  updated_at: {path: u}\n")
    with pytest.raises(ConfigError, match=r"m.yaml: at fields.id: Value error, give exactly"):
        load_catalog([two_sources])
    missing = write(tmp_path / "c", "source: {service: crm, table: deals}\nentity: deal\n"
                    "fields:\n  id: {path: id}\n")
    with pytest.raises(ConfigError,
                       match=r"required fields of 'deal' not mapped: \['updated_at'\]"):
        load_catalog([missing])


def test_generated_entity_docs_are_current() -> None:
    from canonflow.mappings.docs import entities_markdown

    docs = Path(__file__).resolve().parents[2] / "docs" / "entities.md"
    assert docs.read_text() == entities_markdown(load_catalog()), \
        "docs/entities.md is stale: run `canonflow entities --markdown > docs/entities.md`"
    for entity in ("contact", "company", "deal", "ticket", "user", "invoice"):
        assert f"## {entity}\n" in docs.read_text()


def test_a_zone_applies_to_timestamps_without_an_offset_only_through_the_read_path() -> None:
    """pyarrow.json turns ISO text into UTC instants, with an offset or without; a field
    with a zone of its own is read as text, so the zone applies to local times only (the
    parent's field and a child's ``$item`` field alike)."""
    entity = ENTITY.model_copy(update={"fields": {
        "id": FieldDef(type="string", required=True),
        "seen_at": FieldDef(type="timestamp"),
        "updated_at": FieldDef(type="timestamp", required=True)}})
    child = CHILD.model_copy(update={"fields": {
        **CHILD.fields, "updated_at": FieldDef(type="timestamp", required=True)}})
    spec = MappingSpec(
        source=SourceRef(service="svc", table="things"), entity="thing", fields={
            "id": FieldRule(path="id"),
            "seen_at": FieldRule(path="meta.seen", timezone="America/New_York"),
            "updated_at": FieldRule(path="updated_at")},
        children=[ChildMapping(entity="thing_tag", explode="labels", fields={
            "thing_id": FieldRule(path="id"), "tag": FieldRule(path="$item.name"),
            "updated_at": FieldRule(path="$item.at", timezone="America/New_York")})])
    compiled = CompiledMapping(spec, entity, {"thing": entity, "thing_tag": child})
    assert compiled.text_paths == ["labels.[].at", "meta.seen"]
    seen = ["2026-01-01T00:00:00Z", "2026-01-01T02:00:00+02:00", "2026-01-01T00:00:00"]
    data = encode_batch([orjson.dumps({
        "id": str(i), "meta": {"seen": s, "other": 1}, "updated_at": TS,
        "labels": [{"name": "x", "at": s}]}) for i, s in enumerate(seen)])
    raw = read_raw("raw/t/s/things/j/c/part-00000.jsonl.zst", data, compiled.paths,
                   compiled.text_paths)
    assert raw.lines is None  # the fast path
    mapped = compiled.apply(raw.columns)
    midnight, five = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 5, tzinfo=UTC)
    assert mapped.canonical.column("seen_at").to_pylist() == [midnight, midnight, five]
    (tags,) = compiled.apply_children(raw.columns, mapped.kept)
    assert tags.rows.column("updated_at").to_pylist() == [midnight, midnight, five]
    # a value there that is not text (an epoch number) takes the slow path: still mapped
    data = encode_batch([orjson.dumps({"id": "1", "meta": {"seen": 0}, "updated_at": TS})])
    raw = read_raw("raw/t/s/things/j/c/part-00000.jsonl.zst", data, compiled.paths,
                   compiled.text_paths)
    assert compiled.apply(raw.columns).canonical.column("seen_at").to_pylist() == [
        datetime(1970, 1, 1, tzinfo=UTC)]


def test_iso_text_of_any_precision_maps_with_or_without_an_offset() -> None:
    """A date alone (midnight), hours, minutes, seconds, fractions; offsets Z, +02, +0200,
    +02:00: what pyarrow.json parsed before a zone made the field text, text maps too."""
    entity = ENTITY.model_copy(update={"fields": {
        "id": FieldDef(type="string", required=True),
        "seen_at": FieldDef(type="timestamp"),
        "updated_at": FieldDef(type="timestamp", required=True)}})
    spec = MappingSpec(
        source=SourceRef(service="svc", table="things"), entity="thing", fields={
            "id": FieldRule(path="id"),
            "seen_at": FieldRule(path="seen", timezone="America/New_York"),
            "updated_at": FieldRule(path="updated_at")})
    compiled = CompiledMapping(spec, entity, {"thing": entity})
    cases = {"2026-01-01": (5, 0), "2026-01-01T10": (15, 0), "2026-01-01 10:30": (15, 30),
             "2026-01-01T10:30:00.250": (15, 30), "2026-01-01T10:30Z": (10, 30),
             "2026-01-01T10+02": (8, 0), "2026-01-01T10:30:00+0200": (8, 30)}
    data = encode_batch([orjson.dumps({"id": str(i), "seen": text, "updated_at": TS})
                         for i, text in enumerate(cases)])
    raw = read_raw("raw/t/s/things/j/c/part-00000.jsonl.zst", data, compiled.paths,
                   compiled.text_paths)
    mapped = compiled.apply(raw.columns)
    got = mapped.canonical.column("seen_at").to_pylist()
    assert [(t.hour, t.minute) for t in got] == list(cases.values()), got
    assert got[3].microsecond == 250_000
    assert not any(mapped.nulled.values()) and len(mapped.rejected) == 0

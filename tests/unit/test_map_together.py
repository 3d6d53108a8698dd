"""Several files mapped in one pass give each file exactly what mapping it alone gives:
good rows, rejected rows with their reasons and keys, nulled-field counts, deletions,
child rows (good and rejected) and the unmapped fields kept as JSON."""

from __future__ import annotations

from typing import Any

import orjson

from canonflow.chunk import encode_batch
from canonflow.mappings import Entity, FieldDef, FieldRule, MappingSpec
from canonflow.mappings.catalog import EXTRA, ChildMapping, DeletedRule, SourceRef
from canonflow.transform.mapping import ChildMapped, CompiledMapping, Mapped
from canonflow.transform.reader import RawFile, read_raw
from canonflow.transform.together import map_together

ENTITY = Entity(name="thing", primary_key="id", ordering="updated_at", fields={
    "id": FieldDef(type="string", required=True),
    "name": FieldDef(type="string"),
    "size": FieldDef(type="int"),
    "updated_at": FieldDef(type="timestamp", required=True),
    EXTRA: FieldDef(type="string"),
})
CHILD = Entity(name="thing_tag", primary_key=["thing_id", "tag"], ordering="updated_at",
               fields={"thing_id": FieldDef(type="string", required=True),
                       "tag": FieldDef(type="string", required=True),
                       "updated_at": FieldDef(type="timestamp", required=True)})
SPEC = MappingSpec(
    source=SourceRef(service="svc", table="things"), entity="thing", keep_unmapped=True,
    deleted=DeletedRule(path="gone"),
    fields={"id": FieldRule(path="id"), "name": FieldRule(path="name"),
            "size": FieldRule(path="size"), "updated_at": FieldRule(path="updated_at")},
    children=[ChildMapping(entity="thing_tag", explode="tags", fields={
        "thing_id": FieldRule(path="id"), "tag": FieldRule(path="$item"),
        "updated_at": FieldRule(path="updated_at")})],
)
TS = "2026-01-01T00:00:00Z"


def thing(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": str(i), "name": f"n{i}", "size": str(i), "updated_at": TS, "gone": False,
            "tags": ["a", "b"], "note": f"x{i}", **kw}


def raw(n: int, records: list[dict[str, Any]]) -> RawFile:
    data = encode_batch([orjson.dumps(r) for r in records])
    return read_raw(f"raw/t/svc/things/j/c-{n}/part-00000.jsonl.zst", data,
                    compiled().paths, compiled().text_paths)


def compiled() -> CompiledMapping:
    return CompiledMapping(SPEC, ENTITY, {"thing": ENTITY, "thing_tag": CHILD})


def plain(m: Mapped) -> dict[str, Any]:
    return {"canonical": m.canonical.to_pylist(), "rejected": m.rejected.to_pylist(),
            "reasons": m.reasons.to_pylist(), "fields": m.fields.to_pylist(),
            "kept": m.kept.to_pylist(), "keys": m.keys.to_pylist(), "nulled": m.nulled,
            "deleted": None if m.deleted is None else m.deleted.to_pylist(),
            "deleted_at": None if m.deleted_at is None else m.deleted_at.to_pylist()}


def plain_child(c: ChildMapped) -> dict[str, Any]:
    return {"entity": c.entity.name, "rows": c.rows.to_pylist(),
            "parents": c.parents.to_pylist(), "rejected": c.rejected_parents.to_pylist(),
            "reasons": c.reasons.to_pylist(), "fields": c.fields.to_pylist(),
            "keys": c.keys.to_pylist(), "items": c.items.to_pylist()}


def test_each_file_gets_what_mapping_it_alone_gives() -> None:
    files = [
        raw(0, [thing(1), thing(2, size="big"), thing(3, id=None), thing(4, gone=True)]),
        raw(1, [thing(5, tags=["c", None]), thing(6, updated_at="never")]),
        raw(2, [thing(7), thing(8, size="huge", tags=[])]),
    ]
    files.append(raw(3, [thing(9, name=None, tags=["d"])]))  # like files 0 and 2
    mapping = compiled()
    together = map_together(mapping, files)
    # file 1's updated_at is text (one value is no timestamp), the others' timestamps
    assert [part is None for part in together] == [False, True, False, False]
    for f, part in zip(files, together, strict=True):
        if part is None:
            continue
        mapped, children = part
        alone = mapping.apply(f.columns, f.raw_line)
        assert plain(mapped) == plain(alone)
        assert [plain_child(c) for c in children] == [
            plain_child(c) for c in mapping.apply_children(f.columns, alone.kept)]
    # the cases the files hold did happen
    assert together[0] is not None and together[2] is not None
    first = plain(together[0][0])
    assert first["rejected"] == [2] and first["nulled"] == {
        "size: cannot cast 'size' to int": 1}
    assert first["deleted"] == [False, False, True]
    assert orjson.loads(first["canonical"][0][EXTRA]) == {"note": "x1"}  # gone is read
    assert plain(together[2][0])["nulled"] == {"size: cannot cast 'size' to int": 1}
    assert plain_child(together[2][1][0])["parents"] == [0, 0]


def test_files_no_other_file_shares_column_types_with_are_mapped_alone() -> None:
    files = [raw(0, [thing(1, size=1)]), raw(1, [thing(2, size="2")])]
    assert map_together(compiled(), files) == [None, None]
    assert map_together(compiled(), files[:1]) == [None]  # one file: nothing to share
    broken = RawFile("k", files[0].columns, None, b"", broken=[(0, b"{", "bad")])
    assert map_together(compiled(), [files[0], broken]) == [None, None]


def test_a_column_absent_or_all_null_in_one_file_agrees_with_any() -> None:
    files = [raw(0, [thing(1)]), raw(1, [{k: v for k, v in thing(2).items() if k != "name"}]),
             raw(2, [thing(3, name=None, tags=None)])]
    mapping = compiled()
    together = map_together(mapping, files)
    for f, part in zip(files, together, strict=True):
        assert part is not None
        alone = mapping.apply(f.columns, f.raw_line)
        assert plain(part[0]) == plain(alone)
        assert [plain_child(c) for c in part[1]] == [
            plain_child(c) for c in mapping.apply_children(f.columns, alone.kept)]
    assert [p[0].canonical.column("name").to_pylist() for p in together if p] == [
        ["n1"], [None], [None]]

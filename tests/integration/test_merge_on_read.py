"""Merge-on-read canonical tables: changed records land as new versions (no file holding the
old one is rewritten), yet every reader through ``canonflow query`` sees exactly what a
copy-on-write table shows; a fold brings the partition back to one row per key."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from deltalake import DeltaTable

from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.model import TransformRequest
from canonflow.query import Scan, run_query
from canonflow.runtime import Runtime
from canonflow.transform.run import run_transform
from canonflow.transform.versions import CanonicalWrites
from tests.jobs import run_job

ENTITY = "canonical/contact"
CURRENT = ("SELECT _tenant_id, id, email, updated_at, _deleted_at IS NULL AS live "
           "FROM contact ORDER BY _tenant_id, id")


def runtime(root: Path, writes: CanonicalWrites, **overrides: Any) -> Runtime:
    return Runtime(Settings(object_store=f"file://{root}", state_store=f"sqlite:///{root}/s.db",
                            canonical_writes=writes, **overrides))


def contact(i: int, version: int | None) -> bytes:
    """Contact ``i`` as of ``version`` (its ordering; None: no updated_at). The same
    version always has the same values."""
    record: dict[str, Any] = {"id": str(i), "properties": {"email": f"c{i}-v{version}@x"}}
    if version is not None:
        record["updated_at"] = f"2026-01-{version:02d}T00:00:00Z"
    return orjson.dumps(record)


def sync(rt: Runtime, job: str, lines: list[bytes], tenant: str = "acme") -> None:
    key = f"raw/{tenant}/crm/contacts/{job}/c-0/part-00000.jsonl.zst"
    rt.objects.put(key, encode_batch(lines))
    result = run_transform(TransformRequest(
        tenant_id=tenant, service_name="crm", table_name="contacts", job_id=job,
        request_id=f"{job}:{tenant}", source_files=[key]), rt)
    assert result.records_read == result.records_written + result.records_quarantined \
        + result.records_merged


def delta_rows(rt: Runtime, version: int | None = None) -> int:
    uri, opts = rt.canonical.uri(ENTITY)
    return int(DeltaTable(uri, version=version, storage_options=opts or None)
               .to_pyarrow_table().num_rows)


def test_any_sequence_of_syncs_reads_as_copy_on_write(tmp_path: Path) -> None:
    """Random syncs (older, equal, newer and missing orderings; new keys; two tenants) give
    the same answers in both modes, while merge-on-read holds more than one version."""
    rng = random.Random(20261126)
    cow = runtime(tmp_path / "cow", "copy_on_write")
    mor = runtime(tmp_path / "mor", "merge_on_read")
    for n in range(12):
        for tenant in ("acme", "globex"):
            keys = rng.sample(range(40), 15)
            lines = [contact(k, rng.choice([None, 1, 2, 3, 4, 5, 6])) for k in keys]
            for rt in (cow, mor):
                sync(rt, f"job-{n}", lines, tenant)
        assert run_query(mor.canonical._store, CURRENT) == run_query(cow.canonical._store,
                                                                     CURRENT)
    assert delta_rows(mor) > delta_rows(cow)  # versions, not rewrites
    (count,) = run_query(mor.canonical._store, "SELECT count(*) FROM contact")[1]
    assert count == (delta_rows(cow),)
    for rt in (cow, mor):
        rt.close()


def test_an_unchanged_record_adds_no_version_and_a_deleted_one_comes_back(
        tmp_path: Path) -> None:
    rt = runtime(tmp_path, "merge_on_read")
    sync(rt, "job-1", [contact(i, 1) for i in range(10)])
    sync(rt, "job-2", [contact(i, 1) for i in range(10)])  # the same versions again
    assert delta_rows(rt) == 10
    sync(rt, "job-3", [contact(i, 2) for i in range(3)])
    assert delta_rows(rt) == 13
    assert rt.canonical.mark_deleted(
        _entity(), "acme", "crm", _marks(["0", "1"], "job-4"), "job-4:r", "4/delete") == 2
    assert run_query(rt.canonical._store, "SELECT id FROM contact WHERE _deleted_at IS NOT "
                                          "NULL ORDER BY id")[1] == [("0",), ("1",)]
    sync(rt, "job-5", [contact(0, 2)])  # listed again, same version: it is back
    assert run_query(rt.canonical._store, "SELECT id, email FROM contact WHERE _deleted_at "
                                          "IS NOT NULL")[1] == [("1", "c1-v2@x")]
    rt.close()


def test_a_fold_keeps_the_answers_and_time_travel(tmp_path: Path) -> None:
    rt = runtime(tmp_path, "merge_on_read", compact_after_files=0)
    for n in range(1, 6):
        sync(rt, f"job-{n}", [contact(i, n) for i in range(0, 200, n)])
    sync(rt, "job-b", [contact(i, 1) for i in range(50)], tenant="globex")
    before = run_query(rt.canonical._store, CURRENT)
    uri, opts = rt.canonical.uri(ENTITY)
    version = DeltaTable(uri, storage_options=opts or None).version()
    held = delta_rows(rt)
    assert held > 250
    assert rt.canonical.compact(ENTITY, "acme", max_files=0) > 0
    assert run_query(rt.canonical._store, CURRENT) == before
    assert delta_rows(rt) == 250  # one row per key: 200 of acme, 50 of globex
    assert delta_rows(rt, version) == held  # the versions are still there to time travel
    rt.close()


def test_a_replayed_group_adds_no_version(tmp_path: Path) -> None:
    """A crash after a group's commit and before the request is marked done: the replay
    finds the group's label in the table's history and writes nothing again."""
    rt = runtime(tmp_path, "merge_on_read")
    sync(rt, "job-1", [contact(i, 1) for i in range(20)])
    rows = _rows([("3", 2), ("4", 2)])
    writer = rt.canonical
    writer.upsert(_entity(), "acme", "crm", rows, "req-2", 0)
    held = delta_rows(rt)
    assert held == 22
    done = writer.committed_groups(ENTITY, "req-2")
    assert done == {"0/merge"}
    writer.upsert(_entity(), "acme", "crm", rows, "req-2", 0, done)
    assert delta_rows(rt) == held
    rt.close()


def test_a_tenant_query_opens_only_that_tenants_files(tmp_path: Path) -> None:
    rt = runtime(tmp_path, "merge_on_read", compact_after_files=0)
    for tenant in ("acme", "globex", "initech"):
        for n in (1, 2):
            sync(rt, f"job-{n}", [contact(i, n) for i in range(0, 30, n)], tenant)
    scan = Scan()
    _, rows = run_query(rt.canonical._store, "SELECT count(*), count(DISTINCT id), "
                        "max(email) FILTER (WHERE id = '2') FROM contact "
                        "WHERE _tenant_id = 'globex'", scan=scan)
    assert rows == [(30, 30, "c2-v2@x")]
    uri, opts = rt.canonical.uri(ENTITY)
    mine = DeltaTable(uri, storage_options=opts or None).file_uris(
        file_pruning_predicate=[("_tenant_id", "=", "globex")])
    assert scan.files_read == len(mine) == 2
    assert scan.total == 6
    # every version stays queryable
    _, versions = run_query(rt.canonical._store, "SELECT count(*) FROM contact__versions "
                                                 "WHERE _tenant_id = 'globex'")
    assert versions == [(45,)]
    rt.close()


def test_a_pipeline_written_merge_on_read_counts_each_record_once(make_settings: Any) -> None:
    settings = make_settings(canonical_writes="merge_on_read")
    for _ in range(2):  # the second sync: every record again, same versions
        rt, _ = run_job(settings)
        rt.close()
    rt = Runtime(settings)
    for entity in ("contact", "company", "deal", "ticket", "user"):
        _, rows = run_query(rt.canonical._store,
                            f"SELECT count(*) = count(DISTINCT id), count(*) > 0 FROM \"{entity}\"")
        assert rows == [(True, True)], entity
    rt.close()


def _entity() -> Any:
    from canonflow.mappings import load_catalog

    return load_catalog([]).entities["contact"]


def _rows(versions: list[tuple[str, int]]) -> pa.Table:
    from canonflow.transform.mapping import entity_schema

    schema = entity_schema(_entity())
    data = {name: [None] * len(versions) for name in schema.names}
    data["id"] = [k for k, _ in versions]
    data["email"] = [f"c{k}-v{v}@x" for k, v in versions]
    data["updated_at"] = [f"2026-01-{v:02d}T00:00:00+00:00" for _, v in versions]
    data["_tenant_id"] = ["acme"] * len(versions)
    data["_service_name"] = ["crm"] * len(versions)
    table = pa.table({n: pa.array(data[n], pa.string()) for n in schema.names})
    return table.cast(schema)


def _marks(keys: list[str], job: str) -> pa.Table:
    return pa.table({"id": keys, "_deleted_at": pa.array(
        ["2026-02-01T00:00:00+00:00"] * len(keys), pa.string()).cast(
        pa.timestamp("us", tz="UTC")), "_job_id": [job] * len(keys)})

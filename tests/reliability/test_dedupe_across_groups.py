"""Invariant 5 across the groups of one request: a record extracted twice (it moved pages
between requests) lands once, newest wins, and the accounting of invariant 6 still balances,
also when the request is resumed after a crash between its groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.model import TransformRequest, TransformResult
from canonflow.query import run_query
from canonflow.runtime import Runtime
from canonflow.stores.sql import outbox
from canonflow.transform.run import run_transform

OLD, NEW, NEWEST = "2026-03-01T10:00:00Z", "2026-03-02T10:00:00Z", "2026-03-03T10:00:00Z"


def contact(i: int, name: str = "first", ts: str = OLD) -> bytes:
    return orjson.dumps({"id": str(i), "properties": {"firstname": name, "lastname": "X"},
                         "updated_at": ts})


@pytest.fixture(params=["copy_on_write", "merge_on_read"])
def rt(tmp_path: Path, request: pytest.FixtureRequest) -> Runtime:
    # groups of 4 records: each file below is one group
    return Runtime(Settings(object_store=f"file://{tmp_path}/data",
                            state_store=f"sqlite:///{tmp_path}/data/state.db",
                            canonical_writes=request.param,
                            transform_group_records=4))


def put(rt: Runtime, job: str, part: int, lines: list[bytes]) -> str:
    key = f"raw/acme/crm/contacts/{job}/c-0/part-{part:05d}.jsonl.zst"
    rt.objects.put(key, encode_batch(lines))
    return key


def transform(rt: Runtime, files: list[str], job: str = "job-1") -> TransformResult:
    return run_transform(TransformRequest(
        tenant_id="acme", service_name="crm", table_name="contacts", job_id=job,
        source_files=files, request_id=f"{job}:crm:contacts"), rt)


def contacts(rt: Runtime) -> list[tuple[Any, ...]]:
    return run_query(rt.canonical._store,
                     "SELECT id, first_name FROM contact ORDER BY id, first_name")[1]


def balanced(r: TransformResult) -> bool:
    return r.records_read == r.records_written + r.records_quarantined + r.records_merged


@pytest.mark.parametrize(("first", "second", "winner"), [
    ((OLD, "older"), (NEW, "newer"), "newer"),   # the later group holds the newer version
    ((NEW, "newer"), (OLD, "older"), "newer"),   # the earlier group does
])
def test_a_record_in_two_groups_lands_once_newest_wins(
        rt: Runtime, first: tuple[str, str], second: tuple[str, str], winner: str) -> None:
    files = [
        put(rt, "job-1", 0, [contact(0), contact(1), contact(2, first[1], first[0]),
                             contact(3)]),
        put(rt, "job-1", 1, [contact(4), contact(5), contact(2, second[1], second[0]),
                             contact(6)]),
    ]
    result = transform(rt, files)
    assert contacts(rt) == [(str(i), winner if i == 2 else "first") for i in range(7)]
    assert (result.records_read, result.records_written, result.records_quarantined,
            result.records_merged) == (8, 7, 0, 1)
    assert balanced(result)


def test_a_later_request_updates_the_row_newest_wins(rt: Runtime) -> None:
    transform(rt, [put(rt, "job-1", 0, [contact(i) for i in range(4)]),
                   put(rt, "job-1", 1, [contact(i) for i in range(4, 8)])])
    newer = transform(rt, [put(rt, "job-2", 0, [contact(1, "newer", NEW), contact(9)])],
                      job="job-2")
    assert (newer.records_written, newer.records_merged) == (2, 0) and balanced(newer)
    older = transform(rt, [put(rt, "job-3", 0, [contact(1, "stale", OLD)])], job="job-3")
    assert balanced(older)
    rows = contacts(rt)
    assert len(rows) == len({r[0] for r in rows}) == 9
    assert ("1", "newer") in rows


def test_a_request_resumed_after_a_crash_between_groups_keeps_one_row_and_balances(
        rt: Runtime) -> None:
    """Group 1 (holding the record's second version) commits, then the worker dies before
    the request finishes; the re-claimed request skips both committed groups and must still
    count the duplicate as merged, once."""
    files = [
        put(rt, "job-1", 0, [contact(0), contact(1), contact(2, "older", OLD), contact(3)]),
        put(rt, "job-1", 1, [contact(4), contact(5), contact(2, "newer", NEW), contact(6)]),
        put(rt, "job-1", 2, [contact(7)]),
    ]
    writer = rt.canonical
    real_upsert = writer.upsert
    calls = {"n": 0}

    def dying_upsert(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        out = real_upsert(*args, **kw)
        if calls["n"] == 2:
            raise SystemExit("worker killed")  # after group 1 committed
        return out

    writer.upsert = dying_upsert  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        transform(rt, files)
    writer.upsert = real_upsert  # type: ignore[method-assign]
    engine = sa.create_engine(rt.settings.state_store)
    with engine.begin() as conn:  # let the lease expire
        conn.execute(outbox.update().values(updated_at=0))
    engine.dispose()
    result = transform(rt, files)
    assert not result.skipped
    assert contacts(rt) == [(str(i), "newer" if i == 2 else "first") for i in range(8)]
    assert (result.records_read, result.records_written, result.records_merged) == (9, 8, 1)
    assert balanced(result)

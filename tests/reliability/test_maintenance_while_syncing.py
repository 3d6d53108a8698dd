"""Table maintenance while a sync writes the same tenant's table: compaction (or a fold),
vacuum within the retention and checkpoints run over and over next to the writer; no row is
lost, every change lands, and a reader never fails or sees a key twice."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.connectors.demo_api import contact
from canonflow.model import TableRef, TransformRequest, raw_key
from canonflow.query import run_query
from canonflow.runtime import Runtime
from canonflow.transform.run import run_transform
from canonflow.transform.versions import CanonicalWrites

ENTITY = "canonical/contact"
SYNCS = 12
HELD = 1000


def changed(i: int, n: int) -> dict[str, Any]:
    record = contact("acme", i)
    record["properties"]["phone"] = f"+1-555-{n:04d}"
    record["updated_at"] = f"2030-01-01T00:00:{n:02d}Z"
    return record


def sync(rt: Runtime, job: str, records: list[dict[str, Any]]) -> None:
    table = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")
    key = raw_key(table, job, "crm-contacts-00000", 0)
    rt.objects.put(key, encode_batch([orjson.dumps(r) for r in records]))
    run_transform(TransformRequest(tenant_id="acme", service_name="crm",
                                   table_name="contacts", source_files=[key]), rt)


@pytest.mark.parametrize("writes", ["copy_on_write", "merge_on_read"])
def test_maintenance_next_to_a_writer_loses_nothing(tmp_path: Path,
                                                    writes: CanonicalWrites) -> None:
    settings = Settings(object_store=f"file://{tmp_path}/data",
                        state_store=f"sqlite:///{tmp_path}/data/state.db",
                        compact_after_files=0, canonical_writes=writes)
    writer = Runtime(settings)
    sync(writer, "job-0", [contact("acme", i) for i in range(HELD)])
    stop = threading.Event()
    failures: list[BaseException] = []
    seen: list[tuple[int, int]] = []
    replaced: list[int] = []

    def maintain() -> None:
        rt = Runtime(settings)
        try:
            while not stop.is_set():
                replaced.append(rt.canonical.compact(ENTITY, "acme", max_files=1))
                rt.canonical.vacuum(ENTITY, retention_hours=1)
        except BaseException as exc:
            failures.append(exc)
        finally:
            rt.close()

    def read() -> None:
        try:
            while not stop.is_set():
                (row,) = run_query(writer.canonical._store, "SELECT count(*), count(DISTINCT "
                                   "id) FROM contact WHERE _tenant_id = 'acme'")[1]
                seen.append(row)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=maintain), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    try:
        for n in range(1, SYNCS + 1):  # 1% changed and 5 new keys each sync
            records = [changed(i, n) for i in range(n, HELD, 100)]
            records += [contact("acme", HELD + 5 * n + j) for j in range(5)]
            sync(writer, f"job-{n}", records)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not failures, failures
    assert sum(replaced) > 0  # the partition was rewritten while the writer wrote
    assert seen and all(count == distinct for count, distinct in seen)
    assert [c for c, _ in seen] == sorted(c for c, _ in seen)  # rows never go missing
    total = HELD + 5 * SYNCS
    store = writer.canonical._store
    assert run_query(store, "SELECT count(*), count(DISTINCT id) FROM contact")[1] == [
        (total, total)]
    landed = run_query(store, "SELECT count(*) FROM contact WHERE phone = '+1-555-' || "
                              "lpad(second(updated_at)::VARCHAR, 4, '0') "
                              "AND updated_at >= '2030-01-01'")[1]
    assert landed == [(sum(len(range(n, HELD, 100)) for n in range(1, SYNCS + 1)),)]
    writer.close()

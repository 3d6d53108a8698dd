"""Many syncs of one tenant: does anything grow with them?

``python -m bench.syncs CONFIG``: loads ``held`` demo contacts for one tenant, then runs
``syncs`` incremental transforms (1% of the keys changed, spread across the partition, and
10 new keys each), then ``canonflow maintain``'s vacuum with a zero retention. Reports the
most data files the tenant's partition held, the Delta log's files, the time to read the
tenant's table against a freshly written one (same ``writes``: copy_on_write or
merge_on_read), and data files on disk before and after the vacuum.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from deltalake import DeltaTable

from bench.history import TABLE, changed, runtime, write_batches
from canonflow import memory
from canonflow.connectors.demo_api import contact
from canonflow.model import TransformRequest
from canonflow.query import run_query
from canonflow.runtime import Runtime
from canonflow.transform.run import run_transform

ENTITY = "canonical/contact"


def sync(rt: Runtime, job: str, records: list[dict[str, Any]]) -> None:
    run_transform(TransformRequest(
        tenant_id=TABLE.tenant_id, service_name=TABLE.service_name, table_name=TABLE.table_name,
        source_files=write_batches(rt, job, records, 5000)), rt)


def read_seconds(rt: Runtime, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run_query(rt.canonical._store,
                  "SELECT count(*), max(phone) FROM contact WHERE _tenant_id = 'acme'")
        best = min(best, time.perf_counter() - started)
    return best


def main(cfg: dict[str, Any]) -> dict[str, Any]:
    memory.tune()
    root, held, syncs = Path(cfg["root"]), cfg["held"], cfg["syncs"]
    writes = cfg.get("writes", "copy_on_write")
    rt = runtime(root / "synced", writes)
    sync(rt, "job-0", [contact("acme", i) for i in range(held)])
    most, started = 0, time.perf_counter()
    uri, opts = rt.canonical.uri(ENTITY)
    for n in range(1, syncs + 1):
        records = [changed(i) for i in range(n % 100, held, 100)]
        records += [contact("acme", held + 10 * n + j) for j in range(10)]
        sync(rt, f"job-{n}", records)
        files = DeltaTable(uri, storage_options=opts or None).file_uris(
            file_pruning_predicate=[("_tenant_id", "=", "acme")])
        most = max(most, len(files))
    sync_seconds = (time.perf_counter() - started) / syncs
    table_dir = root / "synced" / "canonical" / "contact"
    on_disk = len(list(table_dir.glob("_tenant_id=*/*.parquet")))
    synced_read = read_seconds(rt)
    rt.canonical.vacuum(ENTITY, 0)
    after = len(list(table_dir.glob("_tenant_id=*/*.parquet")))
    log_files = len(list((table_dir / "_delta_log").iterdir()))
    fresh = runtime(root / "fresh", writes)
    total = held + 10 * syncs
    sync(fresh, "job-0", [contact("acme", i) for i in range(total)])
    return {"writes": writes, "held": held, "syncs": syncs, "most_files": most,
            "sync_seconds": sync_seconds,
            "read_seconds": synced_read, "fresh_read_seconds": read_seconds(fresh),
            "files_on_disk": on_disk, "files_after_vacuum": after, "log_files": log_files,
            "version": DeltaTable(uri, storage_options=opts or None).version()}


if __name__ == "__main__":
    cfg = orjson.loads(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        cfg.setdefault("root", tmp)
        print(orjson.dumps(main(cfg)).decode(), flush=True)

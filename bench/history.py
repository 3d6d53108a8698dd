"""Costs that must not grow with history: an incremental sync into a tenant that already
holds many rows, against the same records into an empty table.

``python -m bench.history CONFIG``: loads ``history`` demo contacts for one tenant (not
timed), then times one transform of ``changed`` records — every 100th key of the history,
each with a newer ``updated_at`` and a new phone, so the changes are spread across the whole
partition — and the same records into a fresh table, with ``writes`` copy_on_write or
merge_on_read. Reports seconds, bytes written (the data files the transform's commits
added), files in the tenant's partition, and the seconds of compacting the partition after
(for merge-on-read: the fold back to one row per key).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from deltalake import DeltaTable

from canonflow import memory
from canonflow.chunk import encode_batch
from canonflow.config import Settings
from canonflow.connectors.demo_api import contact
from canonflow.model import TableRef, TransformRequest, raw_key
from canonflow.runtime import Runtime
from canonflow.transform.run import run_transform
from canonflow.transform.versions import CanonicalWrites

TABLE = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")


def changed(i: int) -> dict[str, Any]:
    record = contact("acme", i)
    record["properties"]["phone"] = f"+1-555-9{i % 1000:03d}"
    record["updated_at"] = "2030-01-01T00:00:00Z"
    return record


def write_batches(rt: Runtime, job: str, records: list[dict[str, Any]],
                  batch: int) -> list[str]:
    files = []
    for part, start in enumerate(range(0, len(records), batch)):
        key = raw_key(TABLE, job, "crm-contacts-00000", part)
        rt.objects.put(key, encode_batch([orjson.dumps(r) for r in records[start:start + batch]]))
        files.append(key)
    return files


def transform(rt: Runtime, files: list[str]) -> tuple[float, int, int]:
    """Seconds, bytes added, files in the tenant's partition after."""
    uri, opts = rt.canonical.uri("canonical/contact")
    try:
        before = set(pa.table(DeltaTable(uri, storage_options=opts or None)
                              .get_add_actions(flatten=True)).column("path").to_pylist())
    except Exception:  # no table yet
        before = set()
    started = time.perf_counter()
    run_transform(TransformRequest(tenant_id="acme", service_name="crm", table_name="contacts",
                                   source_files=files), rt)
    seconds = time.perf_counter() - started
    adds = pa.table(DeltaTable(uri, storage_options=opts or None).get_add_actions(flatten=True))
    rows = adds.select(["path", "size_bytes"]).to_pylist()
    added = sum(a["size_bytes"] for a in rows if a["path"] not in before)
    return seconds, added, len(rows)


def runtime(root: Path, writes: CanonicalWrites = "copy_on_write") -> Runtime:
    return Runtime(Settings(object_store=f"file://{root}",
                            state_store=f"sqlite:///{root}/state.db", canonical_writes=writes))


def main(cfg: dict[str, Any]) -> dict[str, Any]:
    memory.tune()
    root, history, n = Path(cfg["root"]), cfg["history"], cfg["changed"]
    batch = cfg.get("batch_records", 5000)
    writes = cfg.get("writes", "copy_on_write")
    full = runtime(root / "history", writes)
    base = write_batches(full, "job-history", [contact("acme", i) for i in range(history)],
                         batch)
    load_seconds, _, _ = transform(full, base)
    step = max(1, history // n)
    changes = [changed(i) for i in range(0, step * n, step)][:n]
    incremental = transform(full, write_batches(full, "job-changes", changes, batch))
    started = time.perf_counter()  # what compaction (a fold, merge-on-read) costs after
    full.canonical.compact("canonical/contact", "acme", max_files=0)
    compact_seconds = time.perf_counter() - started
    empty = runtime(root / "empty", writes)
    fresh = transform(empty, write_batches(empty, "job-changes", changes, batch))
    return {"writes": writes, "history": history, "changed": len(changes),
            "load_seconds": load_seconds, "compact_seconds": compact_seconds,
            "incremental_seconds": incremental[0], "incremental_bytes": incremental[1],
            "incremental_files": incremental[2], "empty_seconds": fresh[0],
            "empty_bytes": fresh[1], "empty_files": fresh[2]}


if __name__ == "__main__":
    print(orjson.dumps(main(orjson.loads(sys.argv[1]))).decode(), flush=True)

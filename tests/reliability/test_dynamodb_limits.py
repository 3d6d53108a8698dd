"""DynamoDB's limits, designed for: a job of 2,000 chunks over 300 tables (more outbox rows
than one transaction may hold) and a chunk result of 5,000 files (more than one item may
hold, uncompressed), with exact counts and no item over 400 KB."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

from canonflow.aggregate import complete_chunk
from canonflow.config import Settings
from canonflow.model import ChunkResult, ChunkSpec, TableRef
from canonflow.runtime import Runtime
from canonflow.stores.dynamodb import DynamoStateStore, item_size

ITEM_LIMIT = 400 * 1024
TABLES = [TableRef(tenant_id="acme", service_name="crm", table_name=f"t{i:03d}")
          for i in range(300)]


def largest_item(store: DynamoStateStore) -> tuple[int, int]:
    """(the largest item's size as DynamoDB counts it, the number of items)."""
    sizes: list[int] = []
    kwargs: dict[str, Any] = {"TableName": store.table}
    while True:
        page = store.client.scan(**kwargs)
        sizes += [item_size(i) for i in page["Items"]]
        if "LastEvaluatedKey" not in page:
            return max(sizes), len(sizes)
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _result(spec: ChunkSpec, files: int) -> ChunkResult:
    keys = [f"{spec.table.raw_prefix}{spec.job_id}/{spec.chunk_id}/part-{n:05d}.jsonl.zst"
            for n in range(files)]
    return ChunkResult(job_id=spec.job_id, chunk_id=spec.chunk_id, completed=True,
                       records_processed=10 * files, processing_time=0.0,
                       s3_files_written=keys, s3_files_count=files, table_metadata=spec.table)


def test_a_job_of_2000_chunks_and_300_tables_aggregates_once(
        tmp_path: Path, dynamodb_url: str) -> None:
    rt = Runtime(Settings(object_store=f"file://{tmp_path}/data", state_store=dynamodb_url))
    job = "job-wide"
    specs = [ChunkSpec(job_id=job, chunk_id=f"c{i:05d}", table=TABLES[i % len(TABLES)],
                       start_page=i + 1, end_page=i + 1, page_size=10, batch_records=10)
             for i in range(2000)]
    started = time.monotonic()
    rt.state.create_job(job, "acme", "wide", "aggregated", specs)
    deliveries = specs + random.Random(7).sample(specs, 200)  # some delivered twice
    random.Random(8).shuffle(deliveries)
    claims = sum(complete_chunk(rt, _result(s, 2)).claimed for s in deliveries)
    elapsed = time.monotonic() - started
    assert claims == 1
    record = rt.state.job(job)
    assert record is not None
    assert (record.completed_chunks, record.total_chunks, record.failed_chunks) == (2000, 2000, 0)
    assert record.status == "transforms_enqueued"
    rows = rt.state.requests(job)
    assert sorted(r.request.table_name for r in rows) == sorted(t.table_name for t in TABLES)
    per_table = {t.table_name: sum(1 for s in specs if s.table == t) * 2 for t in TABLES}
    assert {r.request.table_name: len(r.request.source_files or []) for r in rows} == per_table
    assert len(rt.state.chunk_results(job)) == 2000
    store = rt.state
    assert isinstance(store, DynamoStateStore)
    size, items = largest_item(store)
    print(f"\n2,000 chunks x 300 tables: {elapsed:.1f} s, {items} items, "
          f"largest {size:,} bytes")
    assert size < ITEM_LIMIT
    rt.close()


def test_a_chunk_result_of_5000_files_is_stored_and_read_back_whole(
        dynamodb_url: str, tmp_path: Path) -> None:
    rt = Runtime(Settings(object_store=f"file://{tmp_path}/data", state_store=dynamodb_url))
    table = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")
    spec = ChunkSpec(job_id="job-big", chunk_id="c0", table=table, start_page=1, end_page=1,
                     page_size=10, batch_records=10)
    rt.state.create_job("job-big", "acme", "big", "aggregated", [spec])
    # keys that do not compress away: 5,000 x ~120 bytes, about 600 KB as JSON
    keys = [f"{table.raw_prefix}job-big/c0/{hashlib.sha256(str(n).encode()).hexdigest()}"
            f"-{n:05d}.jsonl.zst" for n in range(5000)]
    result = _result(spec, 0).model_copy(update={"s3_files_written": keys,
                                                 "s3_files_count": len(keys)})
    assert len(result.model_dump_json()) > ITEM_LIMIT
    completion = complete_chunk(rt, result)
    assert completion.new and completion.claimed
    assert not complete_chunk(rt, result).new  # the same 5,000 files again: a duplicate
    (recorded,) = rt.state.chunk_results("job-big")
    assert recorded.s3_files_written == keys
    (row,) = rt.state.requests("job-big")
    assert row.request.source_files_manifest is not None  # more than an event carries
    assert sorted(rt.objects.get(row.request.source_files_manifest).decode().count(k)
                  for k in keys[:3]) == [1, 1, 1]
    store = rt.state
    assert isinstance(store, DynamoStateStore)
    parts = store.client.query(
        TableName=store.table, KeyConditionExpression="pk = :pk AND begins_with(sk, :p)",
        ExpressionAttributeValues={":pk": {"S": "JOB#job-big"}, ":p": {"S": "PART#RESULT#c0#"}})
    assert parts["Count"] >= 1  # too large for its item even compressed: stored in parts
    size, _ = largest_item(store)
    print(f"\na 5,000-file chunk result: largest item {size:,} bytes")
    assert size < ITEM_LIMIT
    rt.close()

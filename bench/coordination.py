"""Coordination cost vs chunk count, for the same data (1,000 batch files in every run):
chunk completion latency, state-store statements per chunk, aggregation time."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import sqlalchemy as sa

from canonflow.aggregate import aggregate_job
from canonflow.config import Settings
from canonflow.model import ChunkResult, ChunkSpec, TableRef
from canonflow.runtime import Runtime

TABLES = [TableRef(tenant_id="acme", service_name="crm", table_name=t)
          for t in ("contacts", "companies", "deals", "tickets")]
TOTAL_FILES = 1000


def run(chunks: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as root:
        rt = Runtime(Settings(object_store=f"file://{root}",
                              state_store=f"sqlite:///{root}/state.db"))
        engine = rt.state._engine  # type: ignore[attr-defined]
        statements = {"n": 0}

        @sa.event.listens_for(engine, "before_cursor_execute")
        def _count(*_args: Any) -> None:
            statements["n"] += 1

        specs = [ChunkSpec(job_id="job-bench", chunk_id=f"c{i:05d}", table=TABLES[i % 4],
                           start_page=i + 1, end_page=i + 1, page_size=100, batch_records=100)
                 for i in range(chunks)]
        rt.state.create_job("job-bench", "acme", "bench", "aggregated", specs)
        per_chunk = max(1, TOTAL_FILES // chunks)
        statements["n"] = 0
        started = time.perf_counter()
        claimed = 0
        for spec in specs:
            keys = [f"{spec.table.raw_prefix}job-bench/{spec.chunk_id}/part-{p:05d}.jsonl.zst"
                    for p in range(per_chunk)]
            result = ChunkResult(
                job_id="job-bench", chunk_id=spec.chunk_id, completed=True,
                records_processed=100 * per_chunk, processing_time=0.0, s3_files_written=keys,
                s3_files_count=len(keys), table_metadata=spec.table)
            claimed += rt.state.complete_chunk(result).claimed
        completion_s = time.perf_counter() - started
        completion_statements = statements["n"]
        statements["n"] = 0
        started = time.perf_counter()
        requests = aggregate_job(rt, "job-bench")
        aggregation_s = time.perf_counter() - started
        rt.close()
    return {
        "chunks": chunks, "files": per_chunk * chunks, "claims": claimed,
        "transform_requests": len(requests),
        "completion_ms_per_chunk": 1000 * completion_s / chunks,
        "statements_per_chunk": completion_statements / chunks,
        "aggregation_ms": 1000 * aggregation_s,
        "aggregation_ms_per_chunk": 1000 * aggregation_s / chunks,
        "aggregation_statements": statements["n"],
    }


WRITES = {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem"}


def run_dynamodb(chunks: int, endpoint: str) -> dict[str, Any]:
    """The same job on a DynamoDB state store (a local DynamoDB-compatible server): HTTP
    requests per chunk completion (all, and writes) and per aggregation, counted with a
    botocore event hook on every request sent (retries included)."""
    import uuid

    from canonflow.stores.dynamodb import DynamoStateStore

    with tempfile.TemporaryDirectory() as root:
        url = f"dynamodb://bench-{uuid.uuid4().hex[:10]}?region=us-east-1&endpoint={endpoint}"
        rt = Runtime(Settings(object_store=f"file://{root}", state_store=url))
        store = rt.state
        assert isinstance(store, DynamoStateStore)
        sent: dict[str, int] = {}

        def count(request: Any, **_: Any) -> None:
            op = request.headers.get("X-Amz-Target", b"")
            op = (op.decode() if isinstance(op, bytes) else op).rsplit(".", 1)[-1]
            sent[op] = sent.get(op, 0) + 1

        store.client.meta.events.register("before-send.dynamodb", count)
        specs = [ChunkSpec(job_id="job-bench", chunk_id=f"c{i:05d}", table=TABLES[i % 4],
                           start_page=i + 1, end_page=i + 1, page_size=100, batch_records=100)
                 for i in range(chunks)]
        rt.state.create_job("job-bench", "acme", "bench", "aggregated", specs)
        per_chunk = max(1, TOTAL_FILES // chunks)
        sent.clear()
        most_writes = 0
        claimed = 0
        started = time.perf_counter()
        for spec in specs:
            keys = [f"{spec.table.raw_prefix}job-bench/{spec.chunk_id}/part-{p:05d}.jsonl.zst"
                    for p in range(per_chunk)]
            before = sum(n for op, n in sent.items() if op in WRITES)
            claimed += rt.state.complete_chunk(ChunkResult(
                job_id="job-bench", chunk_id=spec.chunk_id, completed=True,
                records_processed=100 * per_chunk, processing_time=0.0, s3_files_written=keys,
                s3_files_count=len(keys), table_metadata=spec.table)).claimed
            most_writes = max(most_writes,
                              sum(n for op, n in sent.items() if op in WRITES) - before)
        completion_s = time.perf_counter() - started
        completion = dict(sent)
        sent.clear()
        started = time.perf_counter()
        requests = aggregate_job(rt, "job-bench")
        aggregation_s = time.perf_counter() - started
        aggregation = dict(sent)
        rt.close()
    total = sum(completion.values())
    writes = sum(n for op, n in completion.items() if op in WRITES)
    return {
        "chunks": chunks, "files": per_chunk * chunks, "claims": claimed,
        "transform_requests": len(requests),
        "requests_per_completion": total / chunks,
        "writes_per_completion": writes / chunks,
        "most_writes_one_completion": most_writes,
        "completion_ms_per_chunk": 1000 * completion_s / chunks,
        "aggregation_requests": sum(aggregation.values()),
        "aggregation_writes": sum(n for op, n in aggregation.items() if op in WRITES),
        "aggregation_ms": 1000 * aggregation_s,
        "completion_ops": completion, "aggregation_ops": aggregation,
    }

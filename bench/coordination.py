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

"""Invariant 8 in the aggregator: a table whose extraction is short of what the source
announced is incomplete — not transformed, reported with a clear error, job not completed."""

from __future__ import annotations

from canonflow.aggregate import job_outcome, table_outcomes
from canonflow.model import ChunkResult, ChunkSpec, JobOutcome, TableRef

T1 = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")
T2 = TableRef(tenant_id="acme", service_name="crm", table_name="deals")


def spec(table: TableRef, n: int, announced: int | None = None, start: int = 1,
         end: int | None = 1) -> ChunkSpec:
    return ChunkSpec(job_id="j", chunk_id=f"{table.table_name}-{n}", table=table,
                     start_page=start, end_page=end, page_size=10, batch_records=10,
                     announced_total=announced)


def result(table: TableRef, n: int, records: int, announced: int | None = None,
           ok: bool = True) -> ChunkResult:
    keys = [f"{table.raw_prefix}j/{table.table_name}-{n}/part-00000.jsonl.zst"]
    return ChunkResult(
        job_id="j", chunk_id=f"{table.table_name}-{n}", completed=ok,
        records_processed=records, processing_time=0.1, s3_files_written=keys,
        s3_files_count=1, table_metadata=table, announced_total=announced,
        error=None if ok else {"type": "HttpTerminal", "message": "HTTP 404", "retryable": False},
    )


def test_a_table_short_of_its_planned_total_is_incomplete_and_not_ok() -> None:
    specs = [spec(T1, 0, 50), spec(T1, 1, 50, 2, None), spec(T2, 0, 10)]
    tables = table_outcomes(specs, [result(T1, 0, 20), result(T1, 1, 20), result(T2, 0, 10)])
    t1 = tables[T1]
    assert (t1.announced_total, t1.records_extracted, t1.chunks_failed) == (50, 40, 0)
    assert t1.incomplete and not t1.ok
    assert t1.errors == ["incomplete: the source announced 50 records, 40 were extracted"]
    assert tables[T2].ok and not tables[T2].incomplete
    assert job_outcome(tables) is JobOutcome.PARTIAL_SUCCESS


def test_more_than_announced_is_complete() -> None:
    tables = table_outcomes([spec(T1, 0, 5, 1, None)], [result(T1, 0, 12)])
    assert tables[T1].ok and job_outcome(tables) is JobOutcome.COMPLETED


def test_chunks_that_announce_their_own_scope_are_summed() -> None:
    # sequential / time-window chunks: each reports what its own query announced
    specs = [spec(T1, 0, end=None), spec(T1, 1, end=None)]
    short = table_outcomes(specs, [result(T1, 0, 30, 30), result(T1, 1, 5, 25)])
    assert short[T1].announced_total == 55 and not short[T1].ok
    assert job_outcome(short) is JobOutcome.FAILED
    exact = table_outcomes(specs, [result(T1, 0, 30, 30), result(T1, 1, 25, 25)])
    assert exact[T1].ok


def test_unknown_totals_and_failed_chunks_are_not_called_short() -> None:
    tables = table_outcomes([spec(T1, 0, end=None)], [result(T1, 0, 7)])
    assert tables[T1].announced_total is None and tables[T1].ok
    failed = table_outcomes([spec(T1, 0, 50)], [result(T1, 0, 10, ok=False)])
    assert failed[T1].errors == ["HTTP 404"]  # the chunk's own error, not a second one
    assert not failed[T1].incomplete and not failed[T1].ok

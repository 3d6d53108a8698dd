from canonflow.aggregate import job_outcome, table_outcomes, transform_requests
from canonflow.model import ChunkResult, ChunkSpec, JobOutcome, TableRef
from canonflow.runtime import Runtime

T1 = TableRef(tenant_id="acme", service_name="crm", table_name="contacts")
T2 = TableRef(tenant_id="acme", service_name="crm", table_name="deals")


def spec(table: TableRef, n: int) -> ChunkSpec:
    return ChunkSpec(job_id="j", chunk_id=f"{table.table_name}-{n}", table=table, start_page=1,
                     end_page=1, page_size=10, batch_records=10)


def result(table: TableRef, n: int, ok: bool = True, files: int = 1) -> ChunkResult:
    keys = [f"{table.raw_prefix}j/{table.table_name}-{n}/part-{i:05d}.jsonl.zst"
            for i in range(files)]
    return ChunkResult(
        job_id="j", chunk_id=f"{table.table_name}-{n}", completed=ok, records_processed=10,
        processing_time=0.1, s3_files_written=keys, s3_files_count=len(keys),
        table_metadata=table,
        error=None if ok else {"type": "HttpTerminal", "message": "HTTP 404", "retryable": False},
    )


def test_all_chunks_succeeded_is_completed() -> None:
    specs = [spec(T1, 0), spec(T1, 1), spec(T2, 0)]
    tables = table_outcomes(specs, [result(T1, 0), result(T1, 1, files=2), result(T2, 0)])
    assert job_outcome(tables) is JobOutcome.COMPLETED
    assert len(tables[T1].files) == 3 and tables[T1].records_extracted == 20


def test_one_failed_table_is_partial_success() -> None:
    specs = [spec(T1, 0), spec(T2, 0), spec(T2, 1)]
    tables = table_outcomes(specs, [result(T1, 0), result(T2, 0), result(T2, 1, ok=False)])
    assert job_outcome(tables) is JobOutcome.PARTIAL_SUCCESS
    assert tables[T1].ok and not tables[T2].ok
    assert tables[T2].errors == ["HTTP 404"]


def test_every_table_failed_is_failed() -> None:
    specs = [spec(T1, 0), spec(T2, 0)]
    tables = table_outcomes(specs, [result(T1, 0, ok=False), result(T2, 0, ok=False)])
    assert job_outcome(tables) is JobOutcome.FAILED


def test_a_missing_chunk_result_counts_as_failed() -> None:
    tables = table_outcomes([spec(T1, 0), spec(T1, 1)], [result(T1, 0)])
    assert not tables[T1].ok and tables[T1].errors == ["no result"]


def test_requests_only_for_successful_tables_with_exactly_their_files(runtime: Runtime) -> None:
    specs = [spec(T1, 0), spec(T1, 1), spec(T2, 0)]
    tables = table_outcomes(specs, [result(T1, 0, files=2), result(T1, 1), result(T2, 0, ok=False)])
    reqs = transform_requests(runtime, "j", tables)
    assert len(reqs) == 1
    (req,) = reqs
    assert req.request_id == "j:crm:contacts"
    assert req.source_files == sorted(tables[T1].files)
    assert all(k.startswith(T1.raw_prefix) for k in req.source_files)


def test_large_file_lists_travel_as_a_manifest(make_settings) -> None:
    rt = Runtime(make_settings(max_inline_files=3))
    tables = table_outcomes([spec(T1, 0)], [result(T1, 0, files=5)])
    (req,) = transform_requests(rt, "j", tables)
    assert req.source_files is None
    assert req.source_files_manifest == "manifests/acme/crm/contacts/j.json"
    assert rt.objects.exists(req.source_files_manifest)


def test_only_a_complete_full_extraction_is_reconciled(runtime: Runtime) -> None:
    def full(table: TableRef, n: int, whole: bool = True, total: int | None = None
             ) -> ChunkSpec:
        return spec(table, n).model_copy(update={"full_extraction": whole,
                                                 "announced_total": total})

    tables = table_outcomes([full(T1, 0), full(T1, 1), full(T2, 0), full(T2, 1, whole=False)],
                            [result(T1, 0), result(T1, 1), result(T2, 0), result(T2, 1)])
    reqs = {r.table_name: r.reconcile for r in transform_requests(runtime, "j", tables)}
    # every chunk listed the whole table: reconciled; a chunk narrowed by a mark: not
    assert reqs == {"contacts": True, "deals": False}
    # the source announced more than was extracted: not transformed, so nothing is marked
    short = table_outcomes([full(T1, 0, total=30)], [result(T1, 0)])
    assert short[T1].incomplete and transform_requests(runtime, "j", short) == []
    # a chunk spec stored before the flag existed is never reconciled
    legacy = table_outcomes([spec(T1, 0)], [result(T1, 0)])
    assert [r.reconcile for r in transform_requests(runtime, "j", legacy)] == [False]

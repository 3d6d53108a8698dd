import pytest

from canonflow.model import ChunkSpec, TableRef
from canonflow.plan import TASK_BATCH_CHUNKS, page_ranges, plan_job, task_batches
from canonflow.runtime import Runtime


@pytest.mark.parametrize(("total", "size", "per", "expected"), [
    (0, 100, 2, [(1, None)]),
    (100, 100, 2, [(1, None)]),
    (101, 100, 2, [(1, None)]),
    (1000, 100, 3, [(1, 3), (4, 6), (7, 9), (10, None)]),
    (None, 100, 3, [(1, None)]),
])
def test_page_ranges_cover_every_page_once_and_the_last_is_open(total, size, per,
                                                                expected) -> None:
    # the last range follows the pagination past the announced total while pages are full
    assert page_ranges(total, size, per) == expected


def test_page_ranges_are_contiguous_for_many_sizes() -> None:
    for total in range(0, 2000, 37):
        ranges = page_ranges(total, 50, 3)
        pages = max(1, -(-total // 50))
        assert ranges[-1][1] is None  # the last range is open
        bounded = [(s, e if e is not None else pages) for s, e in ranges]
        assert [p for s, e in bounded for p in range(s, e + 1)] == list(range(1, pages + 1))


def test_plan_job_reads_totals_and_splits_tables(runtime: Runtime) -> None:
    plan = plan_job(runtime.settings, runtime, "acme", job_id="job-1")
    by_table: dict[str, int] = {}
    for c in plan.chunks:
        by_table[c.table.table_name] = by_table.get(c.table.table_name, 0) + 1
        assert c.job_id == "job-1"
    # 5000 contacts / 100 per page / 2 pages per chunk; 1200 others -> 6 chunks
    assert by_table == {"contacts": 25, "companies": 6, "deals": 6, "tickets": 6, "users": 6}
    assert len({c.chunk_id for c in plan.chunks}) == len(plan.chunks)
    # what the source announced travels with every chunk of the table, for the aggregator
    assert {c.announced_total for c in plan.chunks if c.table.table_name == "contacts"} \
        == {5000}
    last = [c for c in plan.chunks if c.table.table_name == "contacts"][-1]
    assert (last.start_page, last.end_page) == (49, None)  # open: follows full pages


def test_the_first_chunk_gets_page_one_from_the_plan_or_else_from_the_api(
        runtime: Runtime) -> None:
    from canonflow.chunk import process_chunk
    from canonflow.model import first_page_key
    from canonflow.stores import open_object_store
    from canonflow.transform.reader import decompress

    plan = plan_job(runtime.settings, runtime, "acme", job_id="job-1")
    contacts = [c for c in plan.chunks if c.table.table_name == "contacts"]
    assert [c.first_page_stored for c in contacts] == [True] + [False] * (len(contacts) - 1)
    first = contacts[0]
    key = first_page_key(first.table, first.job_id, first.chunk_id)
    assert key.startswith("plan/acme/crm/contacts/job-1/")  # never read as a raw batch
    # a stored page 1 that is not the API's: the chunk uses it as page 1
    planned = ",".join(f'{{"id": "planned-{i}"}}' for i in range(100))
    runtime.objects.put(key, f'{{"results": [{planned}], "total": 5000}}'.encode())
    with_page = process_chunk(first, runtime)
    assert with_page.completed and with_page.records_processed == 200
    raw = b"".join(decompress(runtime.objects.get(k), k) for k in with_page.s3_files_written)
    assert raw.count(b'"planned-') == 100
    # the stored page gone (another store, cleaned up): the chunk asks the API for it
    gone = Runtime(runtime.settings.model_copy(update={
        "object_store": runtime.settings.object_store + "-elsewhere"}))
    try:
        assert not open_object_store(gone.settings.object_store).exists(key)
        without = process_chunk(first, gone)
        assert without.completed and without.records_processed == 200
        raw = b"".join(decompress(gone.objects.get(k), k) for k in without.s3_files_written)
        assert b'"planned-' not in raw
    finally:
        gone.close()


def _spec(n: int, start: int = 1, end: int | None = None, total: int | None = None,
          stored: bool = True, after: dict[str, object] | None = None) -> ChunkSpec:
    return ChunkSpec(job_id="j", chunk_id=f"c{n:03d}", start_page=start, end_page=end,
                     page_size=100, batch_records=100, announced_total=total,
                     first_page_stored=stored, first_page_next=after,
                     table=TableRef(tenant_id="acme", service_name="crm", table_name=f"t{n}"))


def test_chunks_that_need_next_to_nothing_from_the_api_share_a_task() -> None:
    small = [_spec(0, total=100), _spec(1, end=1), _spec(2, total=0),
             _spec(7, total=None)]  # read page after page: page 1 named no next page
    alone = [_spec(3, total=101),  # more than the page planning read
             _spec(4, end=1, stored=False),  # page 1 not handed over: asks the API
             _spec(5, total=None, after={"index": 2, "params": {"cursor": "b"}, "url": None}),
             _spec(6, start=2, end=3, total=1000, stored=False)]
    batches = task_batches([alone[0], small[0], alone[1], small[1], alone[2], small[2],
                            alone[3], small[3]])
    assert batches == [[s] for s in alone] + [small]  # the long work first
    many = [_spec(i, total=5) for i in range(TASK_BATCH_CHUNKS + 3)]
    assert [len(b) for b in task_batches(many)] == [TASK_BATCH_CHUNKS, 3]
    assert task_batches([]) == []


@pytest.mark.parametrize(("page_size", "whole"), [(2000, True), (100, False)])
def test_planning_hands_page_one_of_a_table_read_page_after_page_to_its_chunk(
        make_settings, page_size: int, whole: bool) -> None:
    """A sequential table (a next URL, a Link header: no total) gets its page 1 read at
    planning with the request page 1 names next: its chunk asks the API for page 2 on,
    never page 1 again; a table whose page 1 names no next page needs the API no more,
    and its chunk shares a task."""
    from canonflow.chunk import process_chunk

    settings = make_settings(tables={"billing": ["customers", "invoices"]})
    settings = settings.model_copy(update={"sources": [
        s.model_copy(update={"page_size": page_size}) for s in settings.sources]})
    runtime = Runtime(settings)
    plan = plan_job(settings, runtime, "acme", job_id="job-1")
    assert [(c.start_page, c.end_page, c.first_page_stored) for c in plan.chunks] == \
        [(1, None, True)] * 2
    assert [c.first_page_next is None for c in plan.chunks] == [whole] * 2
    assert len(task_batches(plan.chunks)) == (1 if whole else 2)
    client = runtime.clients.open[("acme", "billing")]  # the one planning used
    asked: list[dict[str, object]] = []
    get = client._get

    def counted(path: str, params: dict[str, object]):  # type: ignore[no-untyped-def]
        asked.append(dict(params or {}) if "://" not in path else {"url": path})
        return get(path, params)

    client._get = counted  # type: ignore[method-assign]
    for spec in plan.chunks:
        asked.clear()
        result = process_chunk(spec, runtime)
        assert result.completed and result.records_processed == 1200, result
        assert result.final_page == (1 if whole else 12)
        assert len(asked) == (0 if whole else 11), asked  # pages 2 to 12 only
    runtime.close()

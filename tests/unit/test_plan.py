import pytest

from canonflow.plan import page_ranges, plan_job
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

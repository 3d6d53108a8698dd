import pytest

from canonflow.plan import page_ranges, plan_job
from canonflow.runtime import Runtime


@pytest.mark.parametrize(("total", "size", "per", "expected"), [
    (0, 100, 2, [(1, 1)]),
    (100, 100, 2, [(1, 1)]),
    (101, 100, 2, [(1, 2)]),
    (1000, 100, 3, [(1, 3), (4, 6), (7, 9), (10, 10)]),
    (None, 100, 3, [(1, None)]),
])
def test_page_ranges_cover_every_page_once(total, size, per, expected) -> None:
    assert page_ranges(total, size, per) == expected


def test_page_ranges_are_contiguous_for_many_sizes() -> None:
    for total in range(0, 2000, 37):
        ranges = page_ranges(total, 50, 3)
        pages = [p for start, end in ranges for p in range(start, end + 1)]
        assert pages == list(range(1, max(1, -(-total // 50)) + 1))


def test_plan_job_reads_totals_and_splits_tables(runtime: Runtime) -> None:
    plan = plan_job(runtime.settings, runtime, "acme", job_id="job-1")
    by_table: dict[str, int] = {}
    for c in plan.chunks:
        by_table[c.table.table_name] = by_table.get(c.table.table_name, 0) + 1
        assert c.job_id == "job-1"
    # 5000 contacts / 100 per page / 2 pages per chunk; 1200 others -> 6 chunks
    assert by_table == {"contacts": 25, "companies": 6, "deals": 6, "tickets": 6, "users": 6}
    assert len({c.chunk_id for c in plan.chunks}) == len(plan.chunks)

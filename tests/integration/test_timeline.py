"""A job's timeline page, opened in headless Chromium: it renders one bar per chunk and per
transform of a real job, offline; and the per-table timings of the job report."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from canonflow.model import ChunkResult, TableRef
from canonflow.report import job_report
from canonflow.runtime import Runtime
from canonflow.timeline import render_html, timeline_data, write_timeline
from tests.conftest import SettingsFactory, service_missing
from tests.jobs import run_job

TABLES = {"crm": ["contacts", "companies"], "helpdesk": ["tickets"]}


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        service_missing("Chromium", "no chromium on PATH (apt-get install -y chromium)")
    return binary


def render(page: Path, tmp_path: Path, screenshot: Path | None = None) -> str:
    """The DOM after the page's scripts ran, as headless Chromium dumps it."""
    args = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,900",
            "--virtual-time-budget=5000"]
    if screenshot is not None:
        subprocess.run([*args, f"--screenshot={screenshot}", page.as_uri()],
                       capture_output=True, timeout=120, check=True)
    proc = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def elements(dom: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Elements()
    parser.feed(dom)
    return parser.found


def test_report_times_each_table(make_settings: SettingsFactory) -> None:
    rt, job_id = run_job(make_settings(tables=TABLES))
    try:
        report = job_report(rt.state, job_id)
        results = rt.state.chunk_results(job_id)
    finally:
        rt.close()
    assert report["status"] == "done" and report["aggregated_at"] is not None
    assert set(report["tables"]) == {f"acme/{s}.{t}" for s, ts in TABLES.items() for t in ts}
    for label, t in report["tables"].items():
        mine = [r for r in results if r.table_metadata.label == label]
        assert mine and all(r.started_at and r.finished_at and r.worker for r in mine)
        first = min(r.started_at or 0 for r in mine)
        last = max(r.finished_at or 0 for r in mine)
        assert t["extraction_seconds"] == round(last - first, 3)
        assert 0 <= t["extraction_seconds"] <= report["seconds"]
        # fan-in: the transform starts after the table's last chunk and the aggregation
        assert t["aggregation_wait_seconds"] is not None and t["aggregation_wait_seconds"] >= 0
        assert t["last_chunk_finished_at"] <= report["aggregated_at"] \
            <= t["transform_started_at"]
        assert 0 < t["transform_seconds"] <= report["seconds"]
        assert t["files_per_transform"] == t["files_written"] and t["read_per_extracted"] == 1.0
    (transform,) = [x for x in report["transforms"] if x["table"] == "acme/crm.contacts"]
    assert transform["started_at"] == report["tables"]["acme/crm.contacts"][
        "transform_started_at"] and transform["worker"]


def test_old_results_without_times_still_validate() -> None:
    old = {"job_id": "j", "chunk_id": "c", "completed": True, "records_processed": 1,
           "processing_time": 0.1, "s3_files_written": [], "s3_files_count": 0,
           "table_metadata": {"tenant_id": "a", "service_name": "s", "table_name": "t"}}
    result = ChunkResult.model_validate(old)
    assert (result.started_at, result.finished_at, result.worker) == (None, None, None)
    assert result.table_metadata == TableRef(tenant_id="a", service_name="s", table_name="t")


def test_timeline_renders_every_chunk_and_transform_offline(
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    rt, job_id = run_job(make_settings(tables=TABLES, dispatcher="local://?workers=3"))
    page = tmp_path / "timeline.html"
    try:
        write_timeline(rt.state, job_id, page)
        results = rt.state.chunk_results(job_id)
        requests = rt.state.requests(job_id)
    finally:
        rt.close()
    text = page.read_text()
    assert re.search(r"https?://", text) is None  # no CDN, no fetch: nothing but the file
    assert not re.search(r"<(link|img|iframe)\b|<script[^>]*\bsrc=|@import|url\(['\"]?//",
                         text)
    dom = render(page, tmp_path, screenshot=tmp_path / "timeline.png")
    found = elements(dom)
    chunk_bars = [a["data-chunk-id"] for tag, a in found if tag == "rect" and "data-chunk-id" in a]
    transform_bars = [a["data-request-id"] for tag, a in found
                      if tag == "rect" and "data-request-id" in a]
    assert len(results) > len(TABLES) * 2 and len(requests) == 3
    assert sorted(chunk_bars) == sorted(r.chunk_id for r in results)
    assert sorted(transform_bars) == sorted(r.request.request_id for r in requests)
    workers = {r.worker for r in results} | {r.result.worker for r in requests if r.result}
    lanes = [a for tag, a in found if tag == "text" and a.get("class") == "lane-label"]
    assert len(lanes) == len(workers) >= 2  # one lane per worker process
    assert any(tag == "line" and a.get("class") == "agg" for tag, a in found)
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_embedded_data_cannot_break_out_of_the_page(tmp_path: Path) -> None:
    """A value holding '</script>' or markup stays data: the page still renders it as text."""
    evil = "</script><script>document.title='pwned'</script><b>x</b>&amp;\u2028"
    data = synthetic(3, error=evil)
    page = tmp_path / "evil.html"
    page.write_text(render_html(data))
    assert "</script><script>document.title" not in page.read_text()
    dom = render(page, tmp_path)
    assert "<title>canonflow job job-synthetic</title>" in dom  # the injected script never ran
    assert "<b>x</b>" not in dom  # markup stays text
    assert len([1 for tag, a in elements(dom) if tag == "rect" and "data-chunk-id" in a]) == 3
    assert "&lt;/script&gt;&lt;script&gt;" in dom  # the error text, escaped, in a <title>


def test_a_job_of_thousands_of_chunks_renders(tmp_path: Path) -> None:
    data = synthetic(4000)
    page = tmp_path / "big.html"
    page.write_text(render_html(data))
    assert page.stat().st_size < 2_000_000
    found = elements(render(page, tmp_path))
    assert len([1 for tag, a in found if tag == "rect" and "data-chunk-id" in a]) == 4000
    assert len([1 for tag, a in found if tag == "rect" and "data-request-id" in a]) == 4


def synthetic(n: int, error: str | None = None) -> dict[str, Any]:
    """Timeline data for ``n`` chunks over 4 tables and 16 workers, as timeline_data builds."""
    chunks = [{"id": f"c{i:05d}", "table": i % 4, "worker": i % 16, "start": i * 0.01,
               "end": i * 0.01 + 0.15, "records": 200, "files": 1, "seconds": 0.15,
               "error": error} for i in range(n)]
    end = n * 0.01 + 0.15
    transforms = [{"id": f"job:svc:t{t}", "table": t, "worker": t, "status": "done",
                   "attempts": 1, "error": None, "mode": "file_specific", "start": end + 0.1,
                   "end": end + 1, "seconds": 0.9, "files": n // 4, "records_read": 50 * n,
                   "records_written": 50 * n, "records_quarantined": 0} for t in range(4)]
    return {
        "job": {"job_id": "job-synthetic", "tenant_id": "acme", "pipeline": "p",
                "status": "done", "outcome": "completed", "trigger_mode": "aggregated",
                "created_at": "2026-01-01T00:00:00+00:00", "seconds": end + 1.2,
                "aggregated": end + 0.05, "chunks_total": n},
        "tables": [f"acme/svc.t{t}" for t in range(4)],
        "workers": [f"host:{1000 + w}" for w in range(16)],
        "chunks": chunks, "transforms": transforms, "untimed_transforms": [],
        "timings": {}, "untimed_chunks": 0, "pending_chunks": 0,
    }


def test_unknown_job(runtime: Runtime, tmp_path: Path) -> None:
    from canonflow.errors import UnknownJob

    with pytest.raises(UnknownJob):
        timeline_data(runtime.state, "job-none")

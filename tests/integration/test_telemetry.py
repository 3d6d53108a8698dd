"""Metrics and traces: what an operator reads off a job, from the processes that did the work.

In one process an in-memory metric reader sees every instrument; across processes (a local
pool, Celery workers) spans and metrics travel over OTLP/HTTP to a receiver the test runs
on 127.0.0.1, and a worker's Prometheus endpoint is scraped like Prometheus would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from canonflow.connectors.demo_api import DemoApi, serve
from canonflow.model import TriggerMode
from canonflow.report import job_report
from canonflow.telemetry import metrics, tracing
from tests.conftest import SettingsFactory
from tests.integration.test_scale_out import workers, write_pipeline
from tests.jobs import run_job as run_one_job
from tests.otlp import receiver

TABLES = {"crm": ["contacts", "companies", "deals"], "helpdesk": ["tickets"]}


class Telemetry:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.spans = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.spans))

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        return [p for rm in (data.resource_metrics if data else [])
                for sm in rm.scope_metrics for m in sm.metrics if m.name == name
                for p in m.data.data_points]

    def total(self, name: str, **attrs: str) -> float:
        return sum(p.value for p in self.points(name)
                   if all(p.attributes.get(k) == v for k, v in attrs.items()))


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    metrics.use(t.meters)
    tracing.use(t.tracers)
    yield t
    metrics.use(None)
    tracing.use(None)


def run_job(settings: Any) -> dict[str, Any]:
    rt, job_id = run_one_job(settings)
    try:
        return job_report(rt.state, job_id)
    finally:
        rt.close()


def test_a_job_of_four_tables_is_four_transforms_reading_each_record_once(
        make_settings: SettingsFactory, telemetry: Telemetry) -> None:
    report = run_job(make_settings(tables=TABLES))
    assert report["outcome"] == "completed"
    assert telemetry.total("canonflow.transform.invocations") == 4
    assert telemetry.total("canonflow.transform.invocations", trigger="aggregated",
                           processing_mode="file_specific") == 4
    extracted = telemetry.total("canonflow.records.extracted")
    read = telemetry.total("canonflow.records.read")
    assert extracted == sum(t["records_extracted"] for t in report["tables"].values()) > 0
    assert read / extracted == 1.0
    assert telemetry.total("canonflow.records.canonical") + telemetry.total(
        "canonflow.records.quarantined") + telemetry.total("canonflow.records.merged") == read
    (jobs,) = telemetry.points("canonflow.job.transform_invocations")
    assert (jobs.count, jobs.sum) == (1, 4)
    assert telemetry.total("canonflow.chunks", outcome="completed") == report["chunks"]["total"]
    assert telemetry.total("canonflow.http.requests") > report["chunks"]["total"]  # + plan


def test_the_per_batch_rollback_flag_shows_one_transform_per_file_and_rereads(
        make_settings: SettingsFactory, telemetry: Telemetry) -> None:
    report = run_job(make_settings(tables=TABLES, trigger_mode=TriggerMode.PER_BATCH))
    files = telemetry.total("canonflow.files.written")
    assert files == sum(t["files_written"] for t in report["tables"].values()) > 4
    assert telemetry.total("canonflow.transform.invocations", trigger="per_batch") == files
    assert telemetry.total("canonflow.records.read") / telemetry.total(
        "canonflow.records.extracted") > 1.0


def test_one_job_is_one_trace_of_chunks_an_aggregation_and_transforms(
        make_settings: SettingsFactory, telemetry: Telemetry) -> None:
    report = run_job(make_settings(tables=TABLES))
    spans = telemetry.spans.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    by_name: dict[str, list[Any]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    (job,) = by_name["canonflow.job"]
    (aggregation,) = by_name["canonflow.aggregate"]
    assert job.attributes["canonflow.job_id"] == report["job_id"]
    assert len(by_name["canonflow.chunk"]) == report["chunks"]["total"]
    assert all(s.parent.span_id == job.context.span_id
               for s in [*by_name["canonflow.chunk"], aggregation])
    assert len(by_name["canonflow.transform"]) == 4
    assert all(s.parent.span_id == aggregation.context.span_id
               for s in by_name["canonflow.transform"])


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from canonflow.cli import main; main()",
                           *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def test_local_pool_workers_send_one_trace_per_job_and_their_metrics_over_otlp(
        tmp_path: Path) -> None:
    with receiver() as (endpoint, got):
        proc = cli("demo", "--records", "300", "--tenants", "2", "--data-dir",
                   str(tmp_path / "data"), "--json",
                   env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                        "OTEL_METRIC_EXPORT_INTERVAL": "60000"})
        assert proc.returncode == 0, proc.stderr
        reports = json.loads(proc.stdout)["jobs"]
        deadline = time.monotonic() + 10  # the runner's last export happens at its exit
        while len([s for s in got.spans if s.name == "canonflow.job"]) < 2:
            assert time.monotonic() < deadline, "the job spans never arrived"
            time.sleep(0.1)
    for report in reports:
        job_id = report["job_id"]
        (job,) = [s for s in got.spans if s.name == "canonflow.job"
                  and s.attributes["canonflow.job_id"] == job_id]
        trace = [s for s in got.spans if s.trace_id == job.trace_id]
        names = [s.name for s in trace]
        assert names.count("canonflow.chunk") == report["chunks"]["total"]
        assert names.count("canonflow.aggregate") == 1
        assert names.count("canonflow.transform") == 7
        assert {s.attributes.get("canonflow.job_id") for s in trace} == {job_id}
        assert {s.pid for s in trace if s.name != "canonflow.job"} - {job.pid}, \
            "chunks and transforms run in the pool's worker processes"
    extracted = got.total("canonflow.records.extracted")
    assert got.total("canonflow.transform.invocations") == 14
    assert got.total("canonflow.records.read") == extracted == sum(
        t["records_extracted"] for r in reports for t in r["tables"].values())


def scrape(port: int) -> dict[str, float]:
    """Prometheus text format, summed per metric name over its label sets."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def test_a_celery_workers_metrics_endpoint_and_one_trace_across_the_broker(
        tmp_path: Path, postgres_url: str, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(DemoApi(600)) as api, receiver() as (endpoint, got):
        pipeline = write_pipeline(tmp_path / "pipeline.yaml", api.base_url, postgres_url,
                                  f"file://{tmp_path / 'data'}", redis_url,
                                  {"crm": ["contacts", "deals"], "helpdesk": ["users"]},
                                  page_size=100, pages_per_chunk=2)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        command = (f"canonflow worker pipeline.yaml --concurrency 1 --metrics-port {port} "
                   "--metrics-host 127.0.0.1")
        with workers(pipeline, command, count=1):
            proc = cli("run", str(pipeline), "--json", env={})
            assert proc.returncode == 0, proc.stderr
            (report,) = json.loads(proc.stdout)["jobs"]
            deadline = time.monotonic() + 20  # pool processes export after every task
            while (seen := scrape(port)).get("canonflow_transform_invocations_total") != 3:
                assert time.monotonic() < deadline, f"metrics never showed 3 transforms: {seen}"
                time.sleep(0.5)
    extracted = sum(t["records_extracted"] for t in report["tables"].values())
    assert seen["canonflow_records_extracted_total"] == extracted == seen[
        "canonflow_records_read_total"]
    assert seen["canonflow_chunk_duration_seconds_count"] == report["chunks"]["total"]
    assert seen["canonflow_transform_files_count"] == 3
    assert seen["canonflow_outbox_backlog"] == 0  # observed by the worker's own process
    (job,) = [s for s in got.spans if s.name == "canonflow.job"]
    trace = [s for s in got.spans if s.trace_id == job.trace_id]
    names = [s.name for s in trace]
    assert names.count("canonflow.chunk") == report["chunks"]["total"]
    assert names.count("canonflow.transform") == 3 and "canonflow.aggregate" in names
    assert {s.pid for s in trace if s.name == "canonflow.chunk"} != {job.pid}

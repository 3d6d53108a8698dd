"""Metrics and traces: what an operator reads off a job, from the processes that did the work.

In one process an in-memory metric reader sees every instrument; across processes (a local
pool, Celery workers) spans and metrics travel over OTLP/HTTP to a receiver the test runs
on 127.0.0.1, and a worker's Prometheus endpoint is scraped like Prometheus would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from canonflow.dispatch import open_dispatcher
from canonflow.model import TriggerMode
from canonflow.report import job_report
from canonflow.runner import JobRunner
from canonflow.runtime import Runtime
from canonflow.telemetry import metrics, tracing
from tests.conftest import SettingsFactory

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
    rt = Runtime(settings)
    dispatcher = open_dispatcher(settings.dispatcher, settings)
    try:
        (job_id,) = JobRunner(settings, rt, dispatcher).run()
        return job_report(rt.state, job_id)
    finally:
        dispatcher.close()
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

"""The worker's Prometheus endpoint sums the metrics of every pool process."""

from pathlib import Path

from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from canonflow.telemetry.prometheus import SnapshotCollector, SnapshotExporter


def process_snapshot(directory: Path, name: str, extracted: int, seconds: list[float]) -> None:
    """What one pool process exports: a counter and a histogram (written under ``name``)."""
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("canonflow")
    meter.create_counter("canonflow.records.extracted").add(extracted, {"service": "crm"})
    hist = meter.create_histogram("canonflow.chunk.duration", unit="s",
                                  explicit_bucket_boundaries_advisory=[1, 10])
    for s in seconds:
        hist.record(s, {"service": "crm"})
    data = reader.get_metrics_data()
    assert data is not None
    staging = directory.parent / f"staging-{name}"
    staging.mkdir()
    SnapshotExporter(str(staging)).export(data)  # written as <this pid>.json
    (written,) = staging.glob("*.json")
    written.rename(directory / f"{name}.json")


def test_counters_and_histograms_of_every_process_add_up(tmp_path: Path) -> None:
    tmp_path = tmp_path / "snapshots"
    tmp_path.mkdir()
    process_snapshot(tmp_path, "101", 300, [0.5, 5])
    process_snapshot(tmp_path, "102", 200, [20])
    own = InMemoryMetricReader()
    MeterProvider(metric_readers=[own]).get_meter("canonflow").create_observable_gauge(
        "canonflow.outbox.backlog", [lambda _: [Observation(7, {})]])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(str(tmp_path), own))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode())
               for s in f.samples}
    crm = (("service", "crm"),)
    assert samples[("canonflow_records_extracted_total", crm)] == 500
    assert samples[("canonflow_chunk_duration_seconds_count", crm)] == 3
    assert samples[("canonflow_chunk_duration_seconds_sum", crm)] == 25.5
    assert samples[("canonflow_chunk_duration_seconds_bucket", (("le", "1.0"), *crm))] == 1
    assert samples[("canonflow_chunk_duration_seconds_bucket", (("le", "10.0"), *crm))] == 2
    assert samples[("canonflow_chunk_duration_seconds_bucket", (("le", "+Inf"), *crm))] == 3
    assert samples[("canonflow_outbox_backlog", ())] == 7


def test_a_snapshot_being_replaced_is_skipped_not_fatal(tmp_path: Path) -> None:
    tmp_path = tmp_path / "snapshots"
    tmp_path.mkdir()
    process_snapshot(tmp_path, "101", 300, [])
    (tmp_path / "102.json").write_text('{"resource_metrics": [')  # torn: half written
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(str(tmp_path)))
    assert b"canonflow_records_extracted_total" in generate_latest(registry)

"""The Prometheus endpoint of ``canonflow worker --metrics-port``.

A Celery worker is a parent process and a pool of forked processes, and the work (and so every
measurement) happens in the pool. Each pool process exports its cumulative metrics every few
seconds, and after every task, as one JSON snapshot (OpenTelemetry's own ``MetricsData``) to
``<dir>/<pid>.json``; the endpoint in the parent sums the snapshots of every process, dead ones
included (a counter never goes back when a pool process is replaced), and adds what the parent
observes itself (the outbox backlog).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from canonflow.errors import ConfigError


class SnapshotExporter(MetricExporter):
    """Writes this process's cumulative metrics to ``<directory>/<pid>.json``, atomically."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = Path(directory)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        pid = os.getpid()
        target = self.directory / f"{pid}.json"
        tmp = self.directory / f".{pid}.tmp"
        try:
            tmp.write_text(metrics_data.to_json(indent=None))
            os.replace(tmp, target)
        except OSError:
            return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def _name(metric: dict[str, Any]) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", metric["name"])
    return f"{name}_seconds" if metric.get("unit") == "s" else name


def _metrics(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for rm in document.get("resource_metrics", []):
        for sm in rm.get("scope_metrics", []):
            yield from sm.get("metrics", [])


class SnapshotCollector(Collector):
    """Sums the pool processes' snapshots (and the parent's own reader) per metric and
    label set: counters and histograms add up; a gauge is observed by one process."""

    def __init__(self, directory: str, own: InMemoryMetricReader | None = None) -> None:
        self.directory = Path(directory)
        self.own = own

    def _documents(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.directory.glob("*.json")):
            try:
                yield json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced right now: the next scrape has it
        if self.own is not None and (data := self.own.get_metrics_data()) is not None:
            yield json.loads(data.to_json(indent=None))

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, dict[str, Any]] = {}
        for document in self._documents():
            for metric in _metrics(document):
                entry = merged.setdefault(_name(metric), {
                    "doc": metric.get("description", ""), "kind": None, "points": {}})
                data = metric.get("data", {})
                for point in data.get("data_points", []):
                    attrs = tuple(sorted((k, str(v)) for k, v in
                                         (point.get("attributes") or {}).items()))
                    _merge(entry, data, point, attrs)
        for name, entry in sorted(merged.items()):
            yield _family(name, entry)

    def describe(self) -> list[Metric]:
        return []  # collected on demand: nothing to check at registration


def _merge(entry: dict[str, Any], data: dict[str, Any], point: dict[str, Any],
           attrs: tuple[tuple[str, str], ...]) -> None:
    points = entry["points"]
    if "bucket_counts" in point:
        entry["kind"] = "histogram"
        have = points.get(attrs)
        counts = list(point["bucket_counts"])
        if have is not None and have["bounds"] == point["explicit_bounds"]:
            counts = [a + b for a, b in zip(have["counts"], counts, strict=True)]
            total = have["sum"] + point["sum"]
        else:
            total = point["sum"]
        points[attrs] = {"bounds": point["explicit_bounds"], "counts": counts, "sum": total}
    elif data.get("is_monotonic"):
        entry["kind"] = "counter"
        points[attrs] = points.get(attrs, 0) + point["value"]
    else:
        entry["kind"] = "gauge"
        points[attrs] = point["value"]


def _family(name: str, entry: dict[str, Any]) -> Metric:
    labels = sorted({k for attrs in entry["points"] for k, _ in attrs})

    def values(attrs: tuple[tuple[str, str], ...]) -> list[str]:
        d = dict(attrs)
        return [d.get(k, "") for k in labels]

    family: Any
    if entry["kind"] == "histogram":
        family = HistogramMetricFamily(name, entry["doc"], labels=labels)
        for attrs, p in entry["points"].items():
            running, buckets = 0, []
            for bound, count in zip([*p["bounds"], "+Inf"], p["counts"], strict=True):
                running += count
                buckets.append((str(float(bound)) if bound != "+Inf" else bound, running))
            family.add_metric(values(attrs), buckets, p["sum"])
    elif entry["kind"] == "counter":
        family = CounterMetricFamily(name, entry["doc"], labels=labels)
        for attrs, v in entry["points"].items():
            family.add_metric(values(attrs), v)
    else:
        family = GaugeMetricFamily(name, entry["doc"], labels=labels)
        for attrs, v in entry["points"].items():
            family.add_metric(values(attrs), v)
    return family  # type: ignore[no-any-return]


def serve(directory: str, port: int, host: str,
          own: InMemoryMetricReader | None = None) -> tuple[Any, Any]:
    """Start the endpoint (``/metrics``) in a background thread; the server and thread."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(directory, own))
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                          "choose another --metrics-port") from None

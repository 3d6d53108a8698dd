"""``celery+redis://HOST:PORT/DB`` or ``celery+amqp://USER:PASS@HOST:PORT/VHOST``: chunk and
transform tasks on Celery workers, on as many machines as share the broker, the state store
and the object store.

Delivery is at least once (``acks_late`` with ``reject_on_worker_lost``: a task whose worker
dies is redelivered). Fan-in is the state store's atomic completion, never a chord (chord
counters double-count repeated tasks). Whoever sees committed outbox rows relays them (the
worker that aggregated, the runner, ``canonflow recover``): the relay claims rows
conditionally (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so running it in several places
sends each row once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_process_init

from canonflow import log as logs
from canonflow.config import Settings
from canonflow.dispatch import tasks
from canonflow.errors import ConfigError, RetryableError
from canonflow.model import ChunkSpec, TransformRequest
from canonflow.runtime import Runtime
from canonflow.stores import open_state_store
from canonflow.stores.state import Backlog
from canonflow.telemetry import metrics, setup

log = logging.getLogger("canonflow.celery")
app = Celery("canonflow")
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_settings_json: str | None = None
_pipeline: str | None = None


def broker_url(url: str) -> str:
    return url.split("+", 1)[1]


def configure(settings: Settings) -> None:
    """Point the app at the pipeline's broker and queue (client and worker alike)."""
    global _settings_json, _pipeline
    _settings_json = settings.to_worker_json()
    _pipeline = settings.name
    app.conf.update(
        broker_url=broker_url(settings.dispatcher),
        task_default_queue=settings.queue,
        broker_transport_options={"visibility_timeout": settings.celery_visibility_timeout},
    )


@worker_process_init.connect
def _init_pool_process(**_: Any) -> None:
    """Each pool process builds its own runtime after the fork (no inherited connections)."""
    if _settings_json is not None:
        tasks.init_worker(_settings_json, logging_as=logs.current())


def relay(rt: Runtime, job_id: str) -> int:
    """Send the job's committed, unsent outbox rows as transform tasks."""
    requests = rt.state.claim_for_dispatch(job_ids=[job_id])
    for request in requests:
        transform_task.apply_async(args=[request.model_dump_json()],
                                   kwargs={"pipeline": _pipeline})
    return len(requests)


def _ours(pipeline: str | None, task: str) -> None:
    """A task of another pipeline (two pipelines given one queue) goes back to the queue
    for that pipeline's workers, loudly, instead of running with the wrong settings."""
    if pipeline is not None and _pipeline is not None and pipeline != _pipeline:
        log.error("task of another pipeline refused: give each pipeline its own "
                  "celery_queue", extra={"task": task, "task_pipeline": pipeline,
                                         "worker_pipeline": _pipeline})
        time.sleep(1.0)  # do not spin on it
        raise Reject(f"task of pipeline {pipeline!r}", requeue=True)


@app.task(name="canonflow.chunk", autoretry_for=(RetryableError,), retry_backoff=True,
          max_retries=5)
def chunk_task(spec_json: str, pipeline: str | None = None) -> None:
    _ours(pipeline, "chunk")
    outcome = tasks.run_chunk(spec_json)
    if outcome["aggregated"]:
        relay(tasks.current_runtime(), outcome["result"]["job_id"])


@app.task(name="canonflow.chunks", autoretry_for=(RetryableError,), retry_backoff=True,
          max_retries=5)
def chunks_task(payload: str, pipeline: str | None = None) -> None:
    _ours(pipeline, "chunks")
    outcome = tasks.run_chunks(payload)
    if outcome["aggregated"]:
        relay(tasks.current_runtime(), outcome["results"][0]["job_id"])


@app.task(name="canonflow.transform")
def transform_task(request_json: str, pipeline: str | None = None) -> None:
    _ours(pipeline, "transform")
    tasks.run_transform_task(request_json)


def run_worker(settings: Settings, concurrency: int, name: str | None,
               metrics_port: int | None = None, metrics_host: str = "0.0.0.0") -> None:
    configure(settings)
    with ExitStack() as stack:
        if metrics_port is not None:
            stack.enter_context(serve_metrics(settings, metrics_port, metrics_host))
        _worker_main(settings, concurrency, name)


@contextmanager
def serve_metrics(settings: Settings, port: int, host: str) -> Iterator[None]:
    """The worker's Prometheus endpoint: its pool processes' metrics (each exports
    snapshots to a directory the endpoint reads) and the outbox backlog, observed here."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from canonflow.telemetry import prometheus
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--metrics-port needs {exc.name!r}: "
                          "pip install 'canonflow[otel]'") from None
    directory = tempfile.mkdtemp(prefix="canonflow-metrics-")
    os.environ[setup.METRICS_DIR] = directory  # read by the pool processes it forks
    own = InMemoryMetricReader()
    provider = MeterProvider(resource=setup.resource(), metric_readers=[own])

    def backlog() -> Backlog:
        # a connection per scrape, never one held open in a process that forks
        state = open_state_store(settings.state_store)
        try:
            return state.outbox_backlog(settings.name)
        finally:
            state.close()

    metrics.watch_backlog(backlog, settings.name, provider)
    server, _ = prometheus.serve(directory, port, host, own)
    log.info("serving metrics", extra={"address": f"{host}:{server.server_port}"})
    try:
        yield
    finally:
        server.shutdown()
        provider.shutdown()
        shutil.rmtree(directory, ignore_errors=True)


def _worker_main(settings: Settings, concurrency: int, name: str | None) -> None:
    argv = ["worker", f"--concurrency={concurrency}", "--pool=prefork",
            f"--queues={settings.queue}",
            f"--loglevel={logging.getLevelName(logs.current()[0])}", "--without-gossip",
            "--without-mingle"]
    if name:
        argv.append(f"--hostname={name}")
    app.worker_main(argv)


class CeleryDispatcher:
    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        configure(settings)

    def submit_chunk(self, spec: ChunkSpec) -> None:
        chunk_task.apply_async(args=[spec.model_dump_json()], kwargs={"pipeline": _pipeline})

    def submit_chunks(self, specs: list[ChunkSpec]) -> None:
        chunks_task.apply_async(args=[tasks.specs_json(specs)], kwargs={"pipeline": _pipeline})

    def submit_transform(self, request: TransformRequest) -> None:
        transform_task.apply_async(args=[request.model_dump_json()],
                                   kwargs={"pipeline": _pipeline})

    def lost_in_worker(self, key: str) -> bool:
        return True  # no pool to break: a failed task failed itself

    def close(self) -> None:
        app.pool.force_close_all()

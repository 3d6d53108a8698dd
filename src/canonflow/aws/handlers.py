"""Lambda handlers, one per stage, thin over the stage functions every dispatcher runs:

- :func:`plan` starts a tenant's job (or every tenant's, on a schedule) and sends its chunks;
- :func:`chunk` runs chunk specs (SQS batch or one async invoke); the invocation whose
  completion is the job's last aggregates it (the fan-in stays in the state store) and
  relays the job's transform requests;
- :func:`transform` runs transform requests, the seed's transform events and the legacy
  per-batch event;
- :func:`sweeper` is ``canonflow recover`` on a schedule: it aggregates stuck jobs, re-sends
  outbox rows left behind, re-sends the missing chunks of jobs idle too long, and turns
  events in the dead-letter queues into failures ``canonflow status`` shows.

Configuration (environment): ``CANONFLOW_PIPELINE`` (a pipeline YAML file, a path in the
bundle or ``s3://bucket/key``) or ``CANONFLOW_SETTINGS`` (the settings as JSON); the stores
and the dispatcher may be overridden by ``CANONFLOW_OBJECT_STORE``, ``CANONFLOW_STATE_STORE``,
``CANONFLOW_DISPATCHER`` (the template sets them from its resources). One runtime per
container, built on the first event.

Delivery is at least once (SQS, async invokes): every handler is idempotent through the state
store. A handler reports an SQS batch's failures per message (the others are deleted); a
message that keeps failing reaches its queue's dead-letter queue after N receives.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from canonflow import jsonio
from canonflow import log as logs
from canonflow.aggregate import complete_chunk
from canonflow.aws.events import is_sqs, parse_chunk_event, parse_transform_event
from canonflow.chunk import ChunkContinues, continue_when
from canonflow.config import Settings, load_settings
from canonflow.dispatch.base import Dispatcher, open_dispatcher
from canonflow.dispatch.tasks import run_chunk, run_transform_task
from canonflow.errors import CanonflowError, ConfigError, RequestRejected
from canonflow.model import ChunkError, ChunkResult, TriggerMode
from canonflow.runner import JobRunner, recover
from canonflow.runtime import Runtime
from canonflow.transform.run import continue_when as transform_continue_when

log = logging.getLogger("canonflow.aws")
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "canonflow"),
                  service=os.environ.get("POWERTOOLS_SERVICE_NAME", "canonflow"))


class LambdaContext(Protocol):
    def get_remaining_time_in_millis(self) -> int: ...


class RetryLater(Exception):  # a signal to the transport, not a failure
    """The event cannot be handled now (its request runs elsewhere): deliver it again."""


@dataclass
class Container:
    """What one Lambda container keeps between invocations."""

    settings: Settings
    rt: Runtime
    dispatcher: Dispatcher
    margin_seconds: float  # a sequential chunk stops at a checkpoint this long before its end
    transform_margin_seconds: float = 120.0  # a transform stops after a group commit

    def relay(self, job_id: str) -> int:
        """Send the job's committed, unsent outbox rows (claimed first: sent once)."""
        requests = self.rt.state.claim_for_dispatch(job_ids=[job_id])
        for request in requests:
            self.dispatcher.submit_transform(request)
        return len(requests)


_container: Container | None = None


def _load_settings() -> Settings:
    raw = os.environ.get("CANONFLOW_SETTINGS")
    if raw:
        settings = Settings.model_validate_json(raw)
    else:
        where = os.environ.get("CANONFLOW_PIPELINE")
        if not where:
            raise ConfigError("set CANONFLOW_PIPELINE (a pipeline file, a path or "
                              "s3://bucket/key) or CANONFLOW_SETTINGS (JSON)")
        if where.startswith("s3://"):
            import tempfile

            import boto3

            bucket, _, key = where[len("s3://"):].partition("/")
            body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
            with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as f:
                f.write(body)
            settings = load_settings(f.name, relative_to=Path.cwd())  # as if it were here
        else:
            settings = load_settings(where)
    overrides = {field: os.environ[env] for field, env in (
        ("object_store", "CANONFLOW_OBJECT_STORE"), ("state_store", "CANONFLOW_STATE_STORE"),
        ("dispatcher", "CANONFLOW_DISPATCHER")) if os.environ.get(env)}
    if overrides:
        settings = Settings.model_validate({**settings.to_worker_data(), **overrides})
    return settings


def configure(settings: Settings | None = None, dispatcher: Dispatcher | None = None,
              margin_seconds: float | None = None,
              transform_margin_seconds: float | None = None) -> Container:
    """Build this container's runtime (from the environment unless ``settings`` is given)."""
    global _container
    if _container is not None:
        _container.rt.close()
        _container.dispatcher.close()
    logs.configure(os.environ.get("CANONFLOW_LOG_LEVEL", "INFO"), "json")
    settings = settings or _load_settings()
    rt = Runtime(settings)
    margin = margin_seconds if margin_seconds is not None else float(
        os.environ.get("CANONFLOW_CHUNK_MARGIN_SECONDS", "60"))
    transform_margin = transform_margin_seconds if transform_margin_seconds is not None \
        else float(os.environ.get("CANONFLOW_TRANSFORM_MARGIN_SECONDS", "120"))
    _container = Container(settings, rt,
                           dispatcher or open_dispatcher(settings.dispatcher, settings), margin,
                           transform_margin)
    return _container


def container() -> Container:
    return _container or configure()


def reset() -> None:
    """Forget the container's runtime (tests; a new configuration)."""
    global _container
    if _container is not None:
        _container.rt.close()
        _container.dispatcher.close()
    _container = None


def _each(event: Any, context: LambdaContext,
          handle: Callable[[Any, LambdaContext], dict[str, Any]]) -> dict[str, Any]:
    """An SQS batch (partial failures reported per message) or one direct event."""
    metrics.add_metric(name="Events", unit=MetricUnit.Count,
                       value=len(event["Records"]) if is_sqs(event) else 1)
    if is_sqs(event):
        # A message that failed is reported in ``batchItemFailures`` (SQS delivers it again
        # after its visibility timeout), also when every message of the batch failed: an
        # error of the whole invocation would return the same messages, but count as a
        # Lambda error and slow the event source down, most often for a request that runs
        # elsewhere (RetryLater), which is no error at all.
        processor = BatchProcessor(event_type=EventType.SQS,
                                   raise_on_entire_batch_failure=False)

        def record_handler(record: SQSRecord) -> dict[str, Any]:
            try:
                return handle(record.body, context)
            except RetryLater as exc:
                log.info("event delivered again later", extra={"detail": str(exc)})
                raise
            except Exception:
                log.error("event failed: delivered again later", exc_info=True)
                raise

        response = process_partial_response(
            event=event, record_handler=record_handler, processor=processor,
            context=context)  # type: ignore[arg-type]
        return dict(response)
    return handle(event, context)


# -- chunk ------------------------------------------------------------------------------
def _chunk(body: Any, context: LambdaContext) -> dict[str, Any]:
    c = container()
    try:
        spec = parse_chunk_event(body)
    except RequestRejected as exc:  # a poison event: retrying cannot help
        log.error("chunk event rejected", extra={"error": str(exc)})
        metrics.add_metric(name="EventsRejected", unit=MetricUnit.Count, value=1)
        return {"rejected": str(exc)}
    margin_ms = c.margin_seconds * 1000
    with logs.bind(pipeline=c.settings.name, tenant_id=spec.table.tenant_id,
                   job_id=spec.job_id, chunk_id=spec.chunk_id):
        try:
            with continue_when(lambda: context.get_remaining_time_in_millis() < margin_ms):
                outcome = run_chunk(spec.model_dump_json(), c.rt)
        except ChunkContinues as exc:
            c.dispatcher.submit_chunk(spec)  # the same spec resumes from its checkpoint
            metrics.add_metric(name="ChunksContinued", unit=MetricUnit.Count, value=1)
            log.info("chunk continues in a new invocation", extra={"detail": str(exc)})
            return {"continued": True, "chunk_id": spec.chunk_id}
        result = outcome["result"]
        metrics.add_metric(name="ChunksProcessed", unit=MetricUnit.Count, value=1)
        metrics.add_metric(name="RecordsExtracted", unit=MetricUnit.Count,
                           value=result["records_processed"] if outcome["new"] else 0)
        sent = 0
        if outcome["aggregated"] or spec.trigger_mode is TriggerMode.PER_BATCH:
            sent = c.relay(spec.job_id)
        return {"chunk_id": spec.chunk_id, "new": outcome["new"],
                "aggregated": outcome["aggregated"], "transforms_sent": sent}


@metrics.log_metrics
def chunk(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Chunk specs: an SQS batch, or one spec (async invoke)."""
    return _each(event, context, _chunk)


# -- transform --------------------------------------------------------------------------
def _transform(body: Any, context: LambdaContext) -> dict[str, Any]:
    c = container()
    try:
        parsed = parse_transform_event(body)
    except RequestRejected as exc:  # tenant isolation or a malformed event: never retried
        log.error("transform event rejected", extra={"error": str(exc)})
        metrics.add_metric(name="EventsRejected", unit=MetricUnit.Count, value=1)
        return {"rejected": str(exc)}
    request = parsed.request
    mode = request.processing_mode.value
    count = len(request.source_files) if request.source_files is not None else 0
    with logs.bind(processing_mode=mode, source_files_count=count):
        if parsed.legacy:
            log.warning("legacy per-batch transform event: processed in time_based mode "
                        "(re-reads the lookback window)", extra={
                            "tenant_id": request.tenant_id, "table": request.table.label,
                            "lookback_hours": request.lookback_hours})
        log.info(f"Canonical transform starting in {mode} mode", extra={
            "request_id": request.request_id, "table": request.table.label,
            "source_files_manifest": request.source_files_manifest,
            "ignored_fields": list(parsed.ignored) or None})
        margin_ms = c.transform_margin_seconds * 1000

        def time_low() -> bool:
            return context.get_remaining_time_in_millis() < margin_ms

        with transform_continue_when(time_low):
            outcome = run_transform_task(request.model_dump_json(), c.rt)
    if "error" in outcome:
        if outcome.get("will_retry") and time_low():
            # stopped after a committed group (or failed) near the deadline: the next
            # attempt starts now, in a new invocation, after the committed groups
            c.dispatcher.submit_transform(request)
            metrics.add_metric(name="TransformsContinued", unit=MetricUnit.Count, value=1)
            log.info("transform continues in a new invocation", extra={
                "request_id": request.request_id, "detail": outcome["error"]})
            return {**outcome, "continued": True}
        if outcome.get("will_retry"):
            raise RetryLater(f"{request.request_id}: {outcome['error']}")
        return outcome  # failed for good, visibly in the state store
    result = outcome["result"]
    if result["skipped"]:
        record = c.rt.state.request(request.request_id)
        if record is not None and record.status not in ("done", "failed", "cancelled"):
            # another invocation holds it (or held it and died): try again once its lease
            # has lapsed, instead of dropping the event
            raise RetryLater(f"{request.request_id} is {record.status} elsewhere")
    else:
        metrics.add_metric(name="TransformsRun", unit=MetricUnit.Count, value=1)
        metrics.add_metric(name="RecordsCanonical", unit=MetricUnit.Count,
                           value=result["records_written"])
        metrics.add_metric(name="RecordsQuarantined", unit=MetricUnit.Count,
                           value=result["records_quarantined"])
    if request.job_id is not None:
        c.rt.state.settle_jobs([request.job_id])
    return outcome


@metrics.log_metrics
def transform(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Transform requests and the seed's transform events: an SQS batch, or one event."""
    return _each(event, context, _transform)


# -- plan -------------------------------------------------------------------------------
@metrics.log_metrics
def plan(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Start a job per tenant and send its chunks. ``{"tenant_id": ...}`` or
    ``{"tenant_ids": [...]}``; none (a schedule's event) means every tenant of the pipeline;
    ``"full_refresh": true`` ignores incremental cursors. A tenant whose job is unfinished
    is refused (its events carry it; the sweeper re-sends the missing chunks of one left
    idle); one whose job a killed ``canonflow run`` left behind has its missing chunks sent
    again, and its events carry it from then on."""
    c = container()
    event = event if isinstance(event, dict) else {}
    tenants = event.get("tenant_ids") or (
        [event["tenant_id"]] if event.get("tenant_id") else None)
    runner = JobRunner(c.settings, c.rt, c.dispatcher,
                       full_refresh=bool(event.get("full_refresh")))
    runner.validate()
    started, failed = runner.start(tenants)
    sent = 0
    for _, chunks in started:
        for spec in chunks:
            c.dispatcher.submit_chunk(spec)
            sent += 1
    jobs = [p.job_id for p, _ in started]
    for job_id in jobs:  # a dispatcher that ran the chunks already (inline): their requests
        c.relay(job_id)
    if jobs:
        c.rt.state.settle_jobs(jobs)
    metrics.add_metric(name="JobsStarted", unit=MetricUnit.Count, value=len(started))
    metrics.add_metric(name="ChunksSent", unit=MetricUnit.Count, value=sent)
    return {"jobs": jobs, "chunks_sent": sent,
            "failed_jobs": failed, "refused": runner.refused, "resumed": runner.resumed}


# -- sweeper ----------------------------------------------------------------------------
def _dead_letters(c: Container, queue_url: str, kind: str, client: Any) -> int:
    """Turn each dead-lettered event into a failure the state store shows, then delete it:
    a chunk's becomes its failed result (its job settles, the error in its report), a
    transform request's its failure."""
    handled = 0
    while True:
        got = client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                     WaitTimeSeconds=0,
                                     AttributeNames=["ApproximateReceiveCount"])
        messages = got.get("Messages", [])
        if not messages:
            return handled
        for message in messages:
            if _dead_letter(c, message["Body"], kind):  # one it cannot read stays there
                client.delete_message(QueueUrl=queue_url,
                                      ReceiptHandle=message["ReceiptHandle"])
                handled += 1


def _dead_letter(c: Container, body: str, kind: str) -> bool:
    why = "the event reached the dead-letter queue (every delivery failed)"
    try:
        doc = jsonio.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("requestPayload"), dict):
            body = jsonio.dumps_str(doc["requestPayload"])  # an async invoke's on-failure record
    except ValueError:
        pass
    try:
        if kind == "chunk":
            spec = parse_chunk_event(body)
            complete_chunk(c.rt, ChunkResult(
                job_id=spec.job_id, chunk_id=spec.chunk_id, completed=False,
                records_processed=0, processing_time=0.0, s3_files_written=[],
                s3_files_count=0, table_metadata=spec.table,
                error=ChunkError(type="DeadLettered", message=why, retryable=False)))
            c.relay(spec.job_id)
        else:
            request = parse_transform_event(body).request
            if c.rt.state.request(request.request_id) is not None:
                c.rt.state.finish_request(request.request_id, None, error=why)
                if request.job_id is not None:
                    c.rt.state.settle_jobs([request.job_id])
        log.error("dead-lettered event recorded as failed", extra={"kind": kind})
        return True
    except (CanonflowError, ValueError) as exc:
        log.error("dead-lettered event could not be read; left in the queue", extra={
            "kind": kind, "error": str(exc)})
        return False


@metrics.log_metrics
def sweeper(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """``canonflow recover`` on a schedule, plus: the missing chunks of a job idle for
    ``stale_seconds`` are sent again (resumed from their checkpoints), and the dead-letter
    queues (``CANONFLOW_CHUNK_DLQ``, ``CANONFLOW_TRANSFORM_DLQ``) are drained into failures
    the state store shows."""
    c = container()
    event = event if isinstance(event, dict) else {}
    older_than = float(event.get("older_than_seconds",
                                 os.environ.get("CANONFLOW_SWEEP_AFTER_SECONDS", "900")))
    stale = float(event.get("stale_seconds",
                            os.environ.get("CANONFLOW_STALE_JOB_SECONDS", "3600")))
    dead = 0
    dlqs = [(os.environ.get(env), kind) for env, kind in (
        ("CANONFLOW_CHUNK_DLQ", "chunk"), ("CANONFLOW_TRANSFORM_DLQ", "transform"))]
    if any(url for url, _ in dlqs):
        client = getattr(c.dispatcher, "client", None)
        if client is None or not hasattr(client, "receive_message"):
            import boto3

            client = boto3.client("sqs")
        for url, kind in dlqs:
            if url:
                dead += _dead_letters(c, url, kind, client)
    state, resent = c.rt.state, 0
    cutoff = time.time() - stale
    for job in state.unfinished_jobs():
        if job.pipeline != c.settings.name or job.status != "running" \
                or job.updated_at.timestamp() > cutoff:
            continue
        done = {r.chunk_id for r in state.chunk_results(job.job_id)}
        for spec in state.chunk_specs(job.job_id):
            if spec.chunk_id not in done:
                c.dispatcher.submit_chunk(spec)
                resent += 1
    summary = recover(c.rt, c.dispatcher, older_than=older_than, pipeline=c.settings.name)
    summary.update(chunks_resent=resent, dead_letters_recorded=dead)
    for key, value in summary.items():
        metrics.add_metric(name="".join(p.title() for p in key.split("_")),
                           unit=MetricUnit.Count, value=value)
    log.info("sweep done", extra=summary)
    return summary


__all__ = ["chunk", "configure", "plan", "reset", "sweeper", "transform"]

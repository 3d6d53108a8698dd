"""Dispatcher port. Every transport here is at-least-once; exactly-once effects come from the
state store (see canonflow.aggregate and canonflow.transform.run)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from canonflow.config import Settings
from canonflow.model import ChunkSpec, TransformRequest
from canonflow.schemes import DISPATCHERS

TaskOutcome = dict[str, Any]


class Dispatcher(Protocol):
    """``submit_*`` return a Future when the transport hands results back to the caller
    (inline, local); remote transports (Celery) return None and the caller follows the
    state store instead."""

    url: str

    def submit_chunk(self, spec: ChunkSpec) -> Future[TaskOutcome] | None: ...

    def submit_chunks(self, specs: list[ChunkSpec]) -> Future[TaskOutcome] | None:
        """Chunks of one job to run in one task (:func:`canonflow.plan.task_batches`),
        where the transport has such a task; else each as :meth:`submit_chunk`."""

    def submit_transform(self, request: TransformRequest) -> Future[TaskOutcome] | None: ...

    def lost_in_worker(self, key: str) -> bool:
        """After a task's future failed: True if the task itself was running when its
        worker died (or failed on its own), False if it only waited behind a task that
        killed the pool (it never ran; run it again without counting an attempt)."""

    def close(self) -> None: ...


def chunk_key(spec: ChunkSpec) -> str:
    return f"chunk:{spec.job_id}:{spec.chunk_id}"


def chunks_key(specs: list[ChunkSpec]) -> str:
    return "chunks:" + "+".join(f"{s.job_id}:{s.chunk_id}" for s in specs)


def transform_key(request: TransformRequest) -> str:
    return f"transform:{request.request_id}"


def url_options(url: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


def open_dispatcher(url: str, settings: Settings) -> Dispatcher:
    """Open the dispatcher a URL names (see :data:`canonflow.schemes.DISPATCHERS`)."""
    dispatcher: Dispatcher = DISPATCHERS.open(url, settings)
    return dispatcher

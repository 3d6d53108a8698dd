"""The task bodies every dispatcher runs: a chunk (then its completion), or a transform.

Each worker process builds one :class:`Runtime` from the pipeline settings (``init_worker``);
task arguments and return values are plain JSON-compatible payloads.
"""

from __future__ import annotations

import logging

from canonflow import memory
from canonflow.aggregate import complete_chunk
from canonflow.chunk import process_chunk
from canonflow.config import Settings
from canonflow.dispatch.base import TaskOutcome
from canonflow.errors import CanonflowError
from canonflow.model import ChunkSpec, TransformRequest
from canonflow.runtime import Runtime
from canonflow.transform import run_transform

log = logging.getLogger("canonflow.tasks")
_runtime: Runtime | None = None
MAX_TRANSFORM_ATTEMPTS = 3


def init_worker(settings_json: str) -> None:
    """Build the worker's runtime and open its stores now, while the parent plans."""
    global _runtime
    memory.tune()
    _runtime = Runtime(Settings.model_validate_json(settings_json))
    _runtime.warm_up()


def ping() -> bool:
    return True


def current_runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("worker runtime not initialised: call init_worker first")
    return _runtime


def run_chunk(spec_json: str, rt: Runtime | None = None) -> TaskOutcome:
    rt = rt or current_runtime()
    spec = ChunkSpec.model_validate_json(spec_json)
    result = process_chunk(spec, rt)
    completion = complete_chunk(rt, result)
    return {"result": result.model_dump(mode="json"), "new": completion.new,
            "aggregated": completion.claimed}


def run_transform_task(request_json: str, rt: Runtime | None = None) -> TaskOutcome:
    rt = rt or current_runtime()
    request = TransformRequest.model_validate_json(request_json)
    try:
        result = run_transform(request, rt)
    except CanonflowError as exc:
        again = exc.retryable and rt.state.retry_later(
            request.request_id, str(exc), MAX_TRANSFORM_ATTEMPTS)
        log.error("transform failed", extra={"request_id": request.request_id,
                                             "error": str(exc), "will_retry": again})
        return {"request_id": request.request_id, "error": str(exc), "retryable": exc.retryable}
    return {"request_id": request.request_id, "result": result.model_dump(mode="json")}

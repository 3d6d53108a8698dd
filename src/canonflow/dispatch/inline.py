"""``inline://``: every task runs synchronously in the calling process (tests, debugging)."""

from __future__ import annotations

from concurrent.futures import Future

from canonflow.config import Settings
from canonflow.dispatch.base import TaskOutcome
from canonflow.dispatch.tasks import run_chunk, run_chunks, run_transform_task, specs_json
from canonflow.model import ChunkSpec, TransformRequest
from canonflow.runtime import Runtime


def _done(fn: object, *args: object) -> Future[TaskOutcome]:
    future: Future[TaskOutcome] = Future()
    try:
        future.set_result(fn(*args))  # type: ignore[operator]
    except BaseException as exc:
        future.set_exception(exc)
    return future


class InlineDispatcher:
    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self._rt = Runtime(settings)

    def submit_chunk(self, spec: ChunkSpec) -> Future[TaskOutcome]:
        return _done(run_chunk, spec.model_dump_json(), self._rt)

    def submit_chunks(self, specs: list[ChunkSpec]) -> Future[TaskOutcome]:
        return _done(run_chunks, specs_json(specs), self._rt)

    def submit_transform(self, request: TransformRequest) -> Future[TaskOutcome]:
        return _done(run_transform_task, request.model_dump_json(), self._rt)

    def lost_in_worker(self, key: str) -> bool:
        return True  # no pool to break: a failed task failed itself

    def close(self) -> None:
        self._rt.close()

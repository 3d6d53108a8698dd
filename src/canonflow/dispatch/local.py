"""``local://?workers=N``: a pool of worker processes on this machine (default: one per core).

Workers are forked from a fork server that imported canonflow once (``forkserver`` with a
preload): a worker never inherits the parent's threads, open SQLite handles or HTTP
connections, and starting one costs a fork, not a second round of imports.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from canonflow import jsonio, log
from canonflow.config import Settings
from canonflow.dispatch.base import TaskOutcome, chunk_key, transform_key, url_options
from canonflow.dispatch.tasks import (
    init_worker,
    ping,
    run_chunk,
    run_marked,
    run_transform_task,
)
from canonflow.errors import ConfigError, RetryableError, TerminalError
from canonflow.lease import holder_id, pid_gone
from canonflow.model import ChunkSpec, TransformRequest

START_FAILURE = "start-failure"  # in the marks folder: why a worker could not start


class LocalDispatcher:
    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        opts = url_options(url)
        try:
            workers = int(opts.get("workers", os.cpu_count() or 2))
        except ValueError:
            raise ConfigError(f"dispatcher URL {url!r}: workers must be a whole number") from None
        if workers < 1:
            raise ConfigError(f"dispatcher URL {url!r}: workers must be at least 1")
        self.workers = workers
        self._settings_json = settings.to_worker_json()
        self._marks = Path(tempfile.mkdtemp(prefix="canonflow-running-"))
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["canonflow.dispatch.tasks", "canonflow.stores.sqlite"])
        pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=context,
            initializer=init_worker,
            initargs=(self._settings_json, holder_id(), log.current(),
                      str(self._marks / START_FAILURE)),
        )
        # start every worker now: their imports and store set-up overlap with planning
        for _ in range(self.workers):
            pool.submit(ping)
        return pool

    def _submit(self, fn: Any, key: str, payload: str) -> Future[TaskOutcome]:
        """A worker that died breaks the whole pool: start a new one and submit again (the
        tasks that were in the broken pool fail; ``lost_in_worker`` tells their callers
        which one was running in the dead worker and which only waited behind it)."""
        try:
            return self._pool.submit(run_marked, str(self._marks), key, fn, payload)
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._check_start()
            self._pool = self._start()
            return self._pool.submit(run_marked, str(self._marks), key, fn, payload)

    def _check_start(self) -> None:
        """A worker that could not start (its stores do not open, its settings are wrong)
        fails the run with its reason, instead of a pool started again and again."""
        failure = self._marks / START_FAILURE
        if not failure.exists():
            return
        payload = jsonio.loads(failure.read_text())
        retryable = bool(payload.get("retryable"))
        reason = " ".join(str(payload.get("message")).split())  # one line
        then = ("run the command again when that is back" if retryable else
                "fix that and run the command again")
        kind = RetryableError if retryable else TerminalError
        raise kind(f"a local worker could not start: {reason}; {then} (unfinished jobs "
                   "resume)")

    def submit_chunk(self, spec: ChunkSpec) -> Future[TaskOutcome]:
        return self._submit(run_chunk, chunk_key(spec), spec.model_dump_json())

    def submit_transform(self, request: TransformRequest) -> Future[TaskOutcome]:
        return self._submit(run_transform_task, transform_key(request),
                            request.model_dump_json())

    def lost_in_worker(self, key: str) -> bool:
        """Was the task ``key`` running in a worker that died (its mark is left behind)?"""
        for mark in self._marks.iterdir():
            if mark.name.isdigit() and pid_gone(int(mark.name)):
                try:
                    running = mark.read_text()
                except OSError:
                    continue
                if running == key:
                    mark.unlink(missing_ok=True)
                    return True
        return False

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._marks, ignore_errors=True)

"""``local://?workers=N``: a pool of worker processes on this machine (default: one per core).

Workers are forked from a fork server that imported canonflow once (``forkserver`` with a
preload): a worker never inherits the parent's threads, open SQLite handles or HTTP
connections, and starting one costs a fork, not a second round of imports.

Ctrl-C raises KeyboardInterrupt in the caller's thread between any two of its bytecodes,
also while it holds a lock it was about to release: ``concurrent.futures.wait`` holds the
lock of every future it waits on while it installs its waiter (one lock after the other),
``ProcessPoolExecutor.submit`` a queue's mutex and a semaphore's lock. A lock of the pool
left held that way blocks the pool's manager thread for good, and with it the pool's
shutdown and the exit of the process. So the caller's thread never touches the pool: a
thread of the dispatcher owns it (starts it, submits to it, shuts it down); the futures the
caller gets are the dispatcher's own, settled from the pool's by another thread; the caller
reaches both through ``queue.SimpleQueue`` (its ``get``, interrupted, leaves nothing held).
Workers ignore Ctrl-C (it is their parent's to handle), and ``close`` is bounded: workers
still busy ``CLOSE_GRACE_SECONDS`` after it began are stopped, as a killed run's would be
(what they ran resumes: ``canonflow recover``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, TypeVar, cast

from canonflow import jsonio, log
from canonflow.config import Settings
from canonflow.dispatch.base import (
    TaskOutcome,
    chunk_key,
    chunks_key,
    transform_key,
    url_options,
)
from canonflow.dispatch.tasks import (
    init_worker,
    ping,
    run_chunk,
    run_chunks,
    run_marked,
    run_transform_task,
    specs_json,
)
from canonflow.errors import ConfigError, RetryableError, TerminalError
from canonflow.lease import holder_id, pid_gone
from canonflow.model import ChunkSpec, TransformRequest

START_FAILURE = "start-failure"  # in the marks folder: why a worker could not start
CLOSE_GRACE_SECONDS = 5.0  # on close: how long running tasks may end before their workers stop

logger = logging.getLogger("canonflow.dispatch.local")
T = TypeVar("T")
Reply = SimpleQueue[tuple[bool, Any]]  # (True, what a command returned) or (False, its error)
Command = tuple[Callable[..., Any], tuple[Any, ...], Reply]


def _start_worker(*args: Any) -> None:
    """A worker's start (``init_worker``), with Ctrl-C left to its parent: the terminal's
    interrupt reaches every process of the group, and one that lands in a worker cuts a
    task at any bytecode, or (between tasks) ends the worker with a traceback. The parent
    stops the pool itself (``close``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(*args)


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
        self._closed = False
        self._pool: ProcessPoolExecutor | None = None  # the pool thread's alone
        self._commands: SimpleQueue[Command | None] = SimpleQueue()
        self._finished: SimpleQueue[
            tuple[Future[TaskOutcome], Future[TaskOutcome], str] | None] \
            = SimpleQueue()  # (the caller's future, its task's in the pool, its key)
        # keys of tasks that raised in a live worker (they ran: ``lost_in_worker`` says so)
        self._failed_alone: set[str] = set()
        self._failed_lock = threading.Lock()
        for target, name in ((self._serve, "canonflow-local-pool"),
                             (self._settle, "canonflow-local-results")):
            threading.Thread(target=target, name=name, daemon=True).start()
        self._call(self._start)

    # -- in the caller's thread -------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` run in the pool thread: what it returns, or raise what it raised."""
        if self._closed:
            raise RuntimeError("the local dispatcher is closed")
        reply: Reply = SimpleQueue()
        self._commands.put((fn, args, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return cast(T, value)

    def submit_chunk(self, spec: ChunkSpec) -> Future[TaskOutcome]:
        return self._submit(run_chunk, chunk_key(spec), spec.model_dump_json())

    def submit_chunks(self, specs: list[ChunkSpec]) -> Future[TaskOutcome]:
        return self._submit(run_chunks, chunks_key(specs), specs_json(specs))

    def submit_transform(self, request: TransformRequest) -> Future[TaskOutcome]:
        return self._submit(run_transform_task, transform_key(request),
                            request.model_dump_json())

    def _submit(self, fn: Any, key: str, payload: str) -> Future[TaskOutcome]:
        return self._call(self._submit_to_pool, fn, key, payload)

    def lost_in_worker(self, key: str) -> bool:
        """Did the task ``key`` run: it raised in its worker, or was running in a worker
        that died (its mark is left behind)? False for one that only waited behind a task
        that killed the pool."""
        with self._failed_lock:
            if key in self._failed_alone:
                self._failed_alone.discard(key)
                return True
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
        """Shut the pool down: the tasks not started are cancelled, the running ones have
        ``CLOSE_GRACE_SECONDS`` to end, then their workers are stopped (SIGTERM, then
        SIGKILL) like a killed run's, and what they ran resumes. Never waits for ever,
        whatever an interrupt left held in the caller's thread."""
        if self._closed:
            return
        self._closed = True
        workers: Reply = SimpleQueue()
        done: Reply = SimpleQueue()
        self._commands.put((self._workers, (), workers))
        self._commands.put((self._shut_down, (), done))
        self._commands.put(None)  # then the pool thread ends
        processes: list[Any] = []
        for stop in ("", "terminate", "kill"):
            if stop:
                logger.warning("local workers still busy %.0f s after the dispatcher closed: "
                               "stopping them (%s); what they ran resumes",
                               CLOSE_GRACE_SECONDS, stop)
                with contextlib.suppress(Empty):  # (empty: the pool thread never got to it)
                    ok, listed = workers.get(timeout=0)
                    processes = listed if ok else []
                for process in processes:
                    with contextlib.suppress(Exception):  # gone already
                        getattr(process, stop)()
            with contextlib.suppress(Empty):
                done.get(timeout=CLOSE_GRACE_SECONDS)
                break
        else:
            logger.error("the local worker pool did not shut down %.0f s after its workers "
                         "were killed; leaving it", CLOSE_GRACE_SECONDS)
        self._finished.put(None)  # then the results thread ends
        shutil.rmtree(self._marks, ignore_errors=True)

    # -- in the pool thread -----------------------------------------------------------------
    def _serve(self) -> None:
        """The pool thread: run the commands, in order, until the last."""
        while (command := self._commands.get()) is not None:
            fn, args, reply = command
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:  # the caller's to raise
                outcome = (False, exc)
            reply.put(outcome)
            del command, fn, args, reply, outcome  # keep no payload while idle

    def _start(self) -> None:
        context = multiprocessing.get_context("forkserver")
        # imported once in the fork server, for every worker it forks (httpcore: what httpx
        # imports on its first client)
        context.set_forkserver_preload(["canonflow.dispatch.tasks", "canonflow.stores.sqlite",
                                        "httpcore"])
        pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=context,
            initializer=_start_worker,
            initargs=(self._settings_json, holder_id(), log.current(),
                      str(self._marks / START_FAILURE)),
        )
        # start every worker now: their imports and store set-up overlap with planning
        for _ in range(self.workers):
            pool.submit(ping)
        self._pool = pool

    def _submit_to_pool(self, fn: Any, key: str, payload: str) -> Future[TaskOutcome]:
        """A worker that died breaks the whole pool: start a new one and submit again (the
        tasks that were in the broken pool fail; ``lost_in_worker`` tells their callers
        which one was running in the dead worker and which only waited behind it)."""
        assert self._pool is not None
        try:
            task = self._pool.submit(run_marked, str(self._marks), key, fn, payload)
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._check_start()
            self._start()
            task = self._pool.submit(run_marked, str(self._marks), key, fn, payload)
        future: Future[TaskOutcome] = Future()
        # called in the pool's manager thread: it only queues, never waits on a lock
        task.add_done_callback(lambda ended: self._finished.put((future, ended, key)))
        return future

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

    def _workers(self) -> list[Any]:
        """The pool's worker processes (``multiprocessing`` processes, by pid)."""
        return list((getattr(self._pool, "_processes", None) or {}).values())

    def _shut_down(self) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- in the results thread --------------------------------------------------------------
    def _settle(self) -> None:
        """Settle each caller's future as its task's ended. Only this thread waits on the
        caller's futures' locks (one an interrupt left held blocks it, never the pool)."""
        while (item := self._finished.get()) is not None:
            future, task, key = item
            try:
                if task.cancelled():
                    future.cancel()
                    future.set_running_or_notify_cancel()  # wakes whoever waits on it
                elif (error := task.exception()) is not None:
                    if not isinstance(error, BrokenProcessPool):  # raised by the task
                        with self._failed_lock:
                            self._failed_alone.add(key)
                    future.set_exception(error)
                else:
                    future.set_result(task.result())
            except (InvalidStateError, RuntimeError):  # its caller cancelled it
                pass
            except Exception:  # never leaves the other futures unsettled
                logger.exception("could not hand a local task's outcome on")
            del item, future, task, key

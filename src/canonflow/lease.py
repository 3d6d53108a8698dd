"""Who holds what: holder ids, liveness of a holder, and heartbeats that keep leases fresh.

A holder id names one process: ``host:space:pid:start:token``, where ``space`` is the boot
id and the pid namespace of the process (two containers that share a hostname see other
pids). A holder of this host *and* this pid space whose process is gone (or whose pid now
belongs to a newer process) is known dead at once, so its leases are taken over without
waiting for them to expire; any other holder is dead only when its lease lapses, because
its heartbeat stopped (seconds, not a fixed long expiry).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from functools import cache
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from canonflow.stores.state import JobRecord, StateStore

log = logging.getLogger("canonflow.lease")


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 on (Linux), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses
    return stat.rsplit(")", 1)[-1].split()


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22), or None."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _pid_space() -> str:
    """This boot and this pid namespace: pids mean the same only within one."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip().replace("-", "")[:12]
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return "unknown"
    return f"{boot}-{namespace}"


@cache
def _process_id() -> tuple[str, str, int, str]:
    pid = os.getpid()
    return socket.gethostname(), _pid_space(), pid, _start_ticks(pid) or "0"


def holder_id() -> str:
    """A new holder id for this process (unique per call: one per lease or runner)."""
    if _process_id()[2] != os.getpid():  # forked since the cache was filled
        _process_id.cache_clear()
    host, space, pid, start = _process_id()
    return f"{host}:{space}:{pid}:{start}:{uuid.uuid4().hex[:8]}"


def worker_label() -> str:
    """This process, short: ``host:pid`` (what a job's timeline names a worker)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_gone(pid: int) -> bool:
    """A process of this pid space that no longer runs (gone, or killed and not reaped)."""
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def holder_dead(holder: str) -> bool:
    """True only when ``holder`` is known dead: a process of this host and pid space that
    is gone (or whose pid was reused)."""
    parts = holder.rsplit(":", 4)
    if len(parts) != 5:
        return False
    host, space, pid_text, start, _ = parts
    if host != socket.gethostname() or space == "unknown" or space != _process_id()[1] \
            or not pid_text.isdigit():
        return False  # another machine or container: only its lease's expiry tells
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    fields = _stat(pid)
    if fields is None:
        return False
    if fields[0] in ("Z", "X"):
        return True  # killed, not yet reaped
    return start != "0" and fields[19] != start  # the pid now belongs to a newer process


def exit_with(parent: str, interval: float = 1.0) -> None:
    """Exit this process soon after ``parent`` (a holder id of the process that started
    it) is gone: pool workers of a killed run must not linger; the work they held is
    taken over as a dead holder's."""
    def watch() -> None:
        while True:
            time.sleep(interval)
            if holder_dead(parent):
                log.warning("the process that started this worker is gone; exiting",
                            extra={"parent": parent})
                os._exit(70)

    threading.Thread(target=watch, name="canonflow-parent-watch", daemon=True).start()


def runner_lock(holder: str) -> str:
    """The lease a runner holds while it drives jobs."""
    return f"runner:{holder}"


# the runner of a job no process drives: its events carry it (chunk and transform messages
# on queues, function invocations); the sweeper re-sends the chunks of one left idle
EVENT_DRIVEN = "events:"


def event_driven(job: JobRecord) -> bool:
    return job.runner is not None and job.runner.startswith(EVENT_DRIVEN)


def runner_alive(state: StateStore, job: JobRecord) -> bool:
    """Is the process that drives ``job`` still there (its lease fresh, not known dead)?
    A job its events drive has no such process: it counts as driven."""
    if event_driven(job):
        return True
    if job.runner is None or holder_dead(job.runner):
        return False
    return bool(state.live_locks([runner_lock(job.runner)]))


class Heartbeat:
    """Call ``beat`` every ``interval`` seconds until stopped. A beat that raises is logged
    and tried again at the next interval; a beat that returns False means the lease is gone
    (taken over): ``lost`` is set and beating stops. Once ``stop`` returns, no beat of this
    heartbeat runs any more (one in flight is waited for, at most ``STOP_WAIT_SECONDS``).

    Every heartbeat of a process beats on one shared thread (:class:`_Beats`): a thread of
    its own per lease cost a start and a join for each lease a worker took, a few per small
    transform, which was 7 % of a worker's time syncing many small tenants."""

    def __init__(self, interval: float, beat: Callable[[], object], what: str) -> None:
        self._interval = interval
        self._beat = beat
        self._what = what
        self._stopped = False  # guarded by the shared scheduler's lock
        self.lost = threading.Event()

    def _run(self) -> bool:
        """One beat; whether to beat again."""
        try:
            renewed = self._beat()
        except Exception as exc:  # the next beat may succeed; the lease lapses if not
            log.warning("heartbeat failed", extra={"lease": self._what,
                                                   "error": f"{type(exc).__name__}"})
            return True
        if renewed is False:
            log.error("lease lost: another holder has taken it over",
                      extra={"lease": self._what})
            self.lost.set()
            return False
        return True

    def __enter__(self) -> Heartbeat:
        _beats().add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        _beats().remove(self)


STOP_WAIT_SECONDS = 5.0  # how long ``Heartbeat.stop`` waits for a beat in flight


class _Beats:
    """The thread that runs every heartbeat of this process, each when it is due, one at a
    time (they all talk to the same state store: one slow beat means all would be slow)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Heartbeat]] = []  # a heap; stopped ones dropped
        self._order = itertools.count()  # when they pop
        self._running: Heartbeat | None = None
        self._thread: threading.Thread | None = None

    def add(self, beat: Heartbeat) -> None:
        with self._cond:
            beat._stopped = False
            self._schedule(beat)
            if self._thread is None:
                self._start()
            elif self._due[0][2] is beat:  # due before the one the thread waits for
                self._cond.notify()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="canonflow-heartbeats",
                                        daemon=True)
        self._thread.start()

    def remove(self, beat: Heartbeat) -> None:
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        with self._cond:
            beat._stopped = True
            if threading.current_thread() is self._thread:
                return  # stopped by its own beat
            while self._running is beat and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def _schedule(self, beat: Heartbeat) -> None:
        heapq.heappush(self._due, (time.monotonic() + beat._interval, next(self._order), beat))

    def _next(self) -> Heartbeat:
        """Wait for the next due beat of a running heartbeat (the lock held)."""
        while True:
            while self._due and self._due[0][2]._stopped:
                heapq.heappop(self._due)
            if not self._due:
                self._cond.wait()
                continue
            wait = self._due[0][0] - time.monotonic()
            if wait <= 0:
                return heapq.heappop(self._due)[2]
            self._cond.wait(wait)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    beat = self._running = self._next()
                again = False
                try:
                    again = beat._run()
                finally:
                    with self._cond:
                        self._running = None
                        if again and not beat._stopped:
                            self._schedule(beat)
                        self._cond.notify_all()
        finally:  # a beat raised past Exception: the other heartbeats beat on a new thread
            with self._cond:
                self._thread = None
                if self._due:
                    self._start()


_shared: list[_Beats] = []


def _beats() -> _Beats:
    if not _shared:
        _shared.append(_Beats())
    return _shared[0]


def _forget_beats() -> None:
    """A forked child has none of its parent's threads: it starts its own."""
    _shared.clear()


os.register_at_fork(after_in_child=_forget_beats)

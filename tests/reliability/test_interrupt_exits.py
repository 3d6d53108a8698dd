"""Ctrl-C ends a local run at once, whatever the moment: exit 130 within a bounded time, with
its one `interrupted: ... can be resumed` line and no traceback, never a hang in the
dispatcher's close.

The hang this guards against: Ctrl-C raises KeyboardInterrupt in the main thread between
two bytecodes, possibly while it holds a lock it was about to release
(``concurrent.futures.wait`` holds every future's lock while it installs its waiter, one
lock after the other; ``ProcessPoolExecutor.submit`` a queue's and a semaphore's). A lock
the pool's manager thread needs, left held, blocks that thread for good (at its next
``set_result``/``cancel``), and ``shutdown(wait=True)`` (and the exit) waits for it
forever. The end-to-end race is rare (3 runs in 14 for the audit, on a busy machine), so
the mechanism is also tested deterministically: an interrupt injected where a signal can
land (in ``wait``; at every sampled bytecode)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from canonflow.connectors.demo_api import DemoApi, DemoServer, serve, tenant_token

BOUND = 20.0  # seconds from Ctrl-C to the exit of the run
TRIALS = 6
ROOT = Path(__file__).resolve().parents[2]


def _kill(proc: subprocess.Popen[str]) -> None:
    """A run that did not exit: SIGKILL it by its pid (its workers follow it)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


# -- the mechanism, deterministic ---------------------------------------------------------

SCRIPT = """
import concurrent.futures
import concurrent.futures._base as base
import sys
import time

from canonflow.config import Settings
from canonflow.dispatch.local import LocalDispatcher

settings = Settings(name="t", object_store="file://{data}",
                    state_store="sqlite:///{data}/state.db", dispatcher="inline://")
dispatcher = LocalDispatcher("local://?workers=2", settings)
# tasks that run a while: some are running, the others wait behind them when Ctrl-C comes
futures = [dispatcher._submit(eval, f"nap-{{i}}", "__import__('time').sleep(0.3)")
           for i in range(10)]
time.sleep(0.5)


def interrupted_enter(self):  # Ctrl-C between two lock acquisitions of wait()
    for future in self.futures[: len(self.futures) // 2]:
        future._condition.acquire()
    raise KeyboardInterrupt


base._AcquireFutures.__enter__ = interrupted_enter
try:
    concurrent.futures.wait(futures, timeout=5, return_when=concurrent.futures.FIRST_COMPLETED)
except KeyboardInterrupt:
    pass
started = time.monotonic()
dispatcher.close()
print(f"closed in {{time.monotonic() - started:.1f}} s", flush=True)
"""


def test_close_after_an_interrupted_wait_returns(tmp_path: Path) -> None:
    """An interrupt that left future locks held (as one inside ``wait`` can) does not make
    the dispatcher's close (nor the exit of the process) wait forever."""
    data = tmp_path / "data"
    data.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(data=data)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=BOUND + 10)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail(f"close (or the exit) hung with future locks held by the interrupted "
                    f"thread: still running after {BOUND + 10:.0f} s")
    assert proc.returncode == 0, err
    assert out.startswith("closed in "), (out, err)
    assert "Traceback" not in err, err


STUCK = """
import logging
import os
import time

import canonflow.dispatch.local as local
from canonflow.config import Settings

local.CLOSE_GRACE_SECONDS = 1.0
logging.basicConfig(level=logging.WARNING, format="%(message)s")  # how close stopped them
settings = Settings(name="t", object_store="file://{data}",
                    state_store="sqlite:///{data}/state.db", dispatcher="inline://")
dispatcher = local.LocalDispatcher("local://?workers=2", settings)
futures = [dispatcher._submit(eval, f"stuck-{{i}}", "__import__('time').sleep(600)")
           for i in range(4)]
while len(os.listdir(dispatcher._marks)) < 2:  # both workers run a task that never ends
    time.sleep(0.05)
pids = [int(name) for name in os.listdir(dispatcher._marks) if name.isdigit()]
started = time.monotonic()
dispatcher.close()
took = time.monotonic() - started
alive = []
for pid in pids:
    try:
        os.kill(pid, 0)
        alive.append(pid)
    except ProcessLookupError:
        pass
print(f"closed in {{took:.3f}} s; workers alive: {{alive}}", flush=True)
"""


def test_close_stops_workers_whose_tasks_do_not_end(tmp_path: Path) -> None:
    """Tasks still running a grace period after close: their workers are stopped (the
    tasks resume like a killed run's), close does not wait for them."""
    data = tmp_path / "data"
    data.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", STUCK.format(data=data)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail("close waited for tasks that never end")
    assert proc.returncode == 0, err
    took = float(out.split()[2])
    assert took >= 1.0, out  # it waited one grace period: the tasks were not cut at once
    # then SIGTERM ended them (the workers' default action), without SIGKILL
    assert "(terminate)" in err and "(kill)" not in err, err
    assert out.rstrip().endswith("workers alive: []"), out


SWEEP = """
import concurrent.futures as cf
import os
import queue
import sys
import threading
import time

from canonflow.config import Settings
from canonflow.dispatch.local import LocalDispatcher

WATCHED = ("concurrent/futures/", "/queue.py", "/threading.py", "multiprocessing/",
           "canonflow/dispatch/local.py")


class Interrupt:
    # KeyboardInterrupt at the at-th bytecode the main thread runs in thread, queue, pool or
    # dispatcher code (0: never), as a signal handler raises it; counts those bytecodes

    def __init__(self, at):
        self.at, self.seen, self.where = at, 0, ""

    def __call__(self, frame, event, arg):
        if not any(part in frame.f_code.co_filename for part in WATCHED):
            return None
        frame.f_trace_opcodes, frame.f_trace_lines = True, False
        return self.opcode

    def opcode(self, frame, event, arg):
        if event == "opcode":
            self.seen += 1
            if self.seen == self.at:
                self.where = f"{{frame.f_code.co_name}}:{{frame.f_lineno}}"
                raise KeyboardInterrupt
        return self.opcode


settings = Settings(name="t", object_store="file://{data}",
                    state_store="sqlite:///{data}/state.db", dispatcher="inline://")


def trial(at):
    dispatcher = LocalDispatcher("local://?workers=1", settings)
    time.sleep(0.2)
    tracer = Interrupt(at)
    finished = queue.SimpleQueue()
    sys.settrace(tracer)
    try:  # what the runner does: submit, follow, wait, take the outcomes
        futures = []
        for i in range(4):
            future = dispatcher._submit(eval, f"t{{i}}", "__import__('time').sleep(0.02)")
            future.add_done_callback(finished.put)
            futures.append(future)
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=5, return_when=cf.FIRST_COMPLETED)
            for future in done:
                future.exception()
    except BaseException as exc:  # the interrupt, or what it became on its way up
        sys.settrace(None)
        while exc is not None and not isinstance(exc, KeyboardInterrupt):
            exc = exc.__context__  # (Condition.wait, interrupted between its release and
        if exc is None:            # its acquire, fails its release: RuntimeError)
            raise
    finally:
        sys.settrace(None)
    started = time.monotonic()
    closing = threading.Thread(target=dispatcher.close, daemon=True)
    closing.start()
    closing.join({bound})
    took = None if closing.is_alive() else time.monotonic() - started
    return tracer.seen, tracer.where, took


events, _, _ = trial(0)
points = sorted({{1 + events * i // {points} for i in range({points})}})
hung = []
for at in points:
    _, where, took = trial(at)
    if took is None:
        hung.append(f"{{at}} ({{where}})")
print(f"{{len(points)}} of {{events}} bytecodes; hung at {{len(hung)}}: {{hung}}", flush=True)
if hung:
    os._exit(1)  # (the hung pools would hold up the exit)
"""


def test_an_interrupt_at_any_bytecode_never_hangs_the_close(tmp_path: Path) -> None:
    """Ctrl-C at one bytecode after another (a sample of all) of what the main thread runs
    in thread, queue, pool and dispatcher code while it submits, follows and waits on tasks
    as the runner does: the dispatcher's close returns at every one, and the process
    exits. (Before the pool had a thread of its own, about one point in eight hung: inside
    ``wait`` and ``ProcessPoolExecutor.submit``.)"""
    data = tmp_path / "data"
    data.mkdir()
    script = SWEEP.format(data=data, bound=10, points=40)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail("the sweep did not end (an exit that hung?)")
    assert proc.returncode == 0 and "hung at 0:" in out, (out, err)


IDLE = """
import signal
import sys
import time

signal.signal(signal.SIGINT, signal.default_int_handler)  # (as at a terminal)
from canonflow.config import Settings
from canonflow.dispatch.local import LocalDispatcher

settings = Settings(name="t", object_store="file://{data}",
                    state_store="sqlite:///{data}/state.db", dispatcher="inline://")
dispatcher = LocalDispatcher("local://?workers=2", settings)
try:
    print("ready", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("interrupted", flush=True)
finally:
    dispatcher.close()
"""


def test_ctrl_c_with_idle_workers_prints_no_traceback(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the group: workers waiting for a task (planning,
    aggregation, transforms of other jobs) leave it to their parent, and print nothing."""
    data = tmp_path / "data"
    data.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", IDLE.format(data=data)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(2)  # the workers started and wait for tasks
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=BOUND)
    finally:
        if proc.poll() is None:
            _kill(proc)
    assert proc.returncode == 0 and out == "interrupted\n", (out, err)
    assert "Traceback" not in err, err


# a command that finished and printed its outcome, then takes a while to shut down (as a run
# does, joining its pool's helpers): the object goes when the interpreter clears __main__,
# after it put the default SIGINT handler back
EXITING = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)

class SlowExit:
    def __del__(self, write=os.write, sleep=time.sleep):
        write(1, b"exiting\\n")
        sleep(2)

keep = SlowExit()
sys.argv = ["canonflow", "--help"]
from canonflow.cli import main
main()
"""


def test_ctrl_c_while_a_finished_command_exits_keeps_its_exit_code() -> None:
    """Its outcome is printed: Ctrl-C has nothing left to interrupt, and must not turn exit
    0 into a death by SIGINT without a line (as a run that had just finished did)."""
    proc = subprocess.Popen([sys.executable, "-c", EXITING], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        lines = []
        while (line := proc.stdout.readline()) not in ("", "exiting\n"):
            lines.append(line)
        assert line == "exiting\n" and any("Usage" in x for x in lines), lines
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=BOUND)
    finally:
        if proc.poll() is None:
            _kill(proc)
    assert proc.returncode == 0, (proc.returncode, err)


# -- the whole run, interrupted at different moments ----------------------------------------

@pytest.fixture(scope="module")
def big_api() -> Iterator[DemoServer]:
    """The audit's set-up: 20,000 records per table, 50 a page, one page a chunk (1,200
    futures pending when the run is interrupted)."""
    with serve(DemoApi(20000)) as server:
        yield server


def _pipeline(folder: Path, base_url: str) -> Path:
    folder.mkdir()
    path = folder / "int.yaml"
    path.write_text(textwrap.dedent(f"""\
        object_store: file://./data
        state_store: sqlite:///./data/state.db
        dispatcher: local://?workers=2
        sources: [{{service: crm, base_url: '{base_url}/crm/v1',
                   tables: [contacts, companies, deals], page_size: 50,
                   pages_per_chunk: 1}}]
        tenants: [{{tenant_id: acme, credentials: {{crm: {{token: {tenant_token('acme')}}}}}}}]
        """))
    return path


# Ctrl-C as at a terminal, even when these tests run as a background job (which starts
# with SIGINT ignored, and its children with it)
CLI = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
       "from canonflow.cli import main; main()")


def _chunks_done(db: Path) -> int:
    if not db.exists():
        return 0
    with contextlib.suppress(sqlite3.Error), sqlite3.connect(db, timeout=1) as conn:
        return int(conn.execute("SELECT count(*) FROM chunk_results").fetchone()[0])
    return 0


def _interrupt(folder: Path, delay: float) -> tuple[float | None, str]:
    """Start `canonflow run` in a process group of its own, Ctrl-C the group ``delay``
    seconds after its first chunk finished: how long it took to exit (None: it did not
    within BOUND), and its stderr."""
    with (folder / "err.txt").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI, "run", "int.yaml"], cwd=folder,
            stdout=subprocess.DEVNULL, stderr=err, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while (not _chunks_done(folder / "data" / "state.db")
                   and time.monotonic() < deadline and proc.poll() is None):
                time.sleep(0.05)
            time.sleep(delay)
            assert proc.poll() is None, "the run ended before it was interrupted"
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the run and its workers
            sent = time.monotonic()
            try:
                proc.wait(BOUND)
                took: float | None = time.monotonic() - sent
            except subprocess.TimeoutExpired:
                took = None
        finally:
            if proc.poll() is None:
                _kill(proc)
    if took is not None:
        assert proc.returncode == 130, (proc.returncode, (folder / "err.txt").read_text())
    return took, (folder / "err.txt").read_text()


def test_ctrl_c_exits_130_in_bounded_time(tmp_path: Path, big_api: DemoServer) -> None:
    """Several runs, each interrupted at another moment of its busiest phase: every one
    exits 130 within BOUND seconds with the one line, and no traceback."""
    delays = [round(random.Random(i).uniform(0.0, 3.0), 2) for i in range(TRIALS)]
    outcomes: list[tuple[float, float | None]] = []
    for trial, delay in enumerate(delays):
        folder = tmp_path / f"trial{trial}"
        pipeline = _pipeline(folder, big_api.base_url)
        took, err = _interrupt(pipeline.parent, delay)
        outcomes.append((delay, took))
        if took is None:
            continue
        lines = [line for line in err.splitlines() if line.startswith("interrupted")]
        assert len(lines) == 1, err
        assert "unfinished job(s) acme=job-" in lines[0] and "can be resumed" in lines[0]
        assert "Traceback" not in err, err
    hung = [delay for delay, took in outcomes if took is None]
    assert not hung, (f"{len(hung)} of {TRIALS} interrupted runs did not exit within "
                      f"{BOUND:.0f} s (interrupted {hung} s after their first chunk); "
                      f"all: {outcomes}")

"""Heartbeats keep leases fresh on one shared thread per process: each beats at its own
interval, a stopped one never beats again (one in flight is waited for), a beat that
returns False sets ``lost`` and stops, one that raises is tried again."""

from __future__ import annotations

import os
import threading
import time

import pytest

from canonflow import lease
from canonflow.lease import Heartbeat


def test_each_heartbeat_beats_at_its_interval_and_not_after_stop() -> None:
    fast: list[float] = []
    slow: list[float] = []
    with Heartbeat(0.02, lambda: fast.append(time.monotonic()), "fast"), \
            Heartbeat(0.1, lambda: slow.append(time.monotonic()), "slow"):
        time.sleep(0.35)
    stopped_with = (len(fast), len(slow))
    time.sleep(0.15)
    assert (len(fast), len(slow)) == stopped_with  # nothing after stop
    assert 8 <= len(fast) <= 18, fast
    assert 2 <= len(slow) <= 4, slow


def test_every_heartbeat_of_a_process_shares_one_thread() -> None:
    threads: set[int] = set()
    beats = [Heartbeat(0.01, lambda: threads.add(threading.get_ident()), f"h{i}")
             for i in range(20)]
    before = threading.active_count()
    for beat in beats:
        beat.__enter__()
    during = threading.active_count()
    time.sleep(0.1)
    for beat in beats:
        beat.stop()
    assert len(threads) == 1
    assert threading.get_ident() not in threads
    assert during - before <= 1  # at most the shared thread, started once


def test_stop_waits_for_a_beat_in_flight() -> None:
    entered, release = threading.Event(), threading.Event()
    finished: list[float] = []

    def beat() -> bool:
        entered.set()
        release.wait(2)
        finished.append(time.monotonic())
        return True

    heartbeat = Heartbeat(0.01, beat, "slow-beat")
    heartbeat.__enter__()
    assert entered.wait(2)
    threading.Timer(0.2, release.set).start()
    started = time.monotonic()
    heartbeat.stop()
    assert len(finished) == 1  # the beat in flight ended before stop returned
    assert time.monotonic() - started >= 0.15  # it waited for the beat to end


def test_a_lost_lease_sets_lost_and_stops_beating() -> None:
    calls: list[int] = []

    def beat() -> bool:
        calls.append(1)
        return False

    with Heartbeat(0.01, beat, "taken-over") as heartbeat:
        assert heartbeat.lost.wait(2)
        time.sleep(0.1)
    assert len(calls) == 1


def test_a_failing_beat_is_tried_again_and_others_go_on() -> None:
    attempts: list[int] = []
    other: list[int] = []

    def flaky() -> bool:
        attempts.append(1)
        raise ConnectionError("store away")

    with Heartbeat(0.02, flaky, "flaky") as failing, \
            Heartbeat(0.02, lambda: other.append(1), "steady"):
        time.sleep(0.2)
    assert len(attempts) >= 3
    assert len(other) >= 3
    assert not failing.lost.is_set()


def test_a_forked_child_beats_on_a_thread_of_its_own() -> None:
    with Heartbeat(0.01, lambda: None, "parent"):
        time.sleep(0.05)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the parent's thread is not here
            try:
                seen: list[int] = []
                with Heartbeat(0.01, lambda: seen.append(1), "child"):
                    time.sleep(0.1)
                os.write(write, str(len(seen)).encode())
            finally:
                os._exit(0)
        os.close(write)
        beats = int(os.read(read, 16) or b"0")
        os.waitpid(pid, 0)
        os.close(read)
    assert beats >= 3
    assert lease._shared  # the parent's scheduler is still its own


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_beat_that_raises_past_exception_ends_only_its_own_heartbeat() -> None:
    class Fatal(BaseException):
        pass

    def fatal() -> bool:
        raise Fatal

    others: list[int] = []
    steady = Heartbeat(0.02, lambda: others.append(1), "steady")
    with steady, Heartbeat(0.01, fatal, "fatal"):
        time.sleep(0.2)
        seen = len(others)
        time.sleep(0.1)
        assert len(others) > seen  # still beating after the other's beat raised
        leaving = time.monotonic()
    assert time.monotonic() - leaving < 1  # stop waits for no beat of a thread that died

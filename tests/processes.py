"""Run one function in several spawned processes that start their work at the same instant."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any


def run_together(target: Callable[..., None], arg_sets: Sequence[tuple[Any, ...]],
                 timeout: float = 120) -> None:
    """One process per argument tuple, each called as ``target(*args, barrier)`` with a
    barrier shared by all of them; every process must exit cleanly."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(arg_sets))
    procs = [ctx.Process(target=target, args=(*args, barrier)) for args in arg_sets]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"

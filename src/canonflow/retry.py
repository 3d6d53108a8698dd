"""Retry policies, one per kind of failure, on tenacity; every retry is logged.

=============  ==========================================  =========================
kind           retried on                                  policy
=============  ==========================================  =========================
``http``       429, 408, 5xx, timeouts, dropped connections  spec's max_retries,
                                                              honours ``Retry-After``
``state``      a busy or unreachable state store; on         8 attempts, 20 ms .. 1 s
               DynamoDB: throttling, transaction conflicts,
               5xx, timeouts, dropped connections
``commit``     a concurrent Delta commit won               12 attempts, 50 ms .. 2 s
``lock``       a table lease another writer holds          until ``wait`` elapses
``chunk``      a chunk whose error is retryable            3 attempts, 0.5 s .. 8 s
=============  ==========================================  =========================

A policy raises the last error itself when it gives up (``reraise``): callers convert it
to the typed error of their edge, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from canonflow import log as logs
from canonflow.redact import redact
from canonflow.telemetry import metrics

log = logging.getLogger("canonflow.retry")


def _describe(state: RetryCallState) -> str:
    outcome = state.outcome
    if outcome is None:
        return ""
    exc = outcome.exception()
    if exc is None:
        return f"result {outcome.result()!r}"
    return redact(f"{type(exc).__name__}: {exc}")


def _log_retry(kind: str, context: dict[str, Any] | None,
               level: int = logging.WARNING) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        wait = state.next_action.sleep if state.next_action else 0.0
        metrics.retried(kind, (context or {}).get("service") or logs.bound().get("service"))
        log.log(level, "retrying", extra={
            **(context or {}), "retry_kind": kind, "attempt": state.attempt_number,
            "wait_seconds": round(wait, 3), "error": _describe(state)})
    return before_sleep


def _give_up_quietly(state: RetryCallState) -> Any:
    """When retrying on a result (not an exception) ends: return the last result."""
    return state.outcome.result() if state.outcome else None


class wait_retry_after(wait_base):
    """The server's ``Retry-After`` when the error carries one, else the fallback."""

    def __init__(self, fallback: wait_base, cap: float = 60.0) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        after = getattr(exc, "retry_after", None)
        if isinstance(after, int | float) and after >= 0:
            return float(min(after, self.cap))
        return float(min(self.fallback(retry_state), self.cap))


def _backoff(initial: float, cap: float, jitter: float) -> wait_base:
    """Exponential from ``initial`` up to ``cap``, plus up to ``jitter`` at random."""
    return wait_exponential(multiplier=initial, max=cap) + wait_random(0, jitter)


def _is(types: tuple[type[BaseException], ...]) -> Callable[[BaseException], bool]:
    return lambda exc: isinstance(exc, types)


def http(retry_on: tuple[type[BaseException], ...], max_retries: int, backoff_base: float,
         context: dict[str, Any] | None = None) -> Retrying:
    """HTTP calls to a source API: ``max_retries`` retries after the first try."""
    return Retrying(
        retry=retry_if_exception(_is(retry_on)), stop=stop_after_attempt(max_retries + 1),
        wait=wait_retry_after(_backoff(backoff_base, 30.0, backoff_base)),
        before_sleep=_log_retry("http", context), reraise=True)


def state(retry_on: tuple[type[BaseException], ...], attempts: int = 8) -> Retrying:
    """One atomic state-store step whose database was busy or briefly unreachable."""
    return Retrying(
        retry=retry_if_exception(_is(retry_on)), stop=stop_after_attempt(attempts),
        wait=_backoff(0.02, 1.0, 0.02),
        before_sleep=_log_retry("state", None), reraise=True)


def state_if(retry_on: Callable[[BaseException], bool], attempts: int = 8) -> Retrying:
    """The ``state`` policy for errors told apart by more than their type (a DynamoDB
    error code, a cancelled transaction's reasons)."""
    return Retrying(
        retry=retry_if_exception(retry_on), stop=stop_after_attempt(attempts),
        wait=_backoff(0.02, 1.0, 0.02),
        before_sleep=_log_retry("state", None), reraise=True)


def commit(retry_on: Callable[[BaseException], bool], attempts: int = 12,
           context: dict[str, Any] | None = None) -> Retrying:
    """A Delta commit that lost to a concurrent writer (optimistic concurrency)."""
    return Retrying(
        retry=retry_if_exception(retry_on), stop=stop_after_attempt(attempts),
        wait=_backoff(0.05, 2.0, 0.05),
        before_sleep=_log_retry("commit", context), reraise=True)


def lock(wait: float, context: dict[str, Any] | None = None) -> Retrying:
    """Wait for a lease: the step returns False while another holder has it; after
    ``wait`` seconds the last False is returned."""
    return Retrying(
        retry=retry_if_result(lambda acquired: not acquired), stop=stop_after_delay(wait),
        wait=wait_exponential(multiplier=0.01, max=0.5),
        before_sleep=_log_retry("lock", context, logging.DEBUG),
        retry_error_callback=_give_up_quietly)


def chunk(attempts: int, context: dict[str, Any] | None = None,
          initial: float = 0.5) -> Retrying:
    """A whole chunk whose result says its error is retryable; the step returns the result
    and the last one is kept when attempts run out."""
    def failed_retryable(result: Any) -> bool:
        error = getattr(result, "error", None)
        return bool(error is not None and error.retryable)

    return Retrying(
        retry=retry_if_result(failed_retryable), stop=stop_after_attempt(attempts),
        wait=_backoff(initial, 8.0, initial),
        before_sleep=_log_retry("chunk", context), retry_error_callback=_give_up_quietly)

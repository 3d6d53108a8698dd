"""The error tree. Whether an error is worth retrying is a property of its type.

    CanonflowError
    ├── TerminalError            retrying the same input gives the same failure
    │   ├── ConfigError          bad pipeline file, URL, spec or mapping
    │   ├── InvalidIdentifier    a tenant/service/table/job/chunk id that is unsafe
    │   ├── RequestRejected      a transform request that breaks tenant isolation
    │   ├── MalformedPage        an API page that is not the JSON the spec expects
    │   └── HttpTerminal         4xx other than 408/429
    └── RetryableError           the same call may succeed later
        ├── HttpRetryable        429, 5xx, timeouts, connection errors
        ├── StoreUnavailable     object or state store not reachable right now
        └── CommitConflict       a concurrent writer won a table commit

Adapters convert library exceptions into these at their edge (``raise ... from exc``), so the
CLI can print one line and the dispatchers can decide whether to retry.

Every message is redacted (:func:`canonflow.redact.redact`) when the error is created and
again when it is shown, so no secret reaches a chunk result, a report, a log or the CLI.
"""

from __future__ import annotations

from typing import Any

from canonflow.redact import redact


class CanonflowError(Exception):
    """Base of every error canonflow raises on purpose."""

    retryable: bool = False

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))

    def __str__(self) -> str:
        # again: a secret registered after the error was created is masked too
        return redact(super().__str__())

    def to_payload(self) -> dict[str, Any]:
        """The ``error`` field of a chunk result."""
        return {"type": type(self).__name__, "message": str(self), "retryable": self.retryable}


class TerminalError(CanonflowError):
    retryable = False


class RetryableError(CanonflowError):
    retryable = True


class ConfigError(TerminalError):
    pass


class InvalidIdentifier(TerminalError):
    pass


class RequestRejected(TerminalError):
    pass


class MalformedPage(TerminalError):
    pass


class HttpTerminal(TerminalError):
    pass


class HttpRetryable(RetryableError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailable(RetryableError):
    pass


class CommitConflict(RetryableError):
    pass


class UnknownJob(TerminalError):
    pass


class InvalidCompletion(TerminalError):
    """A chunk result for a chunk that is not part of its job (or of another table)."""


class ActiveJobExists(TerminalError):
    """The (pipeline, tenant) already has an unfinished job; ``job_id`` names it."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class RunnerLeaseLost(RetryableError):
    """A run stalled past its lease; another run may have adopted its jobs."""


class RunTimeout(RetryableError):
    """``canonflow run`` waited longer than its limit; the jobs go on without it."""


def error_payload(exc: BaseException) -> dict[str, Any]:
    """Describe any exception as a chunk-result error; unknown ones count as retryable."""
    if isinstance(exc, CanonflowError):
        return exc.to_payload()
    return {"type": type(exc).__name__, "message": redact(str(exc) or repr(exc)),
            "retryable": True}

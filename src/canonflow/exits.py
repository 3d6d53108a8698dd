"""What a failure means to the person at the command line: one line and an exit code.

Exit codes: 2 when retrying the same command will not help (fix the input first), 3 when it
may (a store or an API that is not reachable right now), 130 interrupted, 1 for an error
canonflow did not expect. The line never carries a traceback or a secret.
"""

from __future__ import annotations

import errno
from typing import Any

from pydantic import ValidationError

from canonflow.errors import CanonflowError
from canonflow.redact import redact

TERMINAL = 2
RETRYABLE = 3
UNEXPECTED = 1
INTERRUPTED = 130

# what an OS error is worth retrying: the resource may come back
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNREFUSED,
                     errno.ECONNRESET, errno.ENOSPC, errno.EHOSTUNREACH, errno.ENETUNREACH}

# a validated model's field -> the command-line option that sets it
OPTION_FOR_FIELD = {"tenant_id": "--tenant", "service_name": "--service",
                    "table_name": "--table", "source_files": "--source-file"}


def _help(command: str) -> str:
    return f"see `{command} --help`"


def _validation(exc: ValidationError, command: str) -> str:
    """The first problem of a model built from command-line values, named by its option."""
    first = exc.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    option = OPTION_FOR_FIELD.get(field, "--" + field.replace("_", "-")) if field else ""
    where = f"{option}: " if option else ""
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}{message}{more}; {_help(command)}"


def _is_click_error(exc: BaseException) -> bool:
    """A click (or typer's own copy of click) usage error: it knows its message and code."""
    return hasattr(exc, "format_message") and hasattr(exc, "exit_code")


def describe(exc: BaseException, command: str = "canonflow") -> tuple[str, int]:
    """The line to print (without the ``error:`` prefix) and the exit code for ``exc``
    raised by ``command`` (e.g. ``canonflow transform``, named in the hint to its help)."""
    if isinstance(exc, CanonflowError):
        return str(exc), RETRYABLE if exc.retryable else TERMINAL
    if _is_click_error(exc):  # a bad option or argument, an unknown command
        context: Any = getattr(exc, "ctx", None)
        path = context.command_path if context is not None else command
        message = exc.format_message().rstrip(".")  # type: ignore[attr-defined]
        return f"{message}; {_help(path)}", TERMINAL
    if isinstance(exc, ValidationError):
        return _validation(exc, command), TERMINAL
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        code = RETRYABLE if exc.errno in _TRANSIENT_ERRNOS else TERMINAL
        return f"cannot use{where}: {exc.strerror}", code
    return f"{type(exc).__name__}: {exc}", UNEXPECTED


def one_line(text: str) -> str:
    """``text`` redacted, on one line."""
    return " ".join(redact(text).split())

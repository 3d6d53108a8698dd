"""URL schemes of the three ports (object store, state store, dispatcher): one registry.

Each port maps a URL scheme to the factory that opens it (``"module:factory"``, imported
only when used, so a backend's library loads only when its URL is) and to the extra that
installs that library. Every port reports an unknown scheme and a missing extra the same
way, as one :class:`~canonflow.errors.ConfigError` line.

A scheme with a driver part (``sqlite+pysqlite://``) falls back to its base (``sqlite``)
when the full scheme is not registered; dispatchers register full ones (``celery+redis``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from canonflow.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Backend:
    """Where a scheme's factory lives and which extra provides its library (None: core)."""

    target: str  # "package.module:factory"
    extra: str | None = None


@dataclass(frozen=True)
class Port:
    """The schemes one port accepts."""

    name: str  # "object store", "state store", "dispatcher"
    backends: dict[str, Backend]

    def scheme(self, url: str) -> str:
        """The registered scheme of ``url``; ConfigError naming the known ones if none."""
        scheme = url.split("://", 1)[0] if "://" in url else ""
        for candidate in (scheme, scheme.split("+", 1)[0]):
            if candidate and candidate in self.backends:
                return candidate
        known = ", ".join(f"{s}://" for s in sorted(self.backends))
        raise ConfigError(f"unsupported {self.name} URL {url!r}: use one of {known}")

    def factory(self, url: str) -> Callable[..., Any]:
        """Import the factory for ``url``; a missing library names the extra to install."""
        scheme = self.scheme(url)
        backend = self.backends[scheme]
        module_name, attr = backend.target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # only a missing third-party library is the user's to install; a missing module
            # of canonflow itself is a packaging bug and stays loud
            if exc.name is None or exc.name.split(".")[0] == "canonflow":
                raise
            extra = f"pip install 'canonflow[{backend.extra}]'" if backend.extra else (
                "reinstall canonflow")
            raise ConfigError(f"{self.name} {scheme}:// needs {exc.name!r}: {extra}") from None
        factory: Callable[..., Any] = getattr(module, attr)
        return factory

    def open(self, url: str, *args: Any) -> Any:
        return self.factory(url)(url, *args)


OBJECT_STORES = Port("object store", {
    "file": Backend("canonflow.stores.obstore_backend:open_obstore"),
    "memory": Backend("canonflow.stores.obstore_backend:open_obstore"),
    "s3": Backend("canonflow.stores.obstore_backend:open_obstore"),
})

STATE_STORES = Port("state store", {
    "sqlite": Backend("canonflow.stores.sqlite:open_sqlite"),
    "postgresql": Backend("canonflow.stores.postgres:open_postgres", "postgres"),
    "postgres": Backend("canonflow.stores.postgres:open_postgres", "postgres"),
    "dynamodb": Backend("canonflow.stores.dynamodb:open_dynamodb", "aws"),
})

DISPATCHERS = Port("dispatcher", {
    "inline": Backend("canonflow.dispatch.inline:InlineDispatcher"),
    "local": Backend("canonflow.dispatch.local:LocalDispatcher"),
    "celery+redis": Backend("canonflow.dispatch.celery:CeleryDispatcher", "celery"),
    "celery+rediss": Backend("canonflow.dispatch.celery:CeleryDispatcher", "celery"),
    "celery+amqp": Backend("canonflow.dispatch.celery:CeleryDispatcher", "celery"),
    "sqs": Backend("canonflow.aws.dispatch:SqsDispatcher", "aws"),
    "lambda": Backend("canonflow.aws.dispatch:LambdaDispatcher", "aws"),
})

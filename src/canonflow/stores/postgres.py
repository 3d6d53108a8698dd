"""PostgreSQL state store (SQLAlchemy Core + psycopg 3): the same schema and atomic steps as
SQLite, row locks instead of a database lock, ``FOR UPDATE SKIP LOCKED`` for the outbox relay
so several relays never send the same row at once, and a pooled engine per process."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from canonflow.errors import ConfigError
from canonflow.stores.sql import SqlStateStore

_SCHEMA_LOCK = 0x63616E6F  # advisory lock key: schema creation from many processes at once


class PostgresStateStore(SqlStateStore):
    def _lock_rows(self, select: sa.Select[Any]) -> sa.Select[Any]:
        return select.with_for_update(skip_locked=True)

    def _create_schema(self, conn: Connection) -> None:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        super()._create_schema(conn)


def open_postgres(url: str) -> PostgresStateStore:
    try:
        sa_url = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"invalid state store URL: {exc}") from None
    if sa_url.drivername in ("postgresql", "postgres"):
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    if sa_url.drivername != "postgresql+psycopg":
        raise ConfigError(f"unsupported PostgreSQL driver {sa_url.drivername!r}: use postgresql://")
    engine = sa.create_engine(sa_url, pool_size=4, max_overflow=4, pool_pre_ping=True)
    return PostgresStateStore(url, engine, pg_insert)

"""SQLite state store: WAL, and ``BEGIN IMMEDIATE`` so concurrent writers queue on the write
lock up front instead of failing with "database is locked" halfway through a step; steps that
only read begin a deferred transaction (a WAL snapshot) and wait for no writer."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from canonflow.errors import ConfigError
from canonflow.stores.sql import READ_ONLY, SqlStateStore


def open_sqlite(url: str) -> SqlStateStore:
    try:
        sa_url = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"invalid state store URL {url!r}") from exc
    if sa_url.drivername not in ("sqlite", "sqlite+pysqlite"):
        raise ConfigError(f"invalid SQLite URL {url!r}")
    database = sa_url.database or ""
    if database and database != ":memory:":
        folder = Path(database).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the state store's folder {folder}: "
                              f"{exc.strerror}; choose a writable --data-dir or state_store "
                              "path") from None
        _check_writable(Path(database).expanduser())
    engine = sa.create_engine(
        sa_url, connect_args={"timeout": 30, "isolation_level": None}
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # a step that only reads takes no write lock: it reads the last committed snapshot
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return SqlStateStore(url, engine, sqlite_insert)


def _check_writable(path: Path) -> None:
    """Open the database file and take its write lock once, now: a path that cannot hold a
    database (a folder, a read-only file or folder) is a setting to change, said in one
    line, not a busy database retried for a minute."""
    try:
        probe = sqlite3.connect(path, timeout=1.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise _unwritable(path, exc) from None
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return  # another process writes: it is usable
        raise _unwritable(path, exc) from None
    except sqlite3.Error as exc:
        raise _unwritable(path, exc) from None
    finally:
        probe.close()


def _unwritable(path: Path, exc: sqlite3.Error) -> ConfigError:
    return ConfigError(f"cannot use {path} as the SQLite state store: {exc}; choose a "
                       "writable --data-dir or state_store path")

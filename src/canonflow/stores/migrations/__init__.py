"""State-store schema migrations (Alembic), run by ``canonflow db upgrade`` and on first use.

Each release's schema is a revision in ``versions/``: ``0001`` is the schema of release
0.1.0, and every later change is a new revision that upgrades a store in place, its jobs,
outbox, ledger and cursors intact. A store created before migrations existed (tables, no
``alembic_version``) is brought to ``0001`` (missing tables and columns added), stamped, then
upgraded. To add a change: a new file in ``versions/`` (``down_revision`` the previous head),
:data:`HEAD` set to it, and the table definitions in ``canonflow.stores.sql`` updated to
match (``tests/integration/test_state_migrations.py`` compares them with the migrated database).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from alembic.config import Config

HEAD = "0003"
BASELINE = "0001"


def _config(conn: Connection) -> Config:
    from alembic.config import Config  # imported when a store needs upgrading, not per start

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.attributes["connection"] = conn
    return cfg


def current(conn: Connection) -> str | None:
    """The store's revision; None for a store without migrations (empty or older)."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(conn: Connection, target: str = "head") -> None:
    """Bring the schema to ``target`` in the caller's transaction (cheap when current)."""
    revision = current(conn)
    if target == "head" and revision == HEAD:
        return
    from alembic import command

    cfg = _config(conn)
    if revision is None and sa.inspect(conn).has_table("jobs"):
        from canonflow.stores.migrations.versions import r0001_release_0_1_0 as baseline

        baseline.adopt(conn)  # a store from before migrations: make it 0001, then go on
        command.stamp(cfg, BASELINE)
    command.upgrade(cfg, target)

"""The state schema of release 0.1.0 (the baseline every later revision upgrades).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.engine import Connection

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def schema() -> sa.MetaData:
    """Frozen: the tables exactly as release 0.1.0 created them."""
    m = sa.MetaData()
    sa.Table(
        "jobs", m,
        sa.Column("job_id", sa.String(128), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("trigger_mode", sa.String(20), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("outcome", sa.String(24)),
        sa.Column("total_chunks", sa.Integer, nullable=False),
        sa.Column("completed_chunks", sa.Integer, nullable=False),
        sa.Column("failed_chunks", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("report", sa.Text),
        sa.Column("runner", sa.String(200)),
    )
    sa.Table(
        "chunks", m,
        sa.Column("job_id", sa.String(128), primary_key=True),
        sa.Column("chunk_id", sa.String(128), primary_key=True),
        sa.Column("spec", sa.Text, nullable=False),
    )
    sa.Table(
        "chunk_results", m,
        sa.Column("job_id", sa.String(128), primary_key=True),
        sa.Column("chunk_id", sa.String(128), primary_key=True),
        sa.Column("completed", sa.Boolean, nullable=False),
        sa.Column("result", sa.Text, nullable=False),
        sa.Column("recorded_at", sa.Float, nullable=False),
    )
    sa.Table(
        "outbox", m,
        sa.Column("request_id", sa.String(400), primary_key=True),
        sa.Column("job_id", sa.String(128), index=True),
        sa.Column("trigger", sa.String(20), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("holder", sa.String(200)),
    )
    sa.Table(
        "ledger", m,
        sa.Column("tenant_id", sa.String(128), primary_key=True),
        sa.Column("service_name", sa.String(128), primary_key=True),
        sa.Column("table_name", sa.String(128), primary_key=True),
        sa.Column("file_key", sa.String(1024), primary_key=True),
        sa.Column("request_id", sa.String(400), nullable=False),
        sa.Column("processed_at", sa.Float, nullable=False),
    )
    sa.Table(
        "sync_cursors", m,
        sa.Column("tenant_id", sa.String(128), primary_key=True),
        sa.Column("service_name", sa.String(128), primary_key=True),
        sa.Column("table_name", sa.String(128), primary_key=True),
        sa.Column("value", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(128)),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    sa.Table(
        "checkpoints", m,
        sa.Column("job_id", sa.String(128), primary_key=True),
        sa.Column("chunk_id", sa.String(128), primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    sa.Table(
        "locks", m,
        sa.Column("name", sa.String(400), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    sa.Table(
        "active_jobs", m,
        sa.Column("pipeline", sa.String(200), primary_key=True),
        sa.Column("tenant_id", sa.String(128), primary_key=True),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    sa.Table(
        "job_events", m,
        sa.Column("event_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(128), nullable=False, index=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("chunk_id", sa.String(128)),
        sa.Column("detail", sa.Text, nullable=False),
    )
    return m


def adopt(conn: Connection) -> None:
    """A store made before migrations (any 0.1 pre-release): add the tables and the
    (nullable) columns it lacks, so that it is 0001."""
    baseline = schema()
    baseline.create_all(conn)
    inspector = sa.inspect(conn)
    for table in baseline.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(sa.text(
                    f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'))


def upgrade() -> None:
    schema().create_all(op.get_bind())


def downgrade() -> None:
    schema().drop_all(op.get_bind())

"""The outbox names each request's source table (``service:table``): a transform worker
finds the pending requests of the table it is transforming and commits them together
(group commit), with an index on (target, status) so that look-up reads only those rows.
Rows written before have no target and are never grouped; they run one by one as before.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("target", sa.String(300)))
    op.create_index("ix_outbox_target_status", "outbox", ["target", "status"])


def downgrade() -> None:
    op.drop_index("ix_outbox_target_status", table_name="outbox")
    op.drop_column("outbox", "target")

"""The reputation guard: each message log row knows its lane; sends indexed by time.

messages.lane (the lane the ingress chose; "" on rows from before) and an index on
(sent_at, lane, status), so the guard counts a window's sends per lane and outcome
from the index alone, never by reading the table. The guard's lasting pauses and resume
epochs live in relay_state (keys "pause/<lane>", "resume/<lane>", "*" for the account);
the old "resumed_at" key is dropped (it meant "forget feedback before").

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("lane", sa.String(32), nullable=False, server_default=""))
    op.create_index("ix_messages_sent_lane_status", "messages", ["sent_at", "lane", "status"])
    op.execute("DELETE FROM relay_state WHERE key = 'resumed_at'")


def downgrade() -> None:
    op.drop_index("ix_messages_sent_lane_status", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("lane")

"""Suppression list, message log, feedback events, bounce counts, relay state.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("address", sa.String(320), primary_key=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("source", sa.String(32), nullable=False, server_default=""),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("queue_id", sa.String(64), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("message_id_header", sa.String(998), nullable=False, server_default=""),
        sa.Column("ses_message_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("sent_at", sa.Float, nullable=True),
        sa.UniqueConstraint("queue_id", "recipient", name="uq_messages_queue_recipient"),
    )
    op.create_index("ix_messages_recipient", "messages", ["recipient"])
    op.create_index("ix_messages_ses_message_id", "messages", ["ses_message_id"])
    op.create_index("ix_messages_updated_at", "messages", ["updated_at"])
    op.create_table(
        "feedback_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_key", sa.String(64), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("ses_message_id", sa.String(128), nullable=False, server_default=""),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
        sa.Column("occurred_at", sa.Float, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.UniqueConstraint("event_key", "recipient", name="uq_feedback_key_recipient"),
    )
    op.create_index("ix_feedback_recipient", "feedback_events", ["recipient"])
    op.create_index("ix_feedback_received_at", "feedback_events", ["received_at"])
    op.create_table(
        "bounce_counts",
        sa.Column("address", sa.String(320), primary_key=True),
        sa.Column("count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "relay_state",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False, server_default=""),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("relay_state", "bounce_counts", "feedback_events", "messages", "suppressions"):
        op.drop_table(table)

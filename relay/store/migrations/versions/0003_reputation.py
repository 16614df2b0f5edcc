"""The reputation guard: each message log row knows its lane; sends indexed by time.

messages.lane (the lane the ingress chose; "" on rows from before) and an index on
(sent_at, lane, status), so the guard counts a window's sends per lane and outcome
from the index alone, never by reading the table. feedback_events.ses_message_id is
indexed (the message log's timeline looks a message's events up by it). Rows written
before kept every bounce as "bounced": a transient or undetermined one becomes
"soft-bounced" and one SES answered from the account's suppression list
"ses-suppressed" (relay.store.transitions), as they are written now. The guard's
lasting pauses and resume epochs live in relay_state (keys "pause/<lane>",
"resume/<lane>", "*" for the account): the old "resumed_at" key (the operator's last
`relay resume`) becomes the account's "resume/*", so a past resume still holds.

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

#: the bounce types SES reports that are not permanent (relay.feedback.parse.bounce_kind)
_SOFT = ("Transient/", "Undetermined/")
#: the bounce subtype of an address on the account's suppression list
_ON_ACCOUNT_LIST = "OnAccountSuppressionList"
_OLD_RESUME, _ACCOUNT_RESUME = "resumed_at", "resume/*"


def _status(last_error: str) -> str:
    """The status a "bounced" row from before gets now (its last_error is the bounce's
    detail: "bounceType/bounceSubType status diagnostic")."""
    if last_error.startswith(_SOFT):
        return "soft-bounced"
    if _ON_ACCOUNT_LIST in last_error.split(" ", 1)[0]:
        return "ses-suppressed"
    return "bounced"


def _restatus(conn: sa.Connection) -> None:
    rows = conn.execute(sa.text(
        "SELECT id, last_error FROM messages WHERE status = 'bounced'")).all()
    moved: dict[str, list[int]] = {}
    for row_id, last_error in rows:
        status = _status(last_error or "")
        if status != "bounced":
            moved.setdefault(status, []).append(row_id)
    update = sa.text("UPDATE messages SET status = :status WHERE id IN :ids").bindparams(
        sa.bindparam("ids", expanding=True))
    for status, ids in moved.items():
        for i in range(0, len(ids), 500):
            conn.execute(update, {"status": status, "ids": ids[i:i + 500]})


def _move_state(conn: sa.Connection, old: str, new: str) -> None:
    """relay_state's `old` key becomes `new` (unless `new` is set); `old` is removed."""
    row = conn.execute(sa.text("SELECT value, updated_at FROM relay_state WHERE key = :k"),
                       {"k": old}).first()
    if row is not None and row.value:
        try:
            float(row.value)
        except ValueError:
            row = None
    taken = conn.execute(sa.text("SELECT 1 FROM relay_state WHERE key = :k"),
                         {"k": new}).first()
    if row is not None and row.value and taken is None:
        conn.execute(sa.text("INSERT INTO relay_state (key, value, updated_at) "
                             "VALUES (:k, :v, :at)"),
                     {"k": new, "v": row.value, "at": row.updated_at})
    conn.execute(sa.text("DELETE FROM relay_state WHERE key = :k"), {"k": old})


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("lane", sa.String(32), nullable=False, server_default=""))
    op.create_index("ix_messages_sent_lane_status", "messages", ["sent_at", "lane", "status"])
    op.create_index("ix_feedback_ses_message_id", "feedback_events", ["ses_message_id"])
    conn = op.get_bind()
    _restatus(conn)
    _move_state(conn, _OLD_RESUME, _ACCOUNT_RESUME)


def downgrade() -> None:
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE messages SET status = 'bounced' "
                         "WHERE status IN ('soft-bounced', 'ses-suppressed')"))
    _move_state(conn, _ACCOUNT_RESUME, _OLD_RESUME)
    op.drop_index("ix_feedback_ses_message_id", table_name="feedback_events")
    op.drop_index("ix_messages_sent_lane_status", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("lane")

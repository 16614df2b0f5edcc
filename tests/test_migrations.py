"""Migration 0003 on a database written by the 0002 schema: the bounces it kept as
"bounced" get the statuses the relay writes now, the operator's last resume becomes the
guard's account-wide resume epoch, and feedback_events is indexed by SES message id."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.ext.asyncio import create_async_engine

from relay.feedback.guard import read_states
from relay.store.db import MIGRATIONS, Database, database_url
from tests.conftest import database_for

#: (last_error, status 0002 wrote, status after 0003)
ROWS = [
    ("Permanent/General 5.1.1 smtp; 550 5.1.1 user unknown", "bounced", "bounced"),
    ("Transient/MailboxFull 4.2.2 smtp; 452 mailbox full", "bounced", "soft-bounced"),
    ("Undetermined/Undetermined 5.0.0", "bounced", "soft-bounced"),
    ("Permanent/OnAccountSuppressionList 5.1.1 Amazon SES did not send", "bounced",
     "ses-suppressed"),
    # the word in the diagnostic, not the subtype: a permanent bounce still
    ("Permanent/General 5.1.1 smtp; 550 OnAccountSuppressionList", "bounced", "bounced"),
    ("Transient/General 4.4.7 expired", "delivered", "delivered"),
    ("", "sent", "sent"),
]


async def migrate(url: str, revision: str, *, down: bool = False) -> None:
    engine = create_async_engine(url)

    def run(conn: sa.Connection) -> None:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()


async def execute(url: str, sql: str, rows: list[dict[str, object]] | None = None) -> list:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(sa.text(sql), rows or {})
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()


async def at_0002(tmp_path: Path, resumed_at: str) -> str:
    url = database_url(database_for(tmp_path), tmp_path)
    await migrate(url, "0002")
    await execute(url, "INSERT INTO messages (queue_id, recipient, status, last_error, "
                  "created_at, updated_at) VALUES (:q, :r, :s, :e, 0, 0)",
                  [{"q": f"q{i}", "r": f"r{i}@example.net", "s": old, "e": error}
                   for i, (error, old, _) in enumerate(ROWS)])
    await execute(url, "INSERT INTO relay_state (key, value, updated_at) VALUES "
                  "('resumed_at', :v, 5)", [{"v": resumed_at}])
    return url


async def statuses(url: str) -> list[str]:
    return [r[0] for r in await execute(url, "SELECT status FROM messages ORDER BY id")]


async def test_0003_restates_old_bounces_and_keeps_the_last_resume(tmp_path):
    url = await at_0002(tmp_path, "1796150000.25")
    db = await Database.open(database_for(tmp_path), tmp_path)  # migrates to head
    try:
        assert await read_states(db) == {"resume/*": "1796150000.25"}
        async with db.engine.connect() as conn:
            indexes = await conn.run_sync(
                lambda c: {i["name"] for i in sa.inspect(c).get_indexes("feedback_events")})
    finally:
        await db.close()
    assert await statuses(url) == [new for _, _, new in ROWS]
    assert "ix_feedback_ses_message_id" in indexes
    assert await execute(url, "SELECT key FROM relay_state WHERE key = 'resumed_at'") == []
    # and back: 0002's code knows one status for every bounce, and its own resume key
    await migrate(url, "0002", down=True)
    assert await statuses(url) == [old for _, old, _ in ROWS]
    assert await execute(url, "SELECT key, value FROM relay_state") == [
        ("resumed_at", "1796150000.25")]


async def test_0003_drops_a_resumed_at_that_is_not_a_time(tmp_path):
    url = await at_0002(tmp_path, "")
    await migrate(url, "head")
    assert await execute(url, "SELECT key FROM relay_state") == []

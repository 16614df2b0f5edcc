"""The database: SQLAlchemy 2 models, the async engine and start-up migrations.

Each table has one writer: suppressions and bounce_counts (relay.store.suppression),
messages (relay.store.messages), feedback_events (relay.store.feedback_events),
relay_state (relay.feedback.guard), rate_slots (relay.store.budget). SQLite in the spool
by default; migrations in relay/store/migrations run by open_database() (service, CLI).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from relay.store.loop_read import LoopReader, sqlite_path
from relay.store.thread_engine import ThreadEngine, sqlite_pragmas

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class Suppression(Base):
    __tablename__ = "suppressions"

    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    #: bounce, complaint, soft-bounce limit, manual
    reason: Mapped[str] = mapped_column(String(32))
    #: ses (feedback), ses-account (suppression sync), operator, import
    source: Mapped[str] = mapped_column(String(32), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("queue_id", "recipient", name="uq_messages_queue_recipient"),
        Index("ix_messages_recipient", "recipient"),
        Index("ix_messages_ses_message_id", "ses_message_id"),
        Index("ix_messages_updated_at", "updated_at"),
        # the reputation guard counts a window's sends per lane and outcome from it
        Index("ix_messages_sent_lane_status", "sent_at", "lane", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    queue_id: Mapped[str] = mapped_column(String(64))
    recipient: Mapped[str] = mapped_column(String(320))
    message_id_header: Mapped[str] = mapped_column(String(998), default="")
    ses_message_id: Mapped[str] = mapped_column(String(128), default="")
    #: queued, sent, delivered, bounced, soft-bounced, ses-suppressed, complained,
    #: suppressed, failed, deferred (relay.store.transitions)
    status: Mapped[str] = mapped_column(String(16))
    #: the lane the ingress chose ("" on rows from before lanes were logged)
    lane: Mapped[str] = mapped_column(String(32), default="", server_default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class FeedbackEvent(Base):
    __tablename__ = "feedback_events"
    __table_args__ = (
        UniqueConstraint("event_key", "recipient", name="uq_feedback_key_recipient"),
        Index("ix_feedback_recipient", "recipient"),
        Index("ix_feedback_received_at", "received_at"),
        # a message's events: the message log's early feedback, the console's timeline
        Index("ix_feedback_ses_message_id", "ses_message_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: sha256 of the SES JSON: the same notification twice is applied once
    event_key: Mapped[str] = mapped_column(String(64))
    recipient: Mapped[str] = mapped_column(String(320))
    #: bounce, soft-bounce, complaint, delivery, send, reject, delay, rendering-failure
    kind: Mapped[str] = mapped_column(String(24))
    ses_message_id: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    occurred_at: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)


class BounceCount(Base):
    __tablename__ = "bounce_counts"

    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float)


class StateRow(Base):
    __tablename__ = "relay_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[float] = mapped_column(Float)


class RateSlot(Base):
    __tablename__ = "rate_slots"

    #: tenths of a second since the epoch: recipients may leave in [slot/10, (slot+1)/10)
    slot: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    #: recipients leased for this slot, by all relays together
    granted: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


def database_url(url: str, spool_dir: str | Path) -> str:
    """The async SQLAlchemy URL: default SQLite in the spool dir; drivers made async."""
    if not url:
        return f"sqlite+aiosqlite:///{Path(spool_dir).resolve() / 'relay.db'}"
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://"):]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://"):]
    return url


class Database:
    """An async engine and session factory; `await Database.open(...)` migrates first."""

    def __init__(self, engine: AsyncEngine, *, lock_timeout: float = 30.0) -> None:
        self.engine = engine
        #: SQLite: seconds a write waits for another writer's lock (database.lock_timeout)
        self.lock_timeout = lock_timeout
        self.session = async_sessionmaker(engine, expire_on_commit=False)
        #: SQLite in a file: point reads on the event loop (relay.store.loop_read)
        path = sqlite_path(engine.url.render_as_string(hide_password=False))
        self.loop_reader = LoopReader(path) if path is not None else None
        #: SQLite in a file: whole transactions in a thread of their own (transaction())
        self.thread_engine = (ThreadEngine(path, lock_timeout=lock_timeout)
                              if path is not None else None)

    @classmethod
    async def open(cls, url: str, spool_dir: str | Path, *, migrate: bool = True,
                   lock_timeout: float = 30.0) -> Database:
        full = database_url(url, spool_dir)
        kwargs: dict[str, Any] = {}
        if full.startswith("sqlite"):
            Path(spool_dir).mkdir(parents=True, exist_ok=True)
            # the relay and operator commands write the same file: wait for locks
            kwargs["connect_args"] = {"timeout": lock_timeout}
        engine = create_async_engine(full, **kwargs)
        if full.startswith("sqlite"):
            event.listen(engine.sync_engine, "connect", functools.partial(
                sqlite_pragmas, busy_ms=int(lock_timeout * 1000)))
        db = cls(engine, lock_timeout=lock_timeout)
        if migrate:
            await db.migrate()
        return db

    async def migrate(self) -> None:
        for attempt in range(5):
            try:
                async with self.engine.begin() as conn:
                    await conn.run_sync(_upgrade)
                return
            except OperationalError:
                # another process (the relay, an operator command) migrated first
                if attempt == 4:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))

    async def transaction(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(connection, *args) in one transaction, committed on return: on SQLite in the
        thread engine (one hand-off for all of it), otherwise through run_sync."""
        if self.thread_engine is not None:
            return await self.thread_engine.transaction(fn, *args)
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn, *args)

    async def close(self) -> None:
        if self.loop_reader is not None:
            self.loop_reader.close()
        if self.thread_engine is not None:
            await self.thread_engine.close()
        await self.engine.dispose()


def _upgrade(connection: Any) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    logging.getLogger("alembic").setLevel(logging.WARNING)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    if connection.dialect.name == "postgresql":
        # relays starting together on a fresh database: one migrates, the others wait and
        # then find the schema at head (the lock ends with the migration's transaction)
        connection.execute(text("SELECT pg_advisory_xact_lock(:space, 0)"),
                           {"space": LOCK_MIGRATE})
    command.upgrade(cfg, "head")


#: Namespaces of the PostgreSQL advisory locks the relay takes (first key of the pair).
LOCK_SES_MESSAGE = 7001
LOCK_RATE_BUDGET = 7002
LOCK_MIGRATE = 7003


def xact_lock_sync(conn: Any, space: int, key: str) -> None:
    """xact_lock() for a synchronous connection (Database.transaction)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:key))"),
                     {"space": space, "key": key})


async def xact_lock(conn: Any, space: int, key: str) -> None:
    """Hold a lock named (space, key) until the transaction ends, on PostgreSQL.

    SQLite lets one writer at a time in anyway. On PostgreSQL two transactions that each
    read what the other is about to write (the log writer and a feedback event for the
    same SES MessageId) would both miss the other; this orders them.
    """
    dialect = conn.get_bind().dialect if hasattr(conn, "get_bind") else conn.dialect
    if dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:key))"),
                           {"space": space, "key": key})


async def open_database(url: str, spool_dir: str | Path) -> Database:
    return await Database.open(url, spool_dir)


__all__ = ["Base", "BounceCount", "Database", "FeedbackEvent", "MessageRow", "RateSlot", "StateRow",
           "Suppression", "database_url", "open_database", "xact_lock", "xact_lock_sync"]

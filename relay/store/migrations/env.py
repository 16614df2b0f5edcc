"""Alembic environment: runs on the connection relay.store.db hands over (start-up migration).

Run by hand (`alembic -x url=sqlite:///spool/relay.db upgrade head` with
script_location = relay/store/migrations) it opens its own async engine from that URL.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

from relay.store.db import Base, database_url

target_metadata = Base.metadata


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_async_engine(database_url(url, "spool"))
    async with engine.begin() as conn:
        await conn.run_sync(_run)
    await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    asyncio.run(_run_async(context.get_x_argument(as_dictionary=True).get("url", "")))

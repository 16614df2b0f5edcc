"""Alembic migrations for the relay's database (applied at start-up by relay.store.db)."""

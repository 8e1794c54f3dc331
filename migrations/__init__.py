"""Alembic migrations for the inferq schema."""

"""Persistence: the only place that speaks SQL (SQLAlchemy 2)."""

"""Fixtures of the controller tests (defined in the uniquely named helper modules)."""

from __future__ import annotations

from historian_testkit import batch_records, pg_url, postgres_server

__all__ = ["batch_records", "pg_url", "postgres_server"]

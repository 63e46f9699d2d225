"""Persistence: the DuckDB store (`duckdb_store`), its schema (`schema`) and array files (`arrays`)."""

from engine.store.duckdb_store import Store, open_store

__all__ = ["Store", "open_store"]

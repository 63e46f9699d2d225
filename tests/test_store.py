"""The DuckDB store: schema versioning, refusals that leave files alone, and array files."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import StoreError
from engine.hashing import sha256_file, xxh3_file
from engine.paths import cache_root, database_path
from engine.store import duckdb_store, open_store
from engine.store.arrays import load_arrays, save_arrays
from engine.store.duckdb_store import Store
from engine.store.schema import MIGRATIONS, SCHEMA_VERSION, Migration

TABLES = {
    "schema_meta", "file_hashes", "models", "texts", "arrays", "calibrations",
    "weight_spectra", "feature_spectra", "evaluations",
}


def _tables(store: Store) -> set[str]:
    return {row[0] for row in store.fetch_all("SELECT table_name FROM information_schema.tables")}


def test_fresh_database_gets_the_current_schema(isolated_cache):
    store = open_store()
    assert store.path == isolated_cache / "rankscope.duckdb" == database_path()
    assert store.schema_version == SCHEMA_VERSION == MIGRATIONS[-1].version
    assert TABLES <= _tables(store)
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def test_reopening_keeps_data_and_applies_only_new_migrations(isolated_cache, monkeypatch):
    store = open_store()
    store.record_text("fp-1", "sample", "sample.txt", 123)
    store.close()

    reopened = open_store()  # re-running migration 1 would fail: its tables exist
    assert reopened.schema_version == SCHEMA_VERSION
    assert reopened.fetch_all("SELECT fingerprint, n_chars FROM texts") == [("fp-1", 123)]
    reopened.close()

    extra = Migration(SCHEMA_VERSION + 1, "test table", ("CREATE TABLE extra_test (x INTEGER)",))
    monkeypatch.setattr(duckdb_store, "MIGRATIONS", (*MIGRATIONS, extra))
    monkeypatch.setattr(duckdb_store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    upgraded = open_store()
    assert upgraded.schema_version == SCHEMA_VERSION + 1
    assert "extra_test" in _tables(upgraded)
    upgraded.close()
    again = open_store()  # neither migration runs twice
    assert again.schema_version == SCHEMA_VERSION + 1
    assert again.fetch_all("SELECT fingerprint FROM texts") == [("fp-1",)]


def test_newer_database_is_refused_and_left_untouched(isolated_cache):
    store = open_store()
    store.execute("UPDATE schema_meta SET value = ? WHERE key = 'version'", [str(SCHEMA_VERSION + 1)])
    store.close()
    path = database_path()
    before = sha256_file(path)
    files_before = sorted(os.listdir(isolated_cache))

    with pytest.raises(StoreError) as info:
        open_store()
    message = str(info.value)
    assert "newer" in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"versions up to {SCHEMA_VERSION}" in message
    assert str(path) in message
    assert sha256_file(path) == before
    assert sorted(os.listdir(isolated_cache)) == files_before
    assert path.resolve() not in duckdb_store._OPEN_STORES


def test_corrupt_database_is_refused_and_kept(isolated_cache):
    path = database_path()
    junk = os.urandom(8192)
    path.write_bytes(junk)

    with pytest.raises(StoreError) as info:
        open_store()
    message = str(info.value)
    assert str(path) in message
    assert f"mv {path} {path}.bak" in message
    # it says what is lost (studies live in the database) and how they come back
    assert "search studies live in this database" in message and "rankscope search restore" in message
    assert str(path.parent / "studies") in message
    assert "Traceback" not in message
    assert path.read_bytes() == junk
    assert path.resolve() not in duckdb_store._OPEN_STORES


def test_open_store_is_one_object_per_path(isolated_cache, tmp_path):
    first = open_store()
    assert open_store() is first
    assert open_store(database_path()) is first
    assert open_store(str(isolated_cache / "." / "rankscope.duckdb")) is first
    other = open_store(tmp_path / "other.duckdb")
    assert other is not first
    first.close()
    assert open_store() is not first  # a closed store is forgotten


def test_arrays_round_trip(store):
    tensors = {
        "0.attn_in.mean": torch.randn(5, dtype=torch.float64),
        "0.attn_in.second_moment": torch.randn(5, 5, dtype=torch.float64),
        "count": torch.tensor([42], dtype=torch.int64),
    }
    path = save_arrays(store, "abc123", "calibration", tensors, metadata={"model": "tiny"})
    assert path == cache_root() / "arrays" / "calibration" / "abc123.safetensors"
    assert path.is_file() and not path.with_suffix(".partial").exists()
    entry = store.array_entry("abc123")
    assert entry == {
        "kind": "calibration", "relpath": "arrays/calibration/abc123.safetensors",
        "n_bytes": path.stat().st_size, "sha256": sha256_file(path), "xxh3": xxh3_file(path),
    }
    loaded = load_arrays(store, "abc123")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_missing_or_damaged_array_file_is_a_miss(store):
    assert load_arrays(store, "never-saved") is None

    path = save_arrays(store, "gone", "test", {"x": torch.ones(3)})
    path.unlink()
    assert load_arrays(store, "gone") is None
    assert store.array_entry("gone") is None  # the stale index entry is dropped

    path = save_arrays(store, "tampered", "test", {"x": torch.ones(3)})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    assert load_arrays(store, "tampered") is None  # every read is checked, not only on request
    assert store.array_entry("tampered") is None

    path = save_arrays(store, "truncated", "test", {"x": torch.ones(3)})
    path.write_bytes(path.read_bytes()[:-4])
    assert load_arrays(store, "truncated") is None


def test_an_array_changed_in_place_is_recomputed_not_served(store, caplog):
    """A cached factor corrupted in place (same size) is a miss with a warning, so no NaN reaches a metric."""
    path = save_arrays(store, "factors", "factorization", {"B": torch.ones(64, 8)})
    data = bytearray(path.read_bytes())
    data[-8:-4] = bytes.fromhex("0000c07f")  # one float32 becomes NaN; the file keeps its size
    path.write_bytes(bytes(data))
    assert torch.isnan(load_file(str(path))["B"]).any()  # what the old reader served
    with caplog.at_level("WARNING"):
        assert load_arrays(store, "factors") is None
    assert "does not match the checksum" in caplog.text and store.array_entry("factors") is None


def test_an_array_recorded_before_checksums_is_verified_once_by_sha256(store):
    path = save_arrays(store, "old", "test", {"x": torch.arange(4.0)})
    store.execute("UPDATE arrays SET xxh3 = NULL WHERE array_id = 'old'")  # as a 0.1.0 cache recorded it
    assert torch.equal(load_arrays(store, "old")["x"], torch.arange(4.0))
    assert store.array_entry("old")["xxh3"] == xxh3_file(path)  # checked against sha256, then given a checksum
    store.execute("UPDATE arrays SET xxh3 = NULL WHERE array_id = 'old'")
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")
    assert load_arrays(store, "old") is None

"""The DuckDB-backed store: one connection per process, every write goes through it.

`open_store()` returns the process-wide `Store` for a database path, migrating it to the current
schema on first open. A database written by a newer RankScope, or one DuckDB cannot read, is
refused with a `StoreError` that names the file and what to do; nothing is deleted automatically.
Large arrays are not kept in DuckDB: see `engine.store.arrays`; they live under the database's own
folder (`Store.cache_dir`). The records the store reads and writes are defined in `engine.records`;
other modules reach the database only through the public methods here (`fetch_all`, `fetch_one`,
`execute` for SQL of their own tables, `get_record`/`put_record`/`forget_record` for records).
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterable, Optional, TypeVar

import duckdb

from engine.errors import StoreError
from engine.records import RECORD_TABLES, SensitivityPoint, SpectrumRow
from engine.store.schema import MIGRATIONS, SCHEMA_VERSION

R = TypeVar("R")


# Rows come back in the canonical order q, k, v, o, gate, up, down (as `adapter.linears()` yields
# them), not alphabetically, so a cached answer lists matrices exactly as a fresh one does.
_CANONICAL_TYPE_ORDER = "list_position(['q', 'k', 'v', 'o', 'gate', 'up', 'down'], linear_type)"


class Store:
    """Typed access to the cache database. Thread-safe: calls are serialised by a lock."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._conn = duckdb.connect(str(self.path))
        except duckdb.Error as exc:
            raise StoreError(_open_failure_message(self.path, exc)) from exc
        try:
            self._migrate()
        except duckdb.Error as exc:
            self._conn.close()
            raise StoreError(_open_failure_message(self.path, exc)) from exc

    # -- schema -----------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._read_version()

    def _read_version(self) -> int:
        exists = self._conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_meta'"
        ).fetchone()[0]
        if not exists:
            return 0
        row = self._conn.execute("SELECT value FROM schema_meta WHERE key = 'version'").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        with self._lock:
            current = self._read_version()
            if current > SCHEMA_VERSION:
                self._conn.close()
                raise StoreError(
                    f"The cache database {self.path} has schema version {current}, but this RankScope "
                    f"understands versions up to {SCHEMA_VERSION}: it was written by a newer RankScope. "
                    "Upgrade RankScope, or set RANKSCOPE_CACHE to another folder to use a separate cache. "
                    "The database was left untouched."
                )
            for migration in MIGRATIONS:
                if migration.version <= current:
                    continue
                self._conn.execute("BEGIN TRANSACTION")
                try:
                    for statement in migration.statements:
                        self._conn.execute(statement)
                    self._conn.execute(
                        "INSERT OR REPLACE INTO schema_meta VALUES ('version', ?)", [str(migration.version)]
                    )
                    self._conn.execute("COMMIT")
                except Exception:
                    self._conn.execute("ROLLBACK")
                    raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        _forget(self)

    @property
    def cache_dir(self) -> Path:
        """The folder of the database: array files and other cached files live below it."""
        return self.path.parent

    # -- public query API --------------------------------------------------------------------------
    def execute(self, sql: str, params: Iterable[Any] = ()) -> None:
        """Run one statement (serialised with every other call on this store)."""
        with self._lock:
            self._conn.execute(sql, list(params))

    def fetch_one(self, sql: str, params: Iterable[Any] = ()) -> Optional[tuple]:
        with self._lock:
            return self._conn.execute(sql, list(params)).fetchone()

    def fetch_all(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, list(params)).fetchall()

    # -- records (engine.records): one table each, keyed by the record's first field ---------------
    def _upsert(self, table: str, record: Any) -> None:
        values = asdict(record)
        names, marks = ", ".join(values), ", ".join("?" for _ in values)
        self.execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", values.values())

    def put_record(self, record: Any) -> None:
        self._upsert(RECORD_TABLES[type(record)], record)

    def get_record(self, record_type: type[R], record_id: str) -> Optional[R]:
        names = [f.name for f in fields(record_type)]
        row = self.fetch_one(f"SELECT {', '.join(names)} FROM {RECORD_TABLES[record_type]} WHERE {names[0]} = ?",
                             [record_id])
        return None if row is None else record_type(*row)

    def forget_record(self, record_type: type, record_id: str) -> None:
        key = fields(record_type)[0].name
        self.execute(f"DELETE FROM {RECORD_TABLES[record_type]} WHERE {key} = ?", [record_id])

    def records(self, record_type: type[R], model_fingerprint: Optional[str] = None) -> list[R]:
        """Every stored record of a type, oldest first (optionally of one model)."""
        names = ", ".join(f.name for f in fields(record_type))
        sql, params = f"SELECT {names} FROM {RECORD_TABLES[record_type]}", []
        if model_fingerprint is not None:
            sql, params = sql + " WHERE model_fingerprint = ?", [model_fingerprint]
        return [record_type(*row) for row in self.fetch_all(sql + " ORDER BY created_at", params)]

    # -- file hash memo -------------------------------------------------------------------------
    def cached_file_hash(self, path: Path, size: int, mtime_ns: int) -> Optional[str]:
        row = self.fetch_one(
            "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
            [str(path), size, mtime_ns],
        )
        return row[0] if row else None

    def remember_file_hash(self, path: Path, size: int, mtime_ns: int, sha256: str) -> None:
        self.execute(
            "INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", [str(path), size, mtime_ns, sha256]
        )

    # -- models and texts -------------------------------------------------------------------------
    def record_model(
        self, fingerprint: str, model_id: str, model_type: str, path: str, n_layers: int, config: dict
    ) -> None:
        self.execute(
            "INSERT OR REPLACE INTO models (fingerprint, model_id, model_type, path, n_layers, config_json) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [fingerprint, model_id, model_type, path, n_layers, json.dumps(config, sort_keys=True, default=str)],
        )

    def models(self) -> list[dict]:
        rows = self.fetch_all(
            "SELECT fingerprint, model_id, model_type, path, n_layers, created_at FROM models ORDER BY created_at"
        )
        keys = ("fingerprint", "model_id", "model_type", "path", "n_layers", "created_at")
        return [dict(zip(keys, row)) for row in rows]

    def record_text(self, fingerprint: str, name: str, source: str, n_chars: int) -> None:
        self.execute(
            "INSERT OR REPLACE INTO texts (fingerprint, name, source, n_chars) VALUES (?, ?, ?, ?)",
            [fingerprint, name, source, n_chars],
        )

    # -- arrays index -------------------------------------------------------------------------------
    def record_array(self, array_id: str, kind: str, relpath: str, n_bytes: int, sha256: str, xxh3: str) -> None:
        self.execute(
            "INSERT OR REPLACE INTO arrays (array_id, kind, relpath, n_bytes, sha256, xxh3) VALUES (?, ?, ?, ?, ?, ?)",
            [array_id, kind, relpath, n_bytes, sha256, xxh3],
        )

    def array_entry(self, array_id: str) -> Optional[dict]:
        keys = ("kind", "relpath", "n_bytes", "sha256", "xxh3")
        row = self.fetch_one(f"SELECT {', '.join(keys)} FROM arrays WHERE array_id = ?", [array_id])
        return None if row is None else dict(zip(keys, row))

    def set_array_checksum(self, array_id: str, xxh3: str) -> None:
        """Record the fast checksum of an array written before checksums were kept (verified by sha256 first)."""
        self.execute("UPDATE arrays SET xxh3 = ? WHERE array_id = ?", [xxh3, array_id])

    def forget_array(self, array_id: str) -> None:
        self.execute("DELETE FROM arrays WHERE array_id = ?", [array_id])

    # -- spectra ----------------------------------------------------------------------------------------
    def put_weight_spectra(self, model_fingerprint: str, rows: list[SpectrumRow]) -> None:
        with self._lock:
            self._conn.execute("BEGIN TRANSACTION")
            self._conn.execute("DELETE FROM weight_spectra WHERE model_fingerprint = ?", [model_fingerprint])
            self._conn.executemany(
                "INSERT INTO weight_spectra VALUES (?, ?, ?, ?, ?, ?)",
                [[model_fingerprint, r.layer, r.linear_type, r.d_out, r.d_in, r.values] for r in rows],
            )
            self._conn.execute("COMMIT")

    def get_weight_spectra(self, model_fingerprint: str) -> list[SpectrumRow]:
        rows = self.fetch_all(
            "SELECT layer, linear_type, d_out, d_in, singular_values FROM weight_spectra "
            f"WHERE model_fingerprint = ? ORDER BY layer, {_CANONICAL_TYPE_ORDER}",
            [model_fingerprint],
        )
        return [SpectrumRow(*row) for row in rows]

    def put_feature_spectra(self, calibration_id: str, covariance: str, rows: list[SpectrumRow]) -> None:
        with self._lock:
            self._conn.execute("BEGIN TRANSACTION")
            self._conn.execute(
                "DELETE FROM feature_spectra WHERE calibration_id = ? AND covariance = ?",
                [calibration_id, covariance],
            )
            self._conn.executemany(
                "INSERT INTO feature_spectra VALUES (?, ?, ?, ?, ?, ?, ?)",
                [[calibration_id, covariance, r.layer, r.linear_type, r.d_out, r.d_in, r.values] for r in rows],
            )
            self._conn.execute("COMMIT")

    def get_feature_spectra(self, calibration_id: str, covariance: str) -> list[SpectrumRow]:
        rows = self.fetch_all(
            "SELECT layer, linear_type, d_out, d_in, eigenvalues FROM feature_spectra "
            f"WHERE calibration_id = ? AND covariance = ? ORDER BY layer, {_CANONICAL_TYPE_ORDER}",
            [calibration_id, covariance],
        )
        return [SpectrumRow(*row) for row in rows]

    # -- sensitivity sweeps --------------------------------------------------------------------------------
    def register_sweep(self, sweep_id: str, model_fingerprint: str, method: str, factorization_id: str,
                       reference_id: str, settings: dict) -> None:
        self.execute(
            "INSERT OR IGNORE INTO sweeps (sweep_id, model_fingerprint, method, factorization_id, reference_id, "
            "settings_json) VALUES (?, ?, ?, ?, ?, ?)",
            [sweep_id, model_fingerprint, method, factorization_id, reference_id, json.dumps(settings, sort_keys=True)],
        )

    def put_sensitivity_point(self, point: SensitivityPoint) -> None:
        self._upsert("sensitivity_points", point)

    def sensitivity_points(self, sweep_id: str) -> list[SensitivityPoint]:
        names = ", ".join(f.name for f in fields(SensitivityPoint))
        rows = self.fetch_all(
            f"SELECT {names} FROM sensitivity_points WHERE sweep_id = ? ORDER BY linear_type, layer, ratio", [sweep_id]
        )
        return [SensitivityPoint(*row) for row in rows]

    # -- exports ----------------------------------------------------------------------------------------------
    def record_export(self, export_id: str, model_fingerprint: str, path: str, report: dict) -> None:
        """Index an export directory (the directory itself lives outside the cache)."""
        self.execute(
            "INSERT OR REPLACE INTO exports (export_id, model_fingerprint, path, report_json) VALUES (?, ?, ?, ?)",
            [export_id, model_fingerprint, path, json.dumps(report, sort_keys=True, default=str)],
        )

    def exports(self, model_fingerprint: Optional[str] = None) -> list[dict]:
        sql = "SELECT export_id, model_fingerprint, path, report_json, created_at FROM exports"
        params: list[Any] = []
        if model_fingerprint is not None:
            sql += " WHERE model_fingerprint = ?"
            params.append(model_fingerprint)
        rows = self.fetch_all(sql + " ORDER BY created_at", params)
        return [{"export_id": r[0], "model_fingerprint": r[1], "path": r[2], "report": json.loads(r[3]),
                 "created_at": r[4]} for r in rows]


_OPEN_STORES: dict[Path, Store] = {}
_OPEN_LOCK = threading.Lock()


def open_store(path: Path | str | None = None) -> Store:
    """The process-wide store for `path` (default: `engine.paths.database_path()`)."""
    from engine.paths import database_path

    resolved = Path(path if path is not None else database_path()).resolve()
    with _OPEN_LOCK:
        store = _OPEN_STORES.get(resolved)
        if store is None:
            store = Store(resolved)
            _OPEN_STORES[resolved] = store
        return store


def _forget(store: Store) -> None:
    with _OPEN_LOCK:
        if _OPEN_STORES.get(store.path.resolve()) is store:
            del _OPEN_STORES[store.path.resolve()]


def _open_failure_message(path: Path, exc: Exception) -> str:
    text = str(exc)
    if "lock" in text.lower():
        return (
            f"The cache database {path} is in use by another RankScope process (DuckDB allows one "
            f"writer at a time): {text.splitlines()[0]}. Stop the other process (for example the app) "
            "or set RANKSCOPE_CACHE to another folder."
        )
    return (
        f"The cache database {path} could not be opened: {text.splitlines()[0] if text else type(exc).__name__}. "
        "It may be corrupt or not a DuckDB file. Nothing was changed. Computed results (calibrations, factors, "
        "sweeps) only cost time to recompute, but search studies live in this database: each is also kept as a "
        f"JSON file in {path.parent / 'studies'}. Move the database aside (mv {path} {path}.bak); RankScope then "
        "starts a fresh one, and `rankscope search restore` copies the studies back from their files. Plans and "
        "exports you saved are files of their own and are not affected."
    )

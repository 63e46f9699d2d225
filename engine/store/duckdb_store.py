"""The DuckDB-backed store: one connection per process, every write goes through it.

`open_store()` returns the process-wide `Store` for a database path, migrating it to the current
schema on first open. A database written by a newer RankScope, or one DuckDB cannot read, is
refused with a `StoreError` that names the file and what to do; nothing is deleted automatically.
Large arrays are not kept in DuckDB: see `engine.store.arrays`.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Optional

import duckdb

from engine.errors import StoreError
from engine.store.schema import MIGRATIONS, SCHEMA_VERSION


@dataclass(frozen=True)
class CalibrationRecord:
    calibration_id: str
    model_fingerprint: str
    text_fingerprint: str
    window_len: int
    n_windows: int
    n_groups: int
    add_bos: bool
    n_tokens: int
    array_id: str
    seconds: float


@dataclass(frozen=True)
class EvaluationRecord:
    evaluation_id: str
    model_fingerprint: str
    text_fingerprint: str
    window_len: int
    n_windows: int
    add_bos: bool
    perplexity: float
    mean_nll: float
    n_tokens: int
    window_nll: list[float]
    seconds: float


@dataclass(frozen=True)
class FactorizationRecord:
    factorization_id: str
    model_fingerprint: str
    method: str
    calibration_id: str
    array_id: str
    seconds: float


@dataclass(frozen=True)
class ReferenceRecord:
    reference_id: str
    model_fingerprint: str
    text_fingerprint: str
    window_len: int
    n_windows: int
    top_k: int
    array_id: str
    perplexity: float
    seconds: float


@dataclass(frozen=True)
class SensitivityPoint:
    sweep_id: str
    linear_type: str
    layer: int  # -1: every layer
    ratio: float
    decoder_params: int
    perplexity: float
    kl_forward: float
    kl_reverse: float
    seconds: float


@dataclass(frozen=True)
class SpectrumRow:
    """Spectrum of one decoder linear: singular values of W, or eigenvalues of W·C·Wᵀ (descending)."""

    layer: int
    linear_type: str
    d_out: int
    d_in: int
    values: list[float]


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

    # -- generic helpers ------------------------------------------------------------------------
    def _execute(self, sql: str, params: Iterable[Any] = ()) -> duckdb.DuckDBPyConnection:
        with self._lock:
            return self._conn.execute(sql, list(params))

    def _fetchone(self, sql: str, params: Iterable[Any] = ()) -> Optional[tuple]:
        with self._lock:
            return self._conn.execute(sql, list(params)).fetchone()

    def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, list(params)).fetchall()

    def _upsert(self, table: str, record: Any) -> None:
        values = asdict(record)
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self._execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})", values.values())

    def _get(self, table: str, record_type: type, key: str, value: Any):
        names = [f.name for f in fields(record_type)]
        row = self._fetchone(f"SELECT {', '.join(names)} FROM {table} WHERE {key} = ?", [value])
        return None if row is None else record_type(*row)

    # -- file hash memo -------------------------------------------------------------------------
    def cached_file_hash(self, path: Path, size: int, mtime_ns: int) -> Optional[str]:
        row = self._fetchone(
            "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
            [str(path), size, mtime_ns],
        )
        return row[0] if row else None

    def remember_file_hash(self, path: Path, size: int, mtime_ns: int, sha256: str) -> None:
        self._execute(
            "INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", [str(path), size, mtime_ns, sha256]
        )

    # -- models and texts -------------------------------------------------------------------------
    def record_model(
        self, fingerprint: str, model_id: str, model_type: str, path: str, n_layers: int, config: dict
    ) -> None:
        self._execute(
            "INSERT OR REPLACE INTO models (fingerprint, model_id, model_type, path, n_layers, config_json) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [fingerprint, model_id, model_type, path, n_layers, json.dumps(config, sort_keys=True, default=str)],
        )

    def models(self) -> list[dict]:
        rows = self._fetchall(
            "SELECT fingerprint, model_id, model_type, path, n_layers, created_at FROM models ORDER BY created_at"
        )
        keys = ("fingerprint", "model_id", "model_type", "path", "n_layers", "created_at")
        return [dict(zip(keys, row)) for row in rows]

    def record_text(self, fingerprint: str, name: str, source: str, n_chars: int) -> None:
        self._execute(
            "INSERT OR REPLACE INTO texts (fingerprint, name, source, n_chars) VALUES (?, ?, ?, ?)",
            [fingerprint, name, source, n_chars],
        )

    # -- arrays index -------------------------------------------------------------------------------
    def record_array(self, array_id: str, kind: str, relpath: str, n_bytes: int, sha256: str) -> None:
        self._execute(
            "INSERT OR REPLACE INTO arrays (array_id, kind, relpath, n_bytes, sha256) VALUES (?, ?, ?, ?, ?)",
            [array_id, kind, relpath, n_bytes, sha256],
        )

    def array_entry(self, array_id: str) -> Optional[dict]:
        row = self._fetchone("SELECT kind, relpath, n_bytes, sha256 FROM arrays WHERE array_id = ?", [array_id])
        return None if row is None else dict(zip(("kind", "relpath", "n_bytes", "sha256"), row))

    def forget_array(self, array_id: str) -> None:
        self._execute("DELETE FROM arrays WHERE array_id = ?", [array_id])

    # -- calibrations ---------------------------------------------------------------------------------
    def put_calibration(self, record: CalibrationRecord) -> None:
        self._upsert("calibrations", record)

    def get_calibration(self, calibration_id: str) -> Optional[CalibrationRecord]:
        return self._get("calibrations", CalibrationRecord, "calibration_id", calibration_id)

    def forget_calibration(self, calibration_id: str) -> None:
        self._execute("DELETE FROM calibrations WHERE calibration_id = ?", [calibration_id])

    def calibrations(self, model_fingerprint: Optional[str] = None) -> list[CalibrationRecord]:
        names = ", ".join(f.name for f in fields(CalibrationRecord))
        sql = f"SELECT {names} FROM calibrations"
        params: list[Any] = []
        if model_fingerprint is not None:
            sql += " WHERE model_fingerprint = ?"
            params.append(model_fingerprint)
        return [CalibrationRecord(*row) for row in self._fetchall(sql + " ORDER BY created_at", params)]

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
        rows = self._fetchall(
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
        rows = self._fetchall(
            "SELECT layer, linear_type, d_out, d_in, eigenvalues FROM feature_spectra "
            f"WHERE calibration_id = ? AND covariance = ? ORDER BY layer, {_CANONICAL_TYPE_ORDER}",
            [calibration_id, covariance],
        )
        return [SpectrumRow(*row) for row in rows]

    # -- evaluations --------------------------------------------------------------------------------------
    def put_evaluation(self, record: EvaluationRecord) -> None:
        self._upsert("evaluations", record)

    def get_evaluation(self, evaluation_id: str) -> Optional[EvaluationRecord]:
        return self._get("evaluations", EvaluationRecord, "evaluation_id", evaluation_id)

    # -- factorisations and reference distributions ----------------------------------------------------
    def put_factorization(self, record: FactorizationRecord) -> None:
        self._upsert("factorizations", record)

    def get_factorization(self, factorization_id: str) -> Optional[FactorizationRecord]:
        return self._get("factorizations", FactorizationRecord, "factorization_id", factorization_id)

    def forget_factorization(self, factorization_id: str) -> None:
        self._execute("DELETE FROM factorizations WHERE factorization_id = ?", [factorization_id])

    def put_reference(self, record: ReferenceRecord) -> None:
        self._upsert("reference_distributions", record)

    def get_reference(self, reference_id: str) -> Optional[ReferenceRecord]:
        return self._get("reference_distributions", ReferenceRecord, "reference_id", reference_id)

    def forget_reference(self, reference_id: str) -> None:
        self._execute("DELETE FROM reference_distributions WHERE reference_id = ?", [reference_id])

    # -- sensitivity sweeps --------------------------------------------------------------------------------
    def register_sweep(self, sweep_id: str, model_fingerprint: str, method: str, factorization_id: str,
                       reference_id: str, settings: dict) -> None:
        self._execute(
            "INSERT OR IGNORE INTO sweeps (sweep_id, model_fingerprint, method, factorization_id, reference_id, "
            "settings_json) VALUES (?, ?, ?, ?, ?, ?)",
            [sweep_id, model_fingerprint, method, factorization_id, reference_id, json.dumps(settings, sort_keys=True)],
        )

    def put_sensitivity_point(self, point: SensitivityPoint) -> None:
        self._upsert("sensitivity_points", point)

    def sensitivity_points(self, sweep_id: str) -> list[SensitivityPoint]:
        names = ", ".join(f.name for f in fields(SensitivityPoint))
        rows = self._fetchall(
            f"SELECT {names} FROM sensitivity_points WHERE sweep_id = ? ORDER BY linear_type, layer, ratio", [sweep_id]
        )
        return [SensitivityPoint(*row) for row in rows]

    # -- exports ----------------------------------------------------------------------------------------------
    def record_export(self, export_id: str, model_fingerprint: str, path: str, report: dict) -> None:
        """Index an export directory (the directory itself lives outside the cache)."""
        self._execute(
            "INSERT OR REPLACE INTO exports (export_id, model_fingerprint, path, report_json) VALUES (?, ?, ?, ?)",
            [export_id, model_fingerprint, path, json.dumps(report, sort_keys=True, default=str)],
        )

    def exports(self, model_fingerprint: Optional[str] = None) -> list[dict]:
        sql = "SELECT export_id, model_fingerprint, path, report_json, created_at FROM exports"
        params: list[Any] = []
        if model_fingerprint is not None:
            sql += " WHERE model_fingerprint = ?"
            params.append(model_fingerprint)
        rows = self._fetchall(sql + " ORDER BY created_at", params)
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
        "It may be corrupt or not a DuckDB file. Nothing was changed: move it aside "
        f"(mv {path} {path}.bak) and RankScope will start a fresh cache; only computation time is lost, "
        "since saved plans and exports live outside the cache."
    )

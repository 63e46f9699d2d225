"""What the cache holds for one model: calibrations, baseline evaluations and sensitivity sweeps.

Read-only summaries for front ends (the app's "what is cached" tables, and the Sensitivity page,
which reopens instantly because it finds a sweep's points without loading any factors). Every
answer is one DuckDB query: no torch, no array files read. Text names come from the `texts` table
(the name a text had when it was first read); a text never read by a recorded step shows as the
first 12 characters of its fingerprint. It reads through the store's public query API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.store.duckdb_store import Store


def _text_name(column: str) -> str:
    return f"coalesce((SELECT name FROM texts WHERE fingerprint = {column}), substr({column}, 1, 12))"


def _rows(store: Store, sql: str, params: list, keys: tuple[str, ...]) -> list[dict]:
    return [dict(zip(keys, row)) for row in store.fetch_all(sql, params)]


def cached_calibrations(store: Store, model_fingerprint: str) -> list[dict]:
    """Calibrations of a model, oldest first: text, window length, windows, groups, tokens, seconds."""
    return _rows(
        store,
        f"SELECT calibration_id, {_text_name('text_fingerprint')}, window_len, n_windows, n_groups, n_tokens, seconds, "
        "created_at FROM calibrations WHERE model_fingerprint = ? ORDER BY created_at",
        [model_fingerprint],
        ("calibration_id", "text", "window_len", "n_windows", "n_groups", "n_tokens", "seconds", "created_at"),
    )


def cached_evaluations(store: Store, model_fingerprint: str) -> list[dict]:
    """Baseline (original-model) evaluations of a model, oldest first, with their perplexity."""
    return _rows(
        store,
        f"SELECT {_text_name('text_fingerprint')}, window_len, n_windows, n_tokens, perplexity, seconds, created_at "
        "FROM evaluations WHERE model_fingerprint = ? ORDER BY created_at",
        [model_fingerprint],
        ("text", "window_len", "n_windows", "n_tokens", "perplexity", "seconds", "created_at"),
    )


def cached_sweeps(store: Store, model_fingerprint: str) -> list[dict]:
    """Sensitivity sweeps of a model: method, evaluation text and how many points of each kind are stored."""
    return _rows(
        store,
        f"SELECT s.method, {_text_name('r.text_fingerprint')}, r.window_len, r.n_windows, "
        "count(p.sweep_id) FILTER (WHERE p.layer < 0), count(p.sweep_id) FILTER (WHERE p.layer >= 0), s.created_at "
        "FROM sweeps s JOIN reference_distributions r ON r.reference_id = s.reference_id "
        "LEFT JOIN sensitivity_points p ON p.sweep_id = s.sweep_id "
        "WHERE s.model_fingerprint = ? GROUP BY s.sweep_id, s.method, r.text_fingerprint, r.window_len, r.n_windows, "
        "s.created_at ORDER BY s.created_at",
        [model_fingerprint],
        ("method", "evaluation_text", "window_len", "n_windows", "points_by_type", "points_by_layer", "created_at"),
    )


@dataclass(frozen=True)
class SweepLookup:
    """A stored sweep found by its settings, and the original model's perplexity on its evaluation set."""

    sweep_id: str
    original_perplexity: float


def find_sweep(
    store: Store,
    model_fingerprint: str,
    method: str,
    calibration_id: str,
    evaluation_text_fingerprint: str,
    window_len: int,
    n_windows: int,
) -> Optional[SweepLookup]:
    """The newest sweep for these settings (`calibration_id` is '' for data-free methods), or None.

    Matches on the stored factorisation's calibration and the reference distribution's evaluation
    set, so it finds exactly the sweep a `CompressionSession` with the same settings would extend.
    """
    row = store.fetch_one(
        "SELECT s.sweep_id, r.perplexity FROM sweeps s "
        "JOIN factorizations f ON f.factorization_id = s.factorization_id "
        "JOIN reference_distributions r ON r.reference_id = s.reference_id "
        "WHERE s.model_fingerprint = ? AND s.method = ? AND f.calibration_id = ? AND r.text_fingerprint = ? "
        "AND r.window_len = ? AND r.n_windows = ? ORDER BY s.created_at DESC LIMIT 1",
        [model_fingerprint, method, calibration_id, evaluation_text_fingerprint, window_len, n_windows],
    )
    return None if row is None else SweepLookup(row[0], float(row[1]))

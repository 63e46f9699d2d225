"""A method's full factorisation of every decoder linear, cached on disk and in the store.

A rank plan only slices these factors, so trying a plan costs almost nothing beyond evaluation.
"""

from __future__ import annotations

import time
from typing import Optional

from engine.cache.artifacts import Computed, get_or_compute
from engine.cache.calibration import Calibration
from engine.cache.keys import factorization_key
from engine.methods import Factorization, get_method
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback, ProgressTracker
from engine.records import FactorizationRecord
from engine.store.duckdb_store import Store


def ensure_factorization(
    store: Store,
    loaded: LoadedModel,
    method: str,
    calibration: Optional[Calibration],
    progress: Optional[ProgressCallback] = None,
) -> tuple[FactorizationRecord, Factorization]:
    """The full factorisation for `method` (with `calibration` where the method uses data)."""
    spec = get_method(method)
    calibration_id = calibration.record.calibration_id if spec.needs else ""
    key = factorization_key(loaded.fingerprint, method, calibration_id)

    def compute() -> Computed:
        tracker = ProgressTracker(progress, f"factorising ({method})", total=1, unit="models")
        start = time.perf_counter()
        factorization = spec.factorize(loaded, calibration.statistics if spec.needs else None)
        seconds = time.perf_counter() - start
        tracker.advance()
        tensors, metadata = factorization.to_tensors()
        record = FactorizationRecord(key, loaded.fingerprint, method, calibration_id, key, seconds)
        return Computed(factorization, record, tensors, metadata)

    cached = get_or_compute(store, "factorization", key, compute,
                            lambda _r, tensors, metadata: Factorization.from_tensors(tensors, metadata),
                            record_type=FactorizationRecord)
    return cached.record, cached.value

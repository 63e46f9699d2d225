"""Answers from the store without loading a model: kept free of torch, so that a cached answer
(for example `rankscope spectra` a second time, or a page reopening) costs only a DuckDB query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.cache.keys import calibration_key, evaluation_key
from engine.records import CalibrationRecord, EvaluationRecord, SpectrumRow
from engine.store.duckdb_store import Store
from engine.texts.corpus import text_fingerprint
from engine.texts.windows import Windowing


@dataclass(frozen=True)
class Spectra:
    weight: list[SpectrumRow]
    feature: list[SpectrumRow]
    covariance: str
    calibration_id: str


def find_calibration(
    store: Store, model_fingerprint: str, text_source: str, windowing: Windowing, n_groups: int,
    dtype: str = "float32",
) -> Optional[CalibrationRecord]:
    """The stored calibration for these settings (measured in forward dtype `dtype`), or None."""
    key = calibration_key(model_fingerprint, text_fingerprint(text_source), windowing, n_groups, dtype)
    return store.get_record(CalibrationRecord, key)


def stored_spectra(store: Store, model_fingerprint: str, calibration_id: str, covariance: str = "pooled") -> Optional[Spectra]:
    """Spectra already in the store, or None if either kind is missing."""
    weight = store.get_weight_spectra(model_fingerprint)
    feature = store.get_feature_spectra(calibration_id, covariance)
    if not weight or not feature:
        return None
    return Spectra(weight, feature, covariance, calibration_id)


def find_baseline_evaluation(
    store: Store, model_fingerprint: str, text_source: str, windowing: Windowing, dtype: str = "float32"
) -> Optional[EvaluationRecord]:
    """The original model's stored perplexity on these evaluation windows (in forward dtype `dtype`), or None."""
    return store.get_record(EvaluationRecord,
                            evaluation_key(model_fingerprint, text_fingerprint(text_source), windowing, dtype))

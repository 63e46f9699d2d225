"""Cache keys of stored results, and lookups that answer from the store without loading a model.

Kept free of torch so that a cached answer (for example `rankscope spectra` a second time) costs
only a DuckDB query. Keys hash the model fingerprint (weights and tokenizer, hence BOS handling),
the text fingerprint and the windowing, so changing any of them never returns a stale result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.hashing import sha256_json
from engine.store.duckdb_store import CalibrationRecord, EvaluationRecord, SpectrumRow, Store
from engine.texts.corpus import text_fingerprint
from engine.texts.windows import Windowing

STATISTICS_VERSION = 1  # bump when the definition of a stored calibration statistic changes


def calibration_key(model_fingerprint: str, text_fp: str, windowing: Windowing, n_groups: int) -> str:
    return sha256_json(
        ["calibration", STATISTICS_VERSION, model_fingerprint, text_fp, *windowing.key(), n_groups]
    )[:32]


def evaluation_key(model_fingerprint: str, text_fp: str, windowing: Windowing) -> str:
    return sha256_json(["evaluation", model_fingerprint, text_fp, *windowing.key()])[:32]


@dataclass(frozen=True)
class Spectra:
    weight: list[SpectrumRow]
    feature: list[SpectrumRow]
    covariance: str
    calibration_id: str


def find_calibration(
    store: Store, model_fingerprint: str, text_source: str, windowing: Windowing, n_groups: int
) -> Optional[CalibrationRecord]:
    """The stored calibration for these settings, or None."""
    return store.get_calibration(calibration_key(model_fingerprint, text_fingerprint(text_source), windowing, n_groups))


def stored_spectra(store: Store, model_fingerprint: str, calibration_id: str, covariance: str = "pooled") -> Optional[Spectra]:
    """Spectra already in the store, or None if either kind is missing."""
    weight = store.get_weight_spectra(model_fingerprint)
    feature = store.get_feature_spectra(calibration_id, covariance)
    if not weight or not feature:
        return None
    return Spectra(weight, feature, covariance, calibration_id)


def find_baseline_evaluation(
    store: Store, model_fingerprint: str, text_source: str, windowing: Windowing
) -> Optional[EvaluationRecord]:
    return store.get_evaluation(evaluation_key(model_fingerprint, text_fingerprint(text_source), windowing))

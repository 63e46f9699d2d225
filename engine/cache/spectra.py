"""Weight, feature and activation-weighted spectra of every decoder linear, from the store or computed and stored.

Spectra are rows in the store (one per matrix), not array files: weight spectra are keyed by the
model fingerprint, feature spectra by the calibration and the covariance kind. Activation-weighted
spectra (`σ²` of `W·diag(‖X‖₂)`, LoRAP's Table 1) are feature spectra of the diagonal input
weighting `diag(‖X_j‖₂²)`, so they live in the same table under the covariance name
`ACTIVATION_WEIGHTED`, keyed by the calibration whose norms they use (no table of their own).
"""

from __future__ import annotations

from typing import Optional

from engine.cache.calibration import Calibration
from engine.cache.lookups import Spectra
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback
from engine.records import ACTIVATION_WEIGHTED, SpectrumRow
from engine.spectra import compute_activation_weighted_spectra, compute_feature_spectra, compute_weight_spectra
from engine.store.duckdb_store import Store


def ensure_spectra(
    store: Store,
    loaded: LoadedModel,
    calibration: Calibration,
    covariance: str = "pooled",
    progress: Optional[ProgressCallback] = None,
) -> Spectra:
    """Weight and feature spectra of every decoder linear, from the store or computed and stored."""
    weight = store.get_weight_spectra(loaded.fingerprint)
    if not weight:
        weight = compute_weight_spectra(loaded.linears(), progress)
        store.put_weight_spectra(loaded.fingerprint, weight)
    cid = calibration.record.calibration_id
    feature = store.get_feature_spectra(cid, covariance)
    if not feature:
        feature = compute_feature_spectra(loaded.linears(), calibration.statistics, covariance, progress)
        store.put_feature_spectra(cid, covariance, feature)
    return Spectra(weight, feature, covariance, cid)


def ensure_activation_weighted_spectra(
    store: Store,
    loaded: LoadedModel,
    calibration: Calibration,
    progress: Optional[ProgressCallback] = None,
) -> list[SpectrumRow]:
    """`σ²` of `W·diag(‖X‖₂)` for every decoder linear, from the store or computed (seconds) and stored.

    Torch-free readers ask the store directly: `store.get_feature_spectra(calibration_id, ACTIVATION_WEIGHTED)`."""
    cid = calibration.record.calibration_id
    rows = store.get_feature_spectra(cid, ACTIVATION_WEIGHTED)
    if not rows:
        rows = compute_activation_weighted_spectra(loaded.linears(), calibration.statistics, progress)
        store.put_feature_spectra(cid, ACTIVATION_WEIGHTED, rows)
    return rows

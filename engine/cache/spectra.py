"""Weight, feature and activation-weighted spectra of every decoder linear, from the store or computed and stored.

Spectra are rows in the store (one per matrix), not array files: weight spectra are keyed by the
model fingerprint, feature spectra by the calibration and the covariance kind. Activation-weighted
spectra (`σ²` of `W·diag(‖X‖₂)`, LoRAP's Table 1) are feature spectra of the diagonal input
weighting `diag(‖X_j‖₂²)`, so they live in the same table under the covariance name
`ACTIVATION_WEIGHTED`, keyed by the calibration whose norms they use (no table of their own).

`ensure_all_spectra` is what `rankscope spectra` and the Spectra page run: weight spectra at once (they need no
calibration), then, when the calibration is not stored yet, a `SpectraPreview` of the feature spectra of each
calibration snapshot (shown as "refining: n/N windows", never stored; none for a model calibrated layer by layer,
whose preview says so), and finally the spectra of the full calibration, stored as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from engine.cache.calibration import Calibration, ensure_calibration
from engine.calibration import CalibrationSnapshot, calibrates_by_layer
from engine.cache.lookups import Spectra, find_calibration
from engine.cache.windows import ensure_windows
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback
from engine.records import ACTIVATION_WEIGHTED, SpectrumRow
from engine.spectra import compute_activation_weighted_spectra, compute_feature_spectra, compute_weight_spectra
from engine.store.duckdb_store import Store
from engine.texts.windows import Windowing


def ensure_weight_spectra(store: Store, loaded: LoadedModel, progress: Optional[ProgressCallback] = None
                          ) -> list[SpectrumRow]:
    """Singular values of every decoder linear's weight, from the store or computed and stored (no calibration)."""
    weight = store.get_weight_spectra(loaded.fingerprint)
    if not weight:
        weight = compute_weight_spectra(loaded.linears(), progress)
        if loaded.dtype == "float32":  # keyed by the model only: weights rounded to a half dtype are not stored
            store.put_weight_spectra(loaded.fingerprint, weight)
    return weight


def ensure_spectra(
    store: Store,
    loaded: LoadedModel,
    calibration: Calibration,
    covariance: str = "pooled",
    progress: Optional[ProgressCallback] = None,
    weight: Optional[list[SpectrumRow]] = None,
) -> Spectra:
    """Weight and feature spectra of every decoder linear, from the store or computed and stored (`weight`: the
    weight spectra when the caller has them already)."""
    weight = ensure_weight_spectra(store, loaded, progress) if weight is None else weight
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


@dataclass(frozen=True)
class SpectraPreview:
    """Spectra while the calibration refines: final weight spectra, and the feature and activation-weighted spectra
    of a calibration snapshot over the first `windows_done` of `windows_total` windows (empty before the first
    snapshot, `windows_done` 0). Never stored; `spectra.calibration_id` is empty, since no calibration is yet."""

    spectra: Spectra
    weighted: list[SpectrumRow]
    windows_done: int
    windows_total: int
    by_layer: bool = False  # the calibration goes layer by layer: no snapshot will come

    @property
    def has_features(self) -> bool:
        return bool(self.spectra.feature)

    def describe(self) -> str:
        """`refining: 16/128 windows`, or what is waited for before the first snapshot (or, by layer, the end)."""
        if not self.has_features and self.by_layer:
            return (f"calibrating layer by layer (too large for every layer at once): feature spectra when all "
                    f"{self.windows_total} windows have been through every layer")
        if not self.has_features:
            return f"calibrating: feature spectra after the first windows of {self.windows_total}"
        return f"refining: {self.windows_done}/{self.windows_total} windows"


@dataclass(frozen=True)
class AllSpectra:
    """What the Spectra page and `rankscope spectra` show, for one calibration: stored (or from the store)."""

    spectra: Spectra
    weighted: list[SpectrumRow]  # σ² of W·diag(‖X‖₂), LoRAP's Table 1
    calibration: Calibration


SpectraPreviewCallback = Callable[[SpectraPreview], None]


def snapshot_preview(loaded: LoadedModel, weight: list[SpectrumRow], snapshot: CalibrationSnapshot,
                     covariance: str = "pooled") -> SpectraPreview:
    """The feature and activation-weighted spectra of a calibration snapshot, beside the (final) weight spectra."""
    feature = compute_feature_spectra(loaded.linears(), snapshot.statistics, covariance)
    weighted = compute_activation_weighted_spectra(loaded.linears(), snapshot.statistics)
    return SpectraPreview(Spectra(weight, feature, covariance, ""), weighted, snapshot.windows_done,
                          snapshot.windows_total)


def ensure_all_spectra(
    store: Store,
    loaded: LoadedModel,
    text_source: str,
    windowing: Windowing,
    n_groups: int,
    covariance: str = "pooled",
    progress: Optional[ProgressCallback] = None,
    preview: Optional[SpectraPreviewCallback] = None,
) -> AllSpectra:
    """Weight, feature and activation-weighted spectra of every decoder linear for one calibration, from the store or
    computed and stored, the calibration first if it is not stored.

    `preview`, when the calibration is computed, is called with the weight spectra at once (before any window), then
    with the spectra of each calibration snapshot (`engine.calibration.SNAPSHOT_WINDOWS`). Snapshots are never
    stored: what is stored, and keys every cached result, is the full calibration's, exactly as without previews.
    """
    weight = ensure_weight_spectra(store, loaded, progress)
    on_snapshot = None
    if preview is not None:
        def on_snapshot(snapshot: CalibrationSnapshot) -> None:
            preview(snapshot_preview(loaded, weight, snapshot, covariance))

        if find_calibration(store, loaded.fingerprint, text_source, windowing, n_groups, loaded.dtype) is None:
            n_windows = ensure_windows(store, loaded, text_source, windowing).shape[0]  # kept for the calibration
            preview(SpectraPreview(Spectra(weight, [], covariance, ""), [], 0, n_windows,
                                   by_layer=calibrates_by_layer(loaded.model, loaded.adapter)))
    calibration = ensure_calibration(store, loaded, text_source, windowing, n_groups, progress, on_snapshot)
    spectra = ensure_spectra(store, loaded, calibration, covariance, progress, weight=weight)
    weighted = ensure_activation_weighted_spectra(store, loaded, calibration, progress)
    return AllSpectra(spectra, weighted, calibration)

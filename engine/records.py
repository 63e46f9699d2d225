"""The domain records RankScope stores: plain, immutable dataclasses with no storage driver behind them.

Each cached artifact with a row of its own (a calibration, a baseline evaluation, a factorisation,
a reference distribution) is a record whose first field is its id; `RECORD_TABLES` names the table
each lives in, so the store reads and writes them generically. Modules that compute or display these
(spectra, energy, sweeps, baselines, summaries) import them from here and never touch DuckDB.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    top_k: int  # 0 for 'final-hidden' references
    array_id: str
    perplexity: float
    seconds: float
    kind: str = "final-hidden"  # 'final-hidden' (exact KL) or 'top-k' (written before RankScope 0.2)


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


# The `covariance` under which activation-weighted spectra are stored with the feature spectra: the energies
# σ² of W·diag(‖X‖₂) (LoRAP's AWSVD matrix) are the eigenvalues of W·D²·Wᵀ, D² = diag(Σ x_j²) (engine/spectra.py).
ACTIVATION_WEIGHTED = "activation-weighted"


@dataclass(frozen=True)
class SpectrumRow:
    """Spectrum of one decoder linear: singular values of W, or eigenvalues of W·C·Wᵀ (descending); for
    activation-weighted rows C = diag(‖X_j‖₂²), so the values are σ² of W·diag(‖X‖₂)."""

    layer: int
    linear_type: str
    d_out: int
    d_in: int
    values: list[float]


@dataclass(frozen=True)
class RecoveryRecord:
    """A finished recovery run: the plan it started from, its settings, what it measured; vectors in `array_id`."""

    run_id: str
    model_fingerprint: str
    kind: str
    base_plan_json: str  # the plan the run started from, exactly as given
    settings_json: str
    result_json: str  # before/after metrics, the loss and validation history, the final ranks
    steps: int
    tokens: int
    seconds: float
    peak_rss_bytes: int
    array_id: str


# record type -> the store table that holds it (the record's first field is the table's key)
RECORD_TABLES: dict[type, str] = {
    CalibrationRecord: "calibrations",
    EvaluationRecord: "evaluations",
    FactorizationRecord: "factorizations",
    ReferenceRecord: "reference_distributions",
    RecoveryRecord: "recovery_runs",
}

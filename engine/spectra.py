"""Spectra of decoder linears: singular values of weights, eigenvalues of output covariances.

For a linear `W` (`d_out × d_in`) fed by input covariance `C_X`, the output covariance is
`Cov(WX) = W C_X Wᵀ`, so feature spectra need no new data. Energy is the cumulative share of
`σ²` (weights) or of `λ` (features, already variances); the rank for an energy fraction is the
smallest `r` whose top-r share reaches it (see `engine.energy`). Both spectra keep
`min(d_out, d_in)` values, since `W C_X Wᵀ` has no more non-zero eigenvalues than that.

The activation-weighted spectrum (LoRAP §3.2, the matrix its AWSVD factorises, and the second row
of its Table 1) is that of `W D` with `D = diag(‖X_j‖₂)`, the calibration L2 norm of each input
channel. Its energies `σ_i(W D)²` are the eigenvalues of `(W D)(W D)ᵀ = W D² Wᵀ`: a feature
spectrum whose input "covariance" is the diagonal `D²` (`Σ x_j²` per channel). So it is stored and
read as one, under the covariance name `ACTIVATION_WEIGHTED` (`engine.records`), values `σ²`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from engine.calibration import CalibrationStatistics
from engine.models.adapters import LinearRef
from engine.progress import ProgressCallback, ProgressTracker
from engine.records import SpectrumRow

COVARIANCES: tuple[str, ...] = ("pooled", "sample")


def weight_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a weight in float64, descending."""
    return torch.linalg.svdvals(weight.detach().to(torch.float64))


def feature_eigenvalues(weight: torch.Tensor, input_covariance: torch.Tensor) -> torch.Tensor:
    """Top `min(d_out, d_in)` eigenvalues of `W C Wᵀ`, descending, negatives from rounding set to 0."""
    w = weight.detach().to(torch.float64)  # [d_out, d_in]
    output_covariance = w @ input_covariance @ w.T  # [d_out, d_out]
    values = torch.linalg.eigvalsh(output_covariance).flip(0).clamp_min(0.0)
    return values[: min(w.shape)]


def activation_weighted_energies(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """`σ_i(W·diag(‖X‖₂))²` in float64, descending: the eigenvalues of `W D² Wᵀ`, `min(d_out, d_in)` of them."""
    w = weight.detach().to(torch.float64)  # [d_out, d_in]
    weighted = w * input_norm.detach().to(torch.float64)[None, :]  # W D: column j scaled by ‖X_j‖₂
    return torch.linalg.svdvals(weighted).square()


def compute_weight_spectra(linears: Iterable[LinearRef], progress: Optional[ProgressCallback] = None) -> list[SpectrumRow]:
    refs = list(linears)
    tracker = ProgressTracker(progress, "weight spectra", total=len(refs), unit="matrices")
    rows = []
    for ref in refs:
        d_out, d_in = ref.shape
        rows.append(SpectrumRow(ref.layer, ref.linear_type, d_out, d_in, weight_singular_values(ref.module.weight).tolist()))
        tracker.advance()
    return rows


def compute_feature_spectra(
    linears: Iterable[LinearRef],
    statistics: CalibrationStatistics,
    covariance: str = "pooled",
    progress: Optional[ProgressCallback] = None,
) -> list[SpectrumRow]:
    if covariance not in COVARIANCES:
        raise ValueError(f"Covariance must be one of {', '.join(COVARIANCES)}, got '{covariance}'.")
    refs = list(linears)
    tracker = ProgressTracker(progress, "feature spectra", total=len(refs), unit="matrices")
    rows = []
    for ref in refs:
        site = statistics.site(ref.layer, ref.site)
        c = site.pooled_covariance if covariance == "pooled" else site.covariance
        d_out, d_in = ref.shape
        rows.append(SpectrumRow(ref.layer, ref.linear_type, d_out, d_in, feature_eigenvalues(ref.module.weight, c).tolist()))
        tracker.advance()
    return rows


def compute_activation_weighted_spectra(
    linears: Iterable[LinearRef],
    statistics: CalibrationStatistics,
    progress: Optional[ProgressCallback] = None,
) -> list[SpectrumRow]:
    """Energies `σ²` of `W·diag(‖X‖₂)` for every linear, `‖X‖₂` from the calibration at the linear's input site."""
    refs = list(linears)
    tracker = ProgressTracker(progress, "activation-weighted spectra", total=len(refs), unit="matrices")
    rows = []
    for ref in refs:
        norm = statistics.site(ref.layer, ref.site).l2_norm
        d_out, d_in = ref.shape
        rows.append(SpectrumRow(ref.layer, ref.linear_type, d_out, d_in,
                                activation_weighted_energies(ref.module.weight, norm).tolist()))
        tracker.advance()
    return rows

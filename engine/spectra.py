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

How they are computed: every spectrum is the eigenvalues of a Gram matrix of the smaller side,
`min(d_out, d_in)` square, never an SVD or an eigendecomposition of the larger side (for a
1536×576 MLP weight that is 576 instead of 1536, several times faster):

- weights: `σ²` are the eigenvalues of `WᵀW` (when `d_out ≥ d_in`) or `W Wᵀ`; `σ = √σ²`.
- features: when `d_out ≤ d_in`, `W C Wᵀ` is already the smaller side. Otherwise, with a factor
  `C = L Lᵀ`, the non-zero eigenvalues of `W C Wᵀ = (W L)(W L)ᵀ` are those of `(W L)ᵀ(W L)`
  (`d_in × d_in`). `L = V·diag(√λ)` from `eigh(C)`, which holds for a singular `C` too (a
  Cholesky factor would not); it depends only on the input site, so it is computed once per
  site and shared by the linears that read it (gate and up).
- activation-weighted: the same for `W D`: `D WᵀW D` or `W D² Wᵀ`.

Precision: a Gram matrix squares the condition number, so in float64 an eigenvalue (an energy
`σ²` or `λ`) is exact to about `1e-16 ×` the largest one. Energies far below that come out as
rounding noise (negatives are set to 0), and a weight's tiny `σ` to about `1e-8 × σ_max`. An energy
curve (cumulative shares) cannot see the difference; tests compare energies with an absolute
tolerance relative to the largest (`1e-10 × max`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from engine.calibration import CalibrationStatistics
from engine.models.adapters import LinearRef
from engine.parallel import parallel_map
from engine.progress import ProgressCallback, ProgressTracker
from engine.records import SpectrumRow

COVARIANCES: tuple[str, ...] = ("pooled", "sample")


def _descending_eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix, descending, negatives from rounding set to 0."""
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)


def _smaller_gram(matrix: torch.Tensor) -> torch.Tensor:
    """`MᵀM` or `M Mᵀ`, whichever is `min(m, n)` square: its eigenvalues are the `σ(M)²`."""
    return matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T


def weight_energies(weight: torch.Tensor) -> torch.Tensor:
    """`σ²` of a weight in float64, descending, `min(d_out, d_in)` of them, from the smaller Gram matrix."""
    return _descending_eigenvalues(_smaller_gram(weight.detach().to("cpu", torch.float64)))


def weight_singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a weight in float64, descending (tiny ones only to ~1e-8 × σ_max, see the module doc)."""
    return weight_energies(weight).sqrt()


def covariance_factor(input_covariance: torch.Tensor) -> torch.Tensor:
    """`L` with `L Lᵀ = C` (`d_in × d_in`), from `eigh` so that a singular PSD `C` is fine: `V·diag(√max(λ, 0))`."""
    eigenvalues, eigenvectors = torch.linalg.eigh(input_covariance.to(torch.float64))
    return eigenvectors * eigenvalues.clamp_min(0.0).sqrt()[None, :]


def feature_eigenvalues(weight: torch.Tensor, input_covariance: torch.Tensor,
                        factor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top `min(d_out, d_in)` eigenvalues of `W C Wᵀ`, descending, negatives from rounding set to 0.

    `factor`: `covariance_factor(C)` when the caller has it (it is shared by the linears of a site); only a linear
    wider out than in (`d_out > d_in`) needs it, and computes it when not given."""
    w = weight.detach().to("cpu", torch.float64)  # [d_out, d_in], beside the CPU statistics
    d_out, d_in = w.shape
    if d_out <= d_in:
        return _descending_eigenvalues(w @ input_covariance @ w.T)  # [d_out, d_out]: already the smaller side
    weighted = w @ (covariance_factor(input_covariance) if factor is None else factor)  # W L: (W L)(W L)ᵀ = W C Wᵀ
    return _descending_eigenvalues(weighted.T @ weighted)  # [d_in, d_in]: the same non-zero eigenvalues


def activation_weighted_energies(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """`σ_i(W·diag(‖X‖₂))²` in float64, descending: the eigenvalues of `W D² Wᵀ`, `min(d_out, d_in)` of them."""
    w = weight.detach().to("cpu", torch.float64)  # [d_out, d_in]
    weighted = w * input_norm.detach().to(torch.float64)[None, :]  # W D: column j scaled by ‖X_j‖₂
    return _descending_eigenvalues(_smaller_gram(weighted))


def _rows_over_cores(refs: list[LinearRef], stage: str, progress: Optional[ProgressCallback],
                     rows_of_site: Callable[[list[LinearRef]], list[SpectrumRow]]) -> list[SpectrumRow]:
    """`rows_of_site` for each input site's linears (consecutive in `refs`), the sites spread over the cores
    (`parallel_map`: one LAPACK thread per matrix), rows in the order of `refs`, progress counted in matrices."""
    sites: list[list[LinearRef]] = []
    for ref in refs:
        if sites and (sites[-1][0].layer, sites[-1][0].site) == (ref.layer, ref.site):
            sites[-1].append(ref)
        else:
            sites.append([ref])
    tracker = ProgressTracker(progress, stage, total=len(refs), unit="matrices")
    parts = parallel_map(rows_of_site, sites, on_result=lambda rows: tracker.advance(len(rows)))
    return [row for part in parts for row in part]


def compute_weight_spectra(linears: Iterable[LinearRef], progress: Optional[ProgressCallback] = None) -> list[SpectrumRow]:
    def rows_of_site(site_refs: list[LinearRef]) -> list[SpectrumRow]:
        return [SpectrumRow(ref.layer, ref.linear_type, *ref.shape, weight_singular_values(ref.module.weight).tolist())
                for ref in site_refs]

    return _rows_over_cores(list(linears), "weight spectra", progress, rows_of_site)


def compute_feature_spectra(
    linears: Iterable[LinearRef],
    statistics: CalibrationStatistics,
    covariance: str = "pooled",
    progress: Optional[ProgressCallback] = None,
) -> list[SpectrumRow]:
    """Eigenvalues of `W C Wᵀ` for every linear, `C` the `covariance` of its input site.

    The site's covariance and its factor (`covariance_factor`, for linears with `d_out > d_in`) are computed once per
    input site and shared by the linears that read it; sites run in parallel."""
    if covariance not in COVARIANCES:
        raise ValueError(f"Covariance must be one of {', '.join(COVARIANCES)}, got '{covariance}'.")

    def rows_of_site(site_refs: list[LinearRef]) -> list[SpectrumRow]:
        site = statistics.site(site_refs[0].layer, site_refs[0].site)
        site_covariance = site.pooled_covariance if covariance == "pooled" else site.covariance
        factor = None
        rows = []
        for ref in site_refs:
            d_out, d_in = ref.shape
            if d_out > d_in and factor is None:
                factor = covariance_factor(site_covariance)
            values = feature_eigenvalues(ref.module.weight, site_covariance, factor)
            rows.append(SpectrumRow(ref.layer, ref.linear_type, d_out, d_in, values.tolist()))
        return rows

    return _rows_over_cores(list(linears), "feature spectra", progress, rows_of_site)


def compute_activation_weighted_spectra(
    linears: Iterable[LinearRef],
    statistics: CalibrationStatistics,
    progress: Optional[ProgressCallback] = None,
) -> list[SpectrumRow]:
    """Energies `σ²` of `W·diag(‖X‖₂)` for every linear, `‖X‖₂` from the calibration at the linear's input site."""
    def rows_of_site(site_refs: list[LinearRef]) -> list[SpectrumRow]:
        norm = statistics.site(site_refs[0].layer, site_refs[0].site).l2_norm
        return [SpectrumRow(ref.layer, ref.linear_type, *ref.shape,
                            activation_weighted_energies(ref.module.weight, norm).tolist()) for ref in site_refs]

    return _rows_over_cores(list(linears), "activation-weighted spectra", progress, rows_of_site)

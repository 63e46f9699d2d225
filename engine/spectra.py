"""Spectra of decoder linears: singular values of weights, eigenvalues of output covariances.

For a linear `W` (`d_out × d_in`) fed by input covariance `C_X`, the output covariance is
`Cov(WX) = W C_X Wᵀ`, so feature spectra need no new data. Energy is the cumulative share of
`σ²` (weights) or of `λ` (features, already variances); the rank for an energy fraction is the
smallest `r` whose top-r share reaches it. Both spectra keep `min(d_out, d_in)` values, since
`W C_X Wᵀ` has no more non-zero eigenvalues than that.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from engine.calibration import CalibrationStatistics
from engine.models.adapters import LinearRef
from engine.progress import ProgressCallback, ProgressTracker
from engine.store.duckdb_store import SpectrumRow

ENERGY_LEVELS: tuple[float, ...] = (0.80, 0.90, 0.95, 0.99)
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


def energy_curve(values: Sequence[float], squared: bool) -> torch.Tensor:
    """Cumulative energy share of the top-r values for r = 1..len(values)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    energy = v * v if squared else v
    total = energy.sum()
    return torch.cumsum(energy, 0) / total if total > 0 else torch.ones_like(energy)


def rank_for_energy(values: Sequence[float], fraction: float, squared: bool) -> int:
    """Smallest rank whose top values hold at least `fraction` of the energy."""
    if not 0 < fraction <= 1:
        raise ValueError(f"Energy fraction must be in (0, 1], got {fraction}.")
    curve = energy_curve(values, squared)
    # small tolerance so that fraction = 1.0 is reached despite rounding in the cumulative sum
    return int(torch.searchsorted(curve, torch.tensor(fraction - 1e-12, dtype=torch.float64)).item()) + 1


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


def rank_table(
    weight: Sequence[SpectrumRow], feature: Sequence[SpectrumRow], levels: Sequence[float] = ENERGY_LEVELS
) -> list[dict]:
    """One row per decoder linear: the rank needed for each energy level, for weights and features.

    Example row: `{"layer": 0, "type": "q", "d_out": 576, "d_in": 576, "full_rank": 576,
    "weight_rank": {"0.9": 401, ...}, "feature_rank": {"0.9": 37, ...}}`.
    """
    features = {(row.layer, row.linear_type): row for row in feature}
    table = []
    for row in weight:
        feat = features[(row.layer, row.linear_type)]
        table.append(
            {
                "layer": row.layer,
                "type": row.linear_type,
                "d_out": row.d_out,
                "d_in": row.d_in,
                "full_rank": min(row.d_out, row.d_in),
                "weight_rank": {f"{lv:g}": rank_for_energy(row.values, lv, squared=True) for lv in levels},
                "feature_rank": {f"{lv:g}": rank_for_energy(feat.values, lv, squared=False) for lv in levels},
            }
        )
    return table


def summarise_by_type(table: Sequence[dict], level: float) -> list[dict]:
    """Mean over layers of the rank share (rank / full rank) needed for `level`, per linear type."""
    key = f"{level:g}"
    by_type: dict[str, list[dict]] = {}
    for row in table:
        by_type.setdefault(row["type"], []).append(row)
    summary = []
    for linear_type, rows in by_type.items():
        summary.append(
            {
                "type": linear_type,
                "full_rank": rows[0]["full_rank"],
                "weight_rank_share": sum(r["weight_rank"][key] / r["full_rank"] for r in rows) / len(rows),
                "feature_rank_share": sum(r["feature_rank"][key] / r["full_rank"] for r in rows) / len(rows),
            }
        )
    return summary

"""Energy of spectra and the rank needed to keep a share of it (numpy only, no torch).

For weights the energy of a direction is `σ²` (singular values); for features it is `λ` (output
covariance eigenvalues are already variances). The rank for an energy fraction is the smallest `r`
whose top-r values hold at least that share of the total.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from engine.records import SpectrumRow

ENERGY_LEVELS: tuple[float, ...] = (0.80, 0.90, 0.95, 0.99)


def energy_curve(values: Sequence[float], squared: bool) -> np.ndarray:
    """Cumulative energy share of the top-r values for r = 1..len(values)."""
    v = np.asarray(values, dtype=np.float64)
    energy = v * v if squared else v
    total = energy.sum()
    return np.cumsum(energy) / total if total > 0 else np.ones_like(energy)


def rank_for_energy(values: Sequence[float], fraction: float, squared: bool) -> int:
    """Smallest rank whose top values hold at least `fraction` of the energy."""
    if not 0 < fraction <= 1:
        raise ValueError(f"Energy fraction must be in (0, 1], got {fraction}.")
    curve = energy_curve(values, squared)
    # a small tolerance so that fraction = 1.0 is reached despite rounding in the cumulative sum
    return min(len(curve), int(np.searchsorted(curve, fraction - 1e-12)) + 1)


def rank_table(
    weight: Sequence[SpectrumRow], feature: Sequence[SpectrumRow], levels: Sequence[float] = ENERGY_LEVELS
) -> list[dict]:
    """One row per decoder linear: the rank needed for each energy level, for weights and features.

    Example row: `{"layer": 0, "type": "q", "d_out": 576, "d_in": 576, "full_rank": 576,
    "weight_rank": {"0.9": 68, ...}, "feature_rank": {"0.9": 8, ...}}`.
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
    return [
        {
            "type": linear_type,
            "full_rank": rows[0]["full_rank"],
            "weight_rank_share": sum(r["weight_rank"][key] / r["full_rank"] for r in rows) / len(rows),
            "feature_rank_share": sum(r["feature_rank"][key] / r["full_rank"] for r in rows) / len(rows),
        }
        for linear_type, rows in by_type.items()
    ]

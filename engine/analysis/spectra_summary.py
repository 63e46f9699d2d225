"""Spectra shaped for plots: the energy curves of one matrix, and layer × type grids of rank shares.

Weights and features are put on one axis, the *rank share* `r / min(d_out, d_in)`, so a weight
curve (energy `σ²`) and a feature curve (energy `λ`, an output-covariance eigenvalue) of the same
matrix can be compared directly: a curve that reaches 90% energy at a small share is low-rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from engine.energy import energy_curve
from engine.errors import RankScopeError
from engine.records import SpectrumRow

SpectrumKind = Literal["weight", "feature"]
KIND_LABELS: dict[str, str] = {"weight": "weights (σ² of W)", "feature": "features (λ of W·C·Wᵀ)"}


def find_spectrum(rows: Sequence[SpectrumRow], layer: int, linear_type: str) -> SpectrumRow:
    """The spectrum of one matrix; a `RankScopeError` naming what exists when it is absent."""
    for row in rows:
        if row.layer == layer and row.linear_type == linear_type:
            return row
    raise RankScopeError(f"No spectrum for layer {layer}, type '{linear_type}'; layers 0-{max(r.layer for r in rows)} "
                         f"and types {', '.join(dict.fromkeys(r.linear_type for r in rows))} are stored.")


def energy_curve_rows(weight: SpectrumRow, feature: SpectrumRow) -> list[dict]:
    """Cumulative energy against rank and rank share, for the weights and the features of one matrix.

    Example row: `{"kind": "weights (σ² of W)", "rank": 3, "rank_share": 0.1, "energy": 0.42}`.
    """
    rows = []
    for kind, spectrum, squared in (("weight", weight, True), ("feature", feature, False)):
        full_rank = min(spectrum.d_out, spectrum.d_in)
        curve = energy_curve(spectrum.values[:full_rank], squared)
        rows += [{"kind": KIND_LABELS[kind], "rank": r + 1, "rank_share": (r + 1) / full_rank, "energy": float(e)}
                 for r, e in enumerate(curve)]
    return rows


@dataclass(frozen=True)
class LayerTypeGrid:
    """Values on a layer × type grid (None where nothing is stored), for a heatmap."""

    layers: list[int]
    types: list[str]
    values: list[list[Optional[float]]]  # [layer][type]
    ranks: Optional[list[list[Optional[int]]]] = None  # the ranks behind rank shares, for hover text


def rank_share_grid(table: Sequence[dict], level: float, kind: SpectrumKind) -> LayerTypeGrid:
    """Rank share needed for `level` energy per (layer, type), from `engine.energy.rank_table` rows."""
    key = f"{level:g}"
    column = f"{kind}_rank"
    layers = sorted({row["layer"] for row in table})
    types = list(dict.fromkeys(row["type"] for row in table))
    cells = {(row["layer"], row["type"]): row for row in table}
    shares, ranks = [], []
    for layer in layers:
        share_row, rank_row = [], []
        for linear_type in types:
            row = cells.get((layer, linear_type))
            if row is None or key not in row[column]:
                share_row.append(None)
                rank_row.append(None)
            else:
                share_row.append(row[column][key] / row["full_rank"])
                rank_row.append(row[column][key])
        shares.append(share_row)
        ranks.append(rank_row)
    return LayerTypeGrid(layers, types, shares, ranks)

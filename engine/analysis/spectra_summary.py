"""Spectra shaped for plots: the energy curves of one matrix, and layer × type grids of rank shares.

Weights and features are put on one axis, the *rank share* `r / min(d_out, d_in)`, so a weight
curve (energy `σ²`) and a feature curve (energy `λ`, an output-covariance eigenvalue) of the same
matrix can be compared directly: a curve that reaches 90% energy at a small share is low-rank.

LoRAP's Table 1 ("the ratio of singular values when 80% energy is retained") is the same share at
one level, per type, for the weight `W` and for the activation-weighted `W·diag(‖X‖₂)` that its
AWSVD factorises: `lorap_table_rows` (per matrix) and `lorap_table` (per type, over layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from engine.energy import energy_curve, rank_for_energy
from engine.errors import RankScopeError
from engine.records import SpectrumRow

SpectrumKind = Literal["weight", "feature"]
LORAP_LEVEL = 0.8  # LoRAP's Table 1 keeps 80% of the energy
SUBLAYERS: dict[str, str] = {"q": "attention", "k": "attention", "v": "attention", "o": "attention",
                             "gate": "MLP", "up": "MLP", "down": "MLP"}
KIND_LABELS: dict[str, str] = {"weight": "weights (σ² of W)", "feature": "features (λ of W·C·Wᵀ)"}


def find_spectrum(rows: Sequence[SpectrumRow], layer: int, linear_type: str) -> SpectrumRow:
    """The spectrum of one matrix; a `RankScopeError` naming what exists when it is absent."""
    for row in rows:
        if row.layer == layer and row.linear_type == linear_type:
            return row
    raise RankScopeError(f"No spectrum for layer {layer}, type '{linear_type}'; layers 0-{max(r.layer for r in rows)} "
                         f"and types {', '.join(dict.fromkeys(r.linear_type for r in rows))} are stored.")


def weight_summary_by_type(weight: Sequence[SpectrumRow], level: float) -> list[dict]:
    """Mean over layers of the weights' rank share for `level` energy, per type: what needs no calibration.

    Example row: `{"type": "q", "full_rank": 576, "weight_rank_share": 0.34}`, types in `weight`'s order."""
    by_type: dict[str, list[float]] = {}
    full_ranks: dict[str, int] = {}
    for row in weight:
        full_rank = full_ranks.setdefault(row.linear_type, min(row.d_out, row.d_in))
        by_type.setdefault(row.linear_type, []).append(
            rank_for_energy(row.values[:full_rank], level, squared=True) / full_rank)
    return [{"type": t, "full_rank": full_ranks[t], "weight_rank_share": sum(v) / len(v)} for t, v in by_type.items()]


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


def lorap_table_rows(weight: Sequence[SpectrumRow], weighted: Sequence[SpectrumRow], level: float = LORAP_LEVEL
                     ) -> list[dict]:
    """Per matrix, the share of singular values holding `level` of the energy, of `W` and of `W·diag(‖X‖₂)`.

    `weight` rows hold σ of W (energy σ²); `weighted` rows hold σ² of W·diag(‖X‖₂) (stored as eigenvalues, see
    `engine.spectra`). Example row: `{"layer": 0, "type": "q", "sublayer": "attention", "full_rank": 576,
    "weight_rank": 230, "weighted_rank": 120, "weight_share": 0.40, "weighted_share": 0.21}`, in `weight`'s order.
    """
    by_key = {(row.layer, row.linear_type): row for row in weighted}
    rows = []
    for row in weight:
        other = by_key.get((row.layer, row.linear_type))
        if other is None:
            raise RankScopeError(f"No activation-weighted spectrum for layer {row.layer}, type '{row.linear_type}'; "
                                 "compute the activation-weighted spectra of this calibration again.")
        full_rank = min(row.d_out, row.d_in)
        weight_rank = rank_for_energy(row.values[:full_rank], level, squared=True)
        weighted_rank = rank_for_energy(other.values[:full_rank], level, squared=False)
        rows.append({"layer": row.layer, "type": row.linear_type, "sublayer": SUBLAYERS.get(row.linear_type, ""),
                     "full_rank": full_rank, "weight_rank": weight_rank, "weighted_rank": weighted_rank,
                     "weight_share": weight_rank / full_rank, "weighted_share": weighted_rank / full_rank})
    return rows


def lorap_table(weight: Sequence[SpectrumRow], weighted: Sequence[SpectrumRow], level: float = LORAP_LEVEL,
                layer: Optional[int] = None) -> list[dict]:
    """LoRAP's Table 1: per type (canonical order), the share of singular values holding `level` of the energy for
    `W` and for `W·diag(‖X‖₂)`, averaged over layers (or of one `layer`).

    Example row: `{"type": "q", "sublayer": "attention", "layers": 30, "weight_share": 0.41,
    "weighted_share": 0.22}`.
    """
    rows = lorap_table_rows(weight, weighted, level)
    if layer is not None:
        rows = [row for row in rows if row["layer"] == layer]
        if not rows:
            raise RankScopeError(f"No spectra for layer {layer}; layers 0-{max(r.layer for r in weight)} are stored.")
    by_type: dict[str, list[dict]] = {}
    for row in rows:
        by_type.setdefault(row["type"], []).append(row)
    return [{"type": linear_type, "sublayer": group[0]["sublayer"], "layers": len(group),
             "weight_share": sum(r["weight_share"] for r in group) / len(group),
             "weighted_share": sum(r["weighted_share"] for r in group) / len(group)}
            for linear_type, group in by_type.items()]

"""Sensitivity points shaped for plots: per-type curves against ratio, and a layer × type grid.

Points come from `Store.sensitivity_points(sweep_id)`; `layer == -1` marks a per-type point (the
type compressed in every layer), any other layer a per-layer point (that layer alone). MLP sweeps
(`engine.compression.sweep.sweep_mlp_by_type`/`_by_layer`, their own sweep id) label their points
`mlp-prune` or `mlp-lowrank`: `mlp_curve_rows` and `mlp_layer_rows` shape those.
"""

from __future__ import annotations

from typing import Sequence

from engine.analysis import METRIC_LABELS
from engine.analysis.spectra_summary import LayerTypeGrid
from engine.compression.sweep import MLP_LOW_RANK, MLP_PRUNE
from engine.compression.units import ModelShapes
from engine.errors import RankScopeError
from engine.records import SensitivityPoint

ALL_LAYERS = -1
MLP_FORM_LABELS: dict[str, str] = {MLP_PRUNE: "pruned channels (LoRAP)", MLP_LOW_RANK: "low rank"}


def sweep_unit_labels(shapes: ModelShapes, method: str) -> list[str]:
    """The types a sweep can compress for `method`, in canonical order (`q+k` for joint pairs)."""
    return list(dict.fromkeys("+".join(unit.types) for unit in shapes.units(method)))


def type_curve_rows(points: Sequence[SensitivityPoint]) -> list[dict]:
    """One row per per-type point, sorted by type order of appearance then ratio."""
    rows = [{"type": p.linear_type, "ratio": p.ratio, "perplexity": p.perplexity, "kl_forward": p.kl_forward,
             "kl_reverse": p.kl_reverse, "decoder_params": p.decoder_params} for p in points if p.layer == ALL_LAYERS]
    return sorted(rows, key=lambda row: (row["type"], row["ratio"]))


def layer_sweep_ratios(points: Sequence[SensitivityPoint]) -> list[float]:
    """The ratios at which per-layer points are stored."""
    return sorted({round(p.ratio, 6) for p in points if p.layer != ALL_LAYERS})


def layer_grid(points: Sequence[SensitivityPoint], ratio: float, metric: str, types: Sequence[str],
               num_layers: int) -> LayerTypeGrid:
    """`metric` of each per-layer point at `ratio` on a layer × type grid (None where not measured)."""
    if metric not in METRIC_LABELS:
        raise RankScopeError(f"Unknown metric '{metric}'; metrics: {', '.join(METRIC_LABELS)}.")
    cells = {(p.layer, p.linear_type): getattr(p, metric) for p in points
             if p.layer != ALL_LAYERS and round(p.ratio, 6) == round(ratio, 6)}
    layers = list(range(num_layers))
    return LayerTypeGrid(layers, list(types), [[cells.get((layer, t)) for t in types] for layer in layers])


def mlp_curve_rows(points: Sequence[SensitivityPoint], method: str = "") -> list[dict]:
    """One row per every-layer MLP point, by form then ratio; `form` is a readable label (the method named)."""
    rows = []
    for p in points:
        if p.layer != ALL_LAYERS or p.linear_type not in MLP_FORM_LABELS:
            continue
        label = MLP_FORM_LABELS[p.linear_type]
        if p.linear_type == MLP_LOW_RANK and method:
            label = f"{label} ({method})"
        rows.append({"form": label, "ratio": p.ratio, "perplexity": p.perplexity, "kl_forward": p.kl_forward,
                     "kl_reverse": p.kl_reverse, "decoder_params": p.decoder_params})
    return sorted(rows, key=lambda row: (row["form"], row["ratio"]))


def mlp_layer_ratios(points: Sequence[SensitivityPoint], form: str = MLP_PRUNE) -> list[float]:
    """The ratios at which per-layer MLP points of `form` are stored."""
    return sorted({round(p.ratio, 6) for p in points if p.layer != ALL_LAYERS and p.linear_type == form})


def mlp_layer_rows(points: Sequence[SensitivityPoint], ratio: float, form: str = MLP_PRUNE) -> list[dict]:
    """Per-layer MLP points of `form` at `ratio`, by layer."""
    rows = [{"layer": p.layer, "perplexity": p.perplexity, "kl_forward": p.kl_forward, "kl_reverse": p.kl_reverse,
             "decoder_params": p.decoder_params} for p in points
            if p.layer != ALL_LAYERS and p.linear_type == form and round(p.ratio, 6) == round(ratio, 6)]
    return sorted(rows, key=lambda row: row["layer"])

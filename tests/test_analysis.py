"""Display views of engine results (`engine.analysis`): spectra grids, sweep curves, rank tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.analysis import METRIC_LABELS
from engine.analysis.allocation import budget_meter_rows, plan_summary, ranks_from_unit_ranks, unit_rank_rows
from engine.analysis.sensitivity_summary import layer_grid, layer_sweep_ratios, sweep_unit_labels, type_curve_rows
from engine.analysis.spectra_summary import KIND_LABELS, energy_curve_rows, find_spectrum, rank_share_grid
from engine.compression.plan import PlanError, RankPlan
from engine.compression.units import LinearShape, ModelShapes, count_parameters
from engine.energy import rank_table
from engine.errors import RankScopeError
from engine.store.duckdb_store import SensitivityPoint, SpectrumRow


def _shapes() -> ModelShapes:
    """Two layers of a small llama-like model: q/o 8x8, k/v 4x8, gate/up 12x8, down 8x12."""
    dims = {"q": (8, 8), "k": (4, 8), "v": (4, 8), "o": (8, 8), "gate": (12, 8), "up": (12, 8), "down": (8, 12)}
    linears = tuple(LinearShape(f"layers.{layer}.{t}", layer, t, *dims[t]) for layer in range(2) for t in dims)
    decoder = sum(s.d_in * s.d_out for s in linears)
    return ModelShapes("toy", "f" * 64, "llama", 2, linears, decoder + 1000)


# -- spectra ------------------------------------------------------------------------------------------


def _spectra():
    weight = [SpectrumRow(layer, t, 4, 4, [4.0, 3.0, 2.0, 1.0]) for layer in range(2) for t in ("q", "down")]
    feature = [SpectrumRow(layer, t, 4, 4, [97.0, 1.0, 1.0, 1.0]) for layer in range(2) for t in ("q", "down")]
    return weight, feature


def test_energy_curve_rows_put_weights_and_features_on_the_rank_share_axis():
    weight, feature = _spectra()
    rows = energy_curve_rows(weight[0], feature[0])
    weights = [r for r in rows if r["kind"] == KIND_LABELS["weight"]]
    features = [r for r in rows if r["kind"] == KIND_LABELS["feature"]]
    assert [r["rank_share"] for r in weights] == [0.25, 0.5, 0.75, 1.0]
    # weights: energy σ², 16/30 after one direction; features: energy λ, 97/100
    assert weights[0]["energy"] == pytest.approx(16 / 30) and features[0]["energy"] == pytest.approx(0.97)
    assert weights[-1]["energy"] == pytest.approx(1.0) and features[-1]["energy"] == pytest.approx(1.0)


def test_rank_share_grid_follows_rank_table():
    weight, feature = _spectra()
    table = rank_table(weight, feature)
    grid = rank_share_grid(table, 0.9, "weight")
    assert grid.layers == [0, 1] and grid.types == ["q", "down"]
    # σ² = 16, 9, 4, 1 of 30: 90% needs 3 directions (29/30), i.e. 3 of 4
    assert grid.values == [[0.75, 0.75], [0.75, 0.75]] and grid.ranks == [[3, 3], [3, 3]]
    assert rank_share_grid(table, 0.9, "feature").values == [[0.25, 0.25], [0.25, 0.25]]


def test_find_spectrum_names_what_is_stored():
    weight, _ = _spectra()
    assert find_spectrum(weight, 1, "down").layer == 1
    with pytest.raises(RankScopeError, match="layers 0-1 and types q, down"):
        find_spectrum(weight, 5, "q")


# -- sensitivity ----------------------------------------------------------------------------------------


def _point(label, layer, ratio, ppl):
    return SensitivityPoint("s", label, layer, ratio, 100, ppl, ppl / 100, ppl / 200, 0.1)


def test_type_curves_and_layer_grid_split_the_points_by_kind():
    points = [_point("q", -1, 0.5, 12.0), _point("q", -1, 0.2, 11.0), _point("down", -1, 0.2, 15.0),
              _point("q", 0, 0.5, 10.5), _point("down", 1, 0.5, 13.0), _point("q", 1, 0.3, 10.1)]
    curves = type_curve_rows(points)
    assert [(r["type"], r["ratio"]) for r in curves] == [("down", 0.2), ("q", 0.2), ("q", 0.5)]
    assert layer_sweep_ratios(points) == [0.3, 0.5]
    grid = layer_grid(points, 0.5, "perplexity", ["q", "down"], num_layers=3)
    assert grid.layers == [0, 1, 2]
    assert grid.values == [[10.5, None], [None, 13.0], [None, None]]
    assert layer_grid(points, 0.5, "kl_reverse", ["q"], 2).values == [[10.5 / 200], [None]]
    with pytest.raises(RankScopeError, match="Unknown metric"):
        layer_grid(points, 0.5, "accuracy", ["q"], 2)


def test_sweep_unit_labels_pair_joint_types():
    shapes = _shapes()
    assert sweep_unit_labels(shapes, "svd") == ["q", "k", "v", "o", "gate", "up", "down"]
    assert sweep_unit_labels(shapes, "joint-svd") == ["q+k", "v", "o", "gate+up", "down"]


def test_metric_labels_name_both_kl_directions_exactly():
    assert METRIC_LABELS == {"perplexity": "Perplexity", "kl_forward": "KL(P_orig‖P_comp)",
                             "kl_reverse": "KL(P_comp‖P_orig)"}


# -- allocation ---------------------------------------------------------------------------------------------


def test_unit_rank_rows_round_trip_through_edited_ranks():
    shapes = _shapes()
    ranks = {"layers.0.q": 2, "layers.1.down": 4}
    rows = unit_rank_rows(shapes, "svd", ranks)
    assert len(rows) == 14 and rows[0] == {"module": "layers.0.q", "layer": 0, "type": "q", "shape": "8×8",
                                           "max_rank": 8, "rank": 2, "parameters": 32, "dense_parameters": 64}
    edited = [row["rank"] for row in rows]
    assert ranks_from_unit_ranks(shapes, "svd", edited) == {s.path: ranks.get(s.path) for s in shapes.linears}
    edited[1] = float("nan")  # a cleared cell
    edited[2] = 3.0
    assert ranks_from_unit_ranks(shapes, "svd", edited)["layers.0.v"] == 3
    with pytest.raises(PlanError, match="not a whole number"):
        ranks_from_unit_ranks(shapes, "svd", [2.5] + edited[1:])
    with pytest.raises(PlanError, match="one rank for each of the 14 units"):
        ranks_from_unit_ranks(shapes, "svd", edited[:3])


def test_joint_units_share_one_row_and_one_rank():
    shapes = _shapes()
    rows = unit_rank_rows(shapes, "joint-svd", {})
    assert rows[0]["module"] == "layers.0.q + layers.0.k" and rows[0]["shape"] == "12×8"
    ranks = ranks_from_unit_ranks(shapes, "joint-svd", [4] + [None] * (len(rows) - 1))
    assert ranks["layers.0.q"] == ranks["layers.0.k"] == 4


def test_plan_summary_and_budget_meter_report_both_ways():
    shapes = _shapes()
    ranks = {"layers.0.gate": 2, "layers.0.up": 2}
    plan = RankPlan.build(shapes, "svd", ranks, grouping={"kind": "5xG", "layer_blocks": 2, "edited_units": 1})
    counts = count_parameters(shapes, "svd", ranks)
    row = plan_summary("mine", plan.with_metrics({"perplexity": 12.5, "kl_forward": 0.1, "kl_reverse": 0.2, "tokens": 9}))
    assert row["grouping"] == "5x2 (edited)" and row["decoder_params"] == counts.decoder_compressed
    assert row["decoder_reduction"] == pytest.approx(counts.decoder_reduction, abs=1e-6)
    assert row["perplexity"] == 12.5 and row["kl_reverse"] == 0.2
    assert plan_summary("raw", plan)["perplexity"] is None
    meter = {(r["scope"], r["part"]): r["parameters"] for r in budget_meter_rows(counts)}
    removed = 2 * (96 - 2 * 20)  # two 12x8 matrices: 96 dense, 2*(12+8) = 40 at rank 2
    assert meter[("decoder linears", "removed")] == meter[("whole model", "removed")] == removed
    assert meter[("whole model", "kept")] == shapes.total_params - removed
    assert math.isclose(meter[("decoder linears", "kept")] / shapes.decoder_linear_params, 1 - counts.decoder_reduction)
    assert np.isfinite(list(meter.values())).all()

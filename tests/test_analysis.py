"""Display views of engine results (`engine.analysis`): spectra grids, sweep curves, rank tables."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from engine.analysis import METRIC_LABELS
from engine.analysis.allocation import budget_meter_rows, plan_summary, ranks_from_unit_ranks, unit_rank_rows
from engine.analysis.export_summary import check_rows, export_overview, export_rows, quality_rows, size_speed_rows
from engine.analysis.search_summary import (
    INTERRUPTED, achieved_ratios, baseline_marks, best_so_far_rows, full_text_rows, study_rows, study_state,
    trial_rows,
)
from engine.compression.grouping import Grouping
from engine.search.summary import trial_plan_grouping
from engine.analysis.sensitivity_summary import layer_grid, layer_sweep_ratios, sweep_unit_labels, type_curve_rows
from engine.analysis.spectra_summary import KIND_LABELS, energy_curve_rows, find_spectrum, rank_share_grid
from engine.compression.plan import PlanError, RankPlan
from engine.compression.units import LinearShape, ModelShapes, count_parameters
from engine.energy import rank_table
from engine.errors import RankScopeError
from engine.search.records import StudyRecord, StudyState, TrialKind, TrialRecord
from engine.records import SensitivityPoint, SpectrumRow


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
                                           "max_rank": 4, "rank": 2, "parameters": 32, "dense_parameters": 64}
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


# -- search ---------------------------------------------------------------------------------------------------


def _trial(number, kind, objective, label=None, ranks=None, perplexity=None):
    return TrialRecord("s", number, kind, label or f"trial {number}", {}, {"qk": 0.1}, ranks or {}, objective,
                       perplexity or 10.0 + number, 0.01 * number, 0.02 * number, 1000 - number, 5000 - number, 0.5)


def _study_trials():
    return [_trial(0, TrialKind.BASELINE, 2.0, "uniform"), _trial(1, TrialKind.WARM_START, 2.5, "warm start"),
            _trial(2, TrialKind.SEARCH, 3.0), _trial(3, TrialKind.SEARCH, math.inf), _trial(4, TrialKind.SEARCH, 1.5),
            _trial(5, TrialKind.BASELINE, 1.8, "lord")]


def test_best_so_far_follows_the_told_trials_and_skips_non_finite_objectives():
    rows = best_so_far_rows(list(reversed(_study_trials())))  # any order in, run order out
    assert [r["trial"] for r in rows] == [1, 2, 3, 4] and [r["number"] for r in rows] == [1, 2, 3, 4]
    assert [r["objective"] for r in rows] == [2.5, 3.0, None, 1.5]
    assert [r["best_so_far"] for r in rows] == [2.5, 2.5, 2.5, 1.5]
    assert [r["kind"] for r in rows] == ["warm start", "search", "search", "search"]


def test_trial_rows_list_baselines_without_a_best_so_far_and_add_group_columns():
    trials = _study_trials()
    rows = trial_rows(trials, {0: {"qk": 0.2, "o": 0.0}, 4: {"qk": 0.5, "o": 0.1}})
    assert [r["label"] for r in rows] == ["uniform", "warm start", "trial 2", "trial 3", "trial 4", "lord"]
    assert rows[0]["kind"] == "baseline" and rows[0]["best_so_far"] is None and rows[0]["qk"] == 0.2
    assert rows[3]["objective"] is None and rows[3]["best_so_far"] == 2.5
    assert rows[4] | {"seconds": None} == {
        "number": 4, "label": "trial 4", "kind": "search", "objective": 1.5, "best_so_far": 1.5, "perplexity": 14.0,
        "kl_forward": 0.04, "kl_reverse": 0.08, "decoder_params": 996, "total_params": 4996, "seconds": None,
        "qk": 0.5, "o": 0.1}
    assert "qk" not in trial_rows(trials)[0]


def test_achieved_ratios_measure_every_trial_on_the_study_groups():
    shapes = _shapes()
    qk_rank2 = {f"layers.{layer}.{t}": 2 for layer in range(2) for t in ("q", "k")}
    ratios = achieved_ratios([_trial(0, TrialKind.BASELINE, 1.0, ranks=qk_rank2)], shapes, "svd", Grouping("5x1"))
    # q 8x8 at rank 2: 32 of 64 kept; k 4x8 at rank 2: 24 of 32 kept; two layers
    assert ratios[0]["qk"] == pytest.approx(1 - (32 + 24) / (64 + 32))
    assert ratios[0]["o"] == ratios[0]["down"] == 0.0 and "v" not in ratios[0]


def test_baseline_marks_name_identical_baselines_once():
    twin = replace(_trial(6, TrialKind.BASELINE, 2.0, "lord", perplexity=10.0), decoder_params=1000)  # as trial 0
    trials = [_trial(0, TrialKind.BASELINE, 2.0, "uniform", perplexity=10.0), _trial(3, TrialKind.SEARCH, 1.0),
              _trial(5, TrialKind.BASELINE, math.inf, "greedy"), twin]
    assert baseline_marks(trials) == [{"objective": 2.0, "perplexity": 10.0, "decoder_params": 1000,
                                       "label": "uniform = lord"}]
    assert [m["label"] for m in baseline_marks(_study_trials())] == ["uniform", "lord"]


def test_full_text_rows_put_the_best_first_and_compare_with_it():
    results = {"lord": {"trial": 5, "perplexity": 12.0, "kl_forward": 0.2, "kl_reverse": 0.3, "tokens": 9},
               "best": {"trial": 4, "perplexity": 10.0, "kl_forward": 0.1, "kl_reverse": 0.15, "tokens": 9,
                        "decoder_params": 996, "total_params": 4996},
               "uniform": {"trial": 0, "perplexity": 11.0, "kl_forward": 0.2, "kl_reverse": 0.2, "tokens": 9}}
    rows = full_text_rows(results, _study_trials())
    assert [r["plan"] for r in rows] == ["best", "uniform", "lord"]
    assert [r["perplexity_vs_best"] for r in rows] == pytest.approx([0.0, 0.1, 0.2])
    assert rows[0]["decoder_params"] == 996 and rows[1]["decoder_params"] is None
    assert full_text_rows({}, _study_trials()) == []


def test_study_state_and_rows_call_an_orphaned_running_study_interrupted():
    record = StudyRecord("s", "s", "f" * 64, {}, StudyState.RUNNING)
    assert study_state(record, running_here=True) == "running"
    assert study_state(record, running_here=False) == INTERRUPTED
    stopped = StudyRecord("s", "s", "f" * 64, {}, StudyState.STOPPED)
    assert study_state(stopped, running_here=False) == "stopped"
    summary = {"study_id": "a", "state": "running", "settings": {"method": "svd", "grouping": "5x1", "budget": 0.2},
               "trials_done": 3, "trials_planned": 4, "best": {"objective": 2.25},
               "full_text": {"best": {"perplexity": 11.5}}}
    assert study_rows([summary], set()) == [{"study": "a", "state": INTERRUPTED, "method": "svd", "grouping": "5x1",
                                             "budget": 0.2, "trials": "3/4", "best_objective": 2.25,
                                             "best_perplexity": 11.5}]
    assert study_rows([summary | {"best": None, "full_text": {}}], {"a"})[0] | {"study": None} == {
        "study": None, "state": "running", "method": "svd", "grouping": "5x1", "budget": 0.2, "trials": "3/4",
        "best_objective": None, "best_perplexity": None}


def test_trial_plan_grouping_names_the_study_grouping_values_and_budget():
    trial = _trial(4, TrialKind.SEARCH, 1.5)
    assert trial_plan_grouping({"grouping": "5x2", "search_v": True, "budget": 0.3}, trial) == {
        "kind": "5xG", "layer_blocks": 2, "search_v": True, "values": {"qk": 0.1}, "budget": 0.3}


# -- export -----------------------------------------------------------------------------------------------------


def _report(passed=True, original_bytes=4 * 2 ** 20, storage="low-rank", out_dir="/x/e"):
    quality = {"perplexity": 10.0, "kl_forward": 0.0, "kl_reverse": 0.0, "tokens": 62}
    return {
        "out_dir": out_dir, "storage": storage, "method": "svd", "model_id": "toy", "files": {},
        "weights_bytes": 3 * 2 ** 20, "original_weights_bytes": original_bytes,
        "parameters": {"decoder_linear": {"dense": 1000, "compressed": 800, "reduction": 0.2},
                       "total": {"dense": 5000, "compressed": 4800, "reduction": 0.04}, "reloaded": 4816},
        "quality": {"original": quality, "compressed": {**quality, "perplexity": 11.0, "kl_forward": 0.1,
                                                        "kl_reverse": 0.12},
                    "reloaded": {**quality, "perplexity": 11.00001, "kl_forward": 0.1, "kl_reverse": 0.12}},
        "evaluation": {"text": "t", "n_windows": 2, "window_len": 32},
        "speed": {"original": {"tokens_per_second": 50.0}, "compressed": {"tokens_per_second": 60.0}},
        "generation": {"prompt": "p", "original": "a", "compressed": "b", "new_tokens": 8, "matching_tokens": 3},
        "checks": [{"name": "logits via load_compressed", "passed": True, "detail": "max abs diff 1e-7"},
                   {"name": "perplexity re-evaluated after reload", "passed": passed, "detail": "..."}],
        "passed": passed,
    }


def test_export_overview_reads_sizes_quality_speed_and_checks():
    overview = export_overview(_report())
    assert overview["size_ratio"] == pytest.approx(0.75) and overview["speedup"] == pytest.approx(1.2)
    assert overview["perplexity"] == 11.00001 and overview["original_perplexity"] == 10.0
    assert (overview["kl_forward"], overview["kl_reverse"]) == (0.1, 0.12)
    assert (overview["decoder_compressed"], overview["total_compressed"], overview["reloaded_parameters"]) == \
        (800, 4800, 4816)
    assert overview["passed"] and (overview["checks_passed"], overview["checks_total"]) == (2, 2)
    failed = export_overview(_report(passed=False, original_bytes=None))
    assert not failed["passed"] and failed["checks_passed"] == 1 and failed["size_ratio"] is None


def test_export_rows_for_tables_and_charts():
    report = _report()
    assert [r["model"] for r in quality_rows(report)] == ["original", "compressed (in memory)",
                                                          "reloaded from the directory"]
    assert quality_rows(report)[1]["kl_reverse"] == 0.12
    sizes = {(r["measure"], r["model"]): r["value"] for r in size_speed_rows(report)}
    assert sizes[("weights file (MiB)", "original")] == 4.0 and sizes[("weights file (MiB)", "compressed")] == 3.0
    assert sizes[("tokens/s (batch 1, greedy)", "compressed")] == 60.0
    assert len(size_speed_rows(_report(original_bytes=None))) == 3
    assert [r["result"] for r in check_rows(_report(passed=False))] == ["passed", "FAILED"]
    entries = [{"export_id": "old", "path": "/x/e", "created_at": "2025-01-01 10:00", "report": _report()},
               {"export_id": "new", "path": "/x/e", "created_at": "2025-01-02 10:00", "report": _report(passed=False)},
               {"export_id": "dense", "path": "/x/d", "created_at": "2025-01-01 12:00",
                "report": _report(storage="dense", out_dir="/x/d")}]
    rows = export_rows(entries)
    assert [(r["export_id"], r["current"], r["checks"]) for r in rows] == [
        ("new", True, "FAILED"), ("dense", True, "passed"), ("old", False, "passed")]
    assert rows[1]["storage"] == "dense" and rows[0]["size_ratio"] == pytest.approx(0.75)

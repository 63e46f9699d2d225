"""AppTests of LoRAP's views on a tiny llama model: Table 1 on the Spectra page, MLP sweeps on the Sensitivity page."""

from __future__ import annotations

import math

import pytest

from engine.analysis.spectra_summary import lorap_table
from engine.cache.lookups import find_calibration, stored_spectra
from engine.compression.sweep import ALL_LAYERS, MLP_LOW_RANK, MLP_PRUNE, mlp_point_plan, mlp_sweep_id
from engine.models.loading import load_model
from engine.records import ACTIVATION_WEIGHTED
from engine.store import open_store
from tests.app_testing import (
    GROUPS, METHOD, assert_clean, chart_keys, engine_session, has_metric, no_running_jobs, open_app, run_until,
)
from tests.app_testing import workbench  # noqa: F401 (a fixture)


def _lorap_frame(at):
    return next(df.value for df in at.dataframe if "sub-layer" in df.value.columns)


def test_spectra_page_shows_lorap_table_1_for_weights_and_activation_weighted_weights(workbench):
    at = open_app("spectra")
    at.button(key="compute_spectra").click().run()
    run_until(at, has_metric("Full rank"))
    run_until(at, lambda a: any("sub-layer" in df.value.columns for df in a.dataframe))  # the same job computes them
    assert_clean(at)

    store = open_store()
    loaded = load_model(str(workbench["model"]), store)
    calibration = find_calibration(store, loaded.fingerprint, workbench["texts"].calibration_text,
                                   workbench["texts"].calibration_windowing, GROUPS)
    spectra = stored_spectra(store, loaded.fingerprint, calibration.calibration_id)
    weighted = store.get_feature_spectra(calibration.calibration_id, ACTIVATION_WEIGHTED)
    assert len(weighted) == len(spectra.weight) == 2 * 7

    frame = _lorap_frame(at)
    expected = lorap_table(spectra.weight, weighted)
    assert frame["type"].tolist() == ["q", "k", "v", "o", "gate", "up", "down"]
    assert frame["sub-layer"].tolist() == ["attention"] * 4 + ["MLP"] * 3
    assert frame["weight W"].tolist() == pytest.approx([100 * r["weight_share"] for r in expected])
    assert frame.iloc[:, 3].tolist() == pytest.approx([100 * r["weighted_share"] for r in expected])
    assert any("LoRAP" in caption.value and "Table 1" in caption.value for caption in at.caption)
    # the other charts are still there
    assert {"rank_share_heatmaps", "rank_share_by_type", "energy_curves"} <= chart_keys(at)

    at.selectbox(key="lorap_layer").set_value(1).run()
    assert_clean(at)
    one = lorap_table(spectra.weight, weighted, layer=1)
    assert _lorap_frame(at)["weight W"].tolist() == pytest.approx([100 * r["weight_share"] for r in one])

    # a fresh browser session shows the table straight from the store
    again = open_app("spectra")
    assert any("sub-layer" in df.value.columns for df in again.dataframe)
    assert not any(b.key == "compute_weighted_spectra" for b in again.button)


def test_sensitivity_page_runs_mlp_sweeps_and_draws_them_from_the_store(workbench):
    at = open_app("sensitivity")
    assert any("No MLP sweep points" in info.value for info in at.info)
    at.multiselect(key="mlp_sweep_ratios").set_value([0.5, 0.8])
    at.button(key="run_mlp_type_sweep").click().run()
    run_until(at, lambda a: no_running_jobs(a) and "mlp_type_curves" in chart_keys(a))
    assert_clean(at)

    store = open_store()
    session, _ = engine_session(workbench, store)
    points = store.sensitivity_points(mlp_sweep_id(session))
    assert sorted((p.linear_type, p.layer, p.ratio) for p in points) == [
        (MLP_LOW_RANK, ALL_LAYERS, 0.5), (MLP_LOW_RANK, ALL_LAYERS, 0.8), (MLP_PRUNE, ALL_LAYERS, 0.5),
        (MLP_PRUNE, ALL_LAYERS, 0.8)]
    assert all(math.isfinite(p.perplexity) and p.kl_forward > 0 for p in points)
    direct = session.evaluate(mlp_point_plan(session, MLP_PRUNE, ALL_LAYERS, 0.5)).metrics
    pruned = next(p for p in points if p.linear_type == MLP_PRUNE and p.ratio == 0.5)
    assert pruned.perplexity == pytest.approx(direct["perplexity"], rel=1e-9)

    at.slider(key="mlp_layer_sweep_ratio").set_value(0.25)
    at.button(key="run_mlp_layer_sweep").click().run()
    run_until(at, lambda a: no_running_jobs(a) and "mlp_layer_bars" in chart_keys(a))
    assert_clean(at)
    layer_points = [p for p in store.sensitivity_points(mlp_sweep_id(session)) if p.layer >= 0]
    assert sorted((p.linear_type, p.layer, p.ratio) for p in layer_points) == [(MLP_PRUNE, 0, 0.25),
                                                                               (MLP_PRUNE, 1, 0.25)]

    # the rank sweeps' charts stay empty: MLP points live in a sweep of their own
    assert any("No sensitivity points" in info.value for info in at.info)
    again = open_app("sensitivity")
    assert {"mlp_type_curves", "mlp_layer_bars"} <= chart_keys(again)
    assert no_running_jobs(again)
    assert at.selectbox(key="method").value == METHOD

"""AppTests of the Model & texts, Spectra and Sensitivity pages on a tiny llama model."""

from __future__ import annotations

import math

import pytest

from engine.cache.lookups import find_calibration, stored_spectra
from engine.energy import rank_table
from engine.models.loading import load_model
from engine.store import open_store
from engine.store.cache_inventory import find_sweep
from engine.texts.corpus import text_fingerprint
from tests.app_testing import (
    CALIBRATION_WINDOWS, EVALUATION_WINDOWS, GROUPS, METHOD, WINDOW_LEN, assert_clean, chart_keys, engine_session,
    guard_held_elsewhere, has_metric, metric_value, no_running_jobs, open_app, run_until,
)
from tests.app_testing import workbench  # noqa: F401 (a fixture)


def test_model_page_calibrates_in_the_background_and_lists_the_cache(workbench):
    at = open_app()
    assert {w.key for w in at.sidebar.text_input} >= {"model_custom", "calibration_file", "evaluation_file"}
    assert {w.key for w in at.sidebar.number_input} == {"window_len", "calibration_windows", "evaluation_windows",
                                                         "calibration_groups"}
    perplexity = float(metric_value(at, "Perplexity"))
    assert math.isfinite(perplexity) and 100 < perplexity < 1000
    assert metric_value(at, "Predicted tokens") == f"{EVALUATION_WINDOWS * (WINDOW_LEN - 1)}"
    assert len(at.get("plotly_chart")) == 1 and at.caption

    at.button(key="run_calibration").click().run()
    run_until(at, lambda a: any("Cached:" in s.value for s in a.success))
    assert_clean(at)
    store = open_store()
    loaded = load_model(str(workbench["model"]), store)
    record = find_calibration(store, loaded.fingerprint, workbench["texts"].calibration_text,
                              workbench["texts"].calibration_windowing, GROUPS)
    assert record is not None and record.n_tokens == CALIBRATION_WINDOWS * WINDOW_LEN
    calibrations = next(df.value for df in at.dataframe if "groups" in df.value.columns)
    assert calibrations.to_dict("records")[0] | {"seconds": None, "computed at": None} == {
        "text": "calibration", "window": WINDOW_LEN, "windows": CALIBRATION_WINDOWS, "groups": GROUPS,
        "tokens": CALIBRATION_WINDOWS * WINDOW_LEN, "seconds": None, "computed at": None}
    evaluations = next(df.value for df in at.dataframe if "perplexity" in df.value.columns)
    assert evaluations["perplexity"].tolist() == pytest.approx([perplexity], abs=1e-3)
    assert evaluations["text"].tolist() == ["evaluation"]


def test_a_failing_calibration_shows_what_went_wrong_and_what_to_do(workbench):
    at = open_app()
    at.sidebar.number_input(key="calibration_groups").set_value(CALIBRATION_WINDOWS + 4).run()
    at.button(key="run_calibration").click().run()
    run_until(at, lambda a: bool(a.error))
    assert not at.exception
    message = at.error[0].value
    assert message.startswith("Calibration on") and "failed" in message
    assert f"needs at least {CALIBRATION_WINDOWS + 4} calibration windows" in message and "then run it again" in message
    at.button(key=next(b.key for b in at.button if b.label == "Dismiss")).click().run()
    assert not at.error and at.button(key="run_calibration")


def test_model_page_waits_politely_while_another_task_holds_the_model(workbench):
    from app.resources import get_model_guard  # the app's process-wide guard, shared with this test

    at = open_app()
    loaded = load_model(str(workbench["model"]), open_store())
    with guard_held_elsewhere(get_model_guard(loaded.fingerprint), "a sweep in another tab"):
        at.sidebar.number_input(key="evaluation_windows").set_value(3).run()  # not measured yet
        assert not at.exception and not at.error
        assert any("The model is busy (a sweep in another tab)" in info.value for info in at.info)
        assert not any(m.label == "Perplexity" for m in at.metric)
    at.run()
    assert_clean(at)
    assert metric_value(at, "Predicted tokens") == f"{3 * (WINDOW_LEN - 1)}"


def test_sidebar_settings_survive_a_page_switch(workbench):
    at = open_app()
    at.sidebar.number_input(key="evaluation_windows").set_value(3).run()
    assert metric_value(at, "Predicted tokens") == f"{3 * (WINDOW_LEN - 1)}"
    at.switch_page("../pages/allocate.py").run()
    assert at.sidebar.number_input(key="evaluation_windows").value == 3
    at.switch_page("../pages/model.py").run()
    assert at.sidebar.number_input(key="evaluation_windows").value == 3
    assert metric_value(at, "Predicted tokens") == f"{3 * (WINDOW_LEN - 1)}"


# -- Spectra --------------------------------------------------------------------------------------------


def test_spectra_page_computes_spectra_and_matches_the_engine(workbench):
    at = open_app("spectra")
    assert at.button(key="compute_spectra") and at.info
    at.button(key="compute_spectra").click().run()
    run_until(at, has_metric("Full rank"))
    assert_clean(at)
    assert chart_keys(at) == {"rank_share_heatmaps", "rank_share_by_type", "energy_curves"}
    assert len(at.caption) >= 4  # the page caption and one per chart
    assert at.radio(key="spectra_level").value == 0.9

    store = open_store()
    loaded = load_model(str(workbench["model"]), store)
    calibration = find_calibration(store, loaded.fingerprint, workbench["texts"].calibration_text,
                                   workbench["texts"].calibration_windowing, GROUPS)
    spectra = stored_spectra(store, loaded.fingerprint, calibration.calibration_id)
    row = next(r for r in rank_table(spectra.weight, spectra.feature) if r["layer"] == 0 and r["type"] == "q")
    assert metric_value(at, "Full rank") == str(row["full_rank"]) == "32"
    assert metric_value(at, "Weight rank for 90%") == str(row["weight_rank"]["0.9"])
    assert metric_value(at, "Feature rank for 90%") == str(row["feature_rank"]["0.9"])

    at.radio(key="spectra_level").set_value(0.99).run()
    at.selectbox(key="spectra_type").set_value("down").run()
    row = next(r for r in rank_table(spectra.weight, spectra.feature) if r["layer"] == 0 and r["type"] == "down")
    assert metric_value(at, "Feature rank for 99%") == str(row["feature_rank"]["0.99"])


# -- Sensitivity ----------------------------------------------------------------------------------------


def test_sensitivity_page_sweeps_resumably_and_reopens_from_the_store(workbench):
    at = open_app("sensitivity")
    assert at.selectbox(key="method").value == METHOD
    assert at.info and "No sensitivity points" in at.info[0].value
    at.multiselect(key="sweep_ratios").set_value([0.5, 0.8])
    at.multiselect(key="sweep_types").set_value(["q", "down"])
    at.button(key="run_type_sweep").click().run()
    run_until(at, lambda a: no_running_jobs(a) and "type_curves" in chart_keys(a))
    assert_clean(at)

    store = open_store()
    session, _ = engine_session(workbench, store)
    texts = workbench["texts"]
    lookup = find_sweep(store, session.loaded.fingerprint, METHOD, session.calibration.record.calibration_id,
                        text_fingerprint(texts.evaluation_text), WINDOW_LEN, EVALUATION_WINDOWS)
    points = store.sensitivity_points(lookup.sweep_id)
    assert sorted((p.linear_type, p.ratio) for p in points) == [("down", 0.5), ("down", 0.8), ("q", 0.5), ("q", 0.8)]
    assert all(math.isfinite(p.perplexity) and p.kl_forward >= 0 for p in points)
    assert lookup.original_perplexity == pytest.approx(session.reference.perplexity)

    at.multiselect(key="layer_sweep_types").set_value(["o"])
    at.button(key="run_layer_sweep").click().run()
    run_until(at, lambda a: no_running_jobs(a) and "layer_heatmap" in chart_keys(a))
    assert_clean(at)
    layer_points = [p for p in store.sensitivity_points(lookup.sweep_id) if p.layer >= 0]
    assert sorted((p.linear_type, p.layer, p.ratio) for p in layer_points) == [("o", 0, 0.5), ("o", 1, 0.5)]

    # a fresh browser session draws both charts straight from the store, with nothing to run
    again = open_app("sensitivity")
    assert {"type_curves", "layer_heatmap"} <= chart_keys(again)
    assert no_running_jobs(again)

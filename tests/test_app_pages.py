"""AppTests of the workbench pages on a tiny llama model, and unit tests of the app's job plumbing.

Each page renders without an exception, shows its key widgets, runs its long action as a
background job (polled here as the browser's fragment would), and shows numbers that match the
engine's for the same settings. Small windows come from the environment variables the sidebar
reads (`app/workspace.py`); the texts are files written from the tiny tokenizer's training text.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
from streamlit.testing.v1 import AppTest

from app.jobs import JobBoard, JobState, ModelBusy, ModelGuard
from engine.cache_keys import find_calibration, stored_spectra
from engine.compression.grouping import Grouping, budget_target, project_to_budget, ranks_from_ratios
from engine.compression.plan import RankPlan
from engine.compression.session import CompressionSession, TextSettings
from engine.compression.units import ModelShapes, count_parameters
from engine.energy import rank_table
from engine.models.loading import load_model
from engine.paths import PROJECT_ROOT
from engine.progress import ProgressTracker
from engine.store import open_store
from engine.store.cache_inventory import find_sweep
from engine.texts.corpus import text_fingerprint
from engine.texts.windows import Windowing
from tests.tiny_models import TRAINING_TEXT

APP = str(PROJECT_ROOT / "app" / "main.py")
WINDOW_LEN, CALIBRATION_WINDOWS, EVALUATION_WINDOWS, GROUPS = 32, 4, 2, 2
METHOD = "feature-pca"
DEFAULT_RATIO = 0.2  # pages/allocate.py


@pytest.fixture
def workbench(tiny_model_dirs, tmp_path, monkeypatch):
    """Environment for the app on the tiny llama model with small windows; returns the texts used."""
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(TRAINING_TEXT * 20)
    evaluation = tmp_path / "evaluation.txt"
    evaluation.write_text("An evaluation text, held out from calibration. " + TRAINING_TEXT * 20)
    env = {
        "RANKSCOPE_MODEL": str(tiny_model_dirs["llama"]),
        "RANKSCOPE_CALIBRATION_TEXT": str(calibration),
        "RANKSCOPE_EVALUATION_TEXT": str(evaluation),
        "RANKSCOPE_WINDOW_LEN": str(WINDOW_LEN),
        "RANKSCOPE_CALIBRATION_WINDOWS": str(CALIBRATION_WINDOWS),
        "RANKSCOPE_EVALUATION_WINDOWS": str(EVALUATION_WINDOWS),
        "RANKSCOPE_GROUPS": str(GROUPS),
        "RANKSCOPE_METHOD": METHOD,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    texts = TextSettings(str(calibration), Windowing(WINDOW_LEN, CALIBRATION_WINDOWS), GROUPS,
                         str(evaluation), Windowing(WINDOW_LEN, EVALUATION_WINDOWS))
    return {"model": tiny_model_dirs["llama"], "texts": texts}


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if page is not None:
        at.switch_page(f"../pages/{page}.py")
        at.run()
    _assert_clean(at)
    return at


def _assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _run_until(at: AppTest, condition, timeout: float = 90.0) -> None:
    """Rerun the page (as the polling fragment does) until `condition(at)` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if condition(at):
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out; errors: {[e.value for e in at.error]}, infos: {[i.value for i in at.info]}")


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _has_metric(label: str):
    return lambda at: any(m.label == label for m in at.metric)


def _chart_keys(at: AppTest) -> set[str]:
    return {chart.proto.id.rsplit("-", 1)[-1] for chart in at.get("plotly_chart")}


def _engine_session(workbench, store) -> tuple[CompressionSession, ModelShapes]:
    loaded = load_model(str(workbench["model"]), store)
    session = CompressionSession.open(store, loaded, METHOD, workbench["texts"])
    return session, session.shapes


# -- Model & texts ------------------------------------------------------------------------------------


def test_model_page_calibrates_in_the_background_and_lists_the_cache(workbench):
    at = _app()
    assert {w.key for w in at.sidebar.text_input} >= {"model_custom", "calibration_file", "evaluation_file"}
    assert {w.key for w in at.sidebar.number_input} == {"window_len", "calibration_windows", "evaluation_windows",
                                                         "calibration_groups"}
    perplexity = float(_metric(at, "Perplexity"))
    assert math.isfinite(perplexity) and 100 < perplexity < 1000
    assert _metric(at, "Predicted tokens") == f"{EVALUATION_WINDOWS * (WINDOW_LEN - 1)}"
    assert len(at.get("plotly_chart")) == 1 and at.caption

    at.button(key="run_calibration").click().run()
    _run_until(at, lambda a: any("Cached:" in s.value for s in a.success))
    _assert_clean(at)
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
    at = _app()
    at.sidebar.number_input(key="calibration_groups").set_value(CALIBRATION_WINDOWS + 4).run()
    at.button(key="run_calibration").click().run()
    _run_until(at, lambda a: bool(a.error))
    assert not at.exception
    message = at.error[0].value
    assert message.startswith("Calibration on") and "failed" in message
    assert f"needs at least {CALIBRATION_WINDOWS + 4} calibration windows" in message and "then run it again" in message
    at.button(key=next(b.key for b in at.button if b.label == "Dismiss")).click().run()
    assert not at.error and at.button(key="run_calibration")


def test_model_page_waits_politely_while_another_task_holds_the_model(workbench):
    from app.resources import get_model_guard  # the app's process-wide guard, shared with this test

    at = _app()
    loaded = load_model(str(workbench["model"]), open_store())
    guard = get_model_guard(loaded.fingerprint)
    holding, release = threading.Event(), threading.Event()

    def hold():
        with guard.hold("a sweep in another tab"):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        holding.wait(5)
        at.sidebar.number_input(key="evaluation_windows").set_value(3).run()  # not measured yet
        assert not at.exception and not at.error
        assert any("The model is busy (a sweep in another tab)" in info.value for info in at.info)
        assert not any(m.label == "Perplexity" for m in at.metric)
    finally:
        release.set()
        thread.join()
    at.run()
    _assert_clean(at)
    assert _metric(at, "Predicted tokens") == f"{3 * (WINDOW_LEN - 1)}"


def test_sidebar_settings_survive_a_page_switch(workbench):
    at = _app()
    at.sidebar.number_input(key="evaluation_windows").set_value(3).run()
    assert _metric(at, "Predicted tokens") == f"{3 * (WINDOW_LEN - 1)}"
    at.switch_page("../pages/allocate.py").run()
    assert at.sidebar.number_input(key="evaluation_windows").value == 3
    at.switch_page("../pages/model.py").run()
    assert at.sidebar.number_input(key="evaluation_windows").value == 3
    assert _metric(at, "Predicted tokens") == f"{3 * (WINDOW_LEN - 1)}"


# -- Spectra --------------------------------------------------------------------------------------------


def test_spectra_page_computes_spectra_and_matches_the_engine(workbench):
    at = _app("spectra")
    assert at.button(key="compute_spectra") and at.info
    at.button(key="compute_spectra").click().run()
    _run_until(at, _has_metric("Full rank"))
    _assert_clean(at)
    assert _chart_keys(at) == {"rank_share_heatmaps", "rank_share_by_type", "energy_curves"}
    assert len(at.caption) >= 4  # the page caption and one per chart
    assert at.radio(key="spectra_level").value == 0.9

    store = open_store()
    loaded = load_model(str(workbench["model"]), store)
    calibration = find_calibration(store, loaded.fingerprint, workbench["texts"].calibration_text,
                                   workbench["texts"].calibration_windowing, GROUPS)
    spectra = stored_spectra(store, loaded.fingerprint, calibration.calibration_id)
    row = next(r for r in rank_table(spectra.weight, spectra.feature) if r["layer"] == 0 and r["type"] == "q")
    assert _metric(at, "Full rank") == str(row["full_rank"]) == "32"
    assert _metric(at, "Weight rank for 90%") == str(row["weight_rank"]["0.9"])
    assert _metric(at, "Feature rank for 90%") == str(row["feature_rank"]["0.9"])

    at.radio(key="spectra_level").set_value(0.99).run()
    at.selectbox(key="spectra_type").set_value("down").run()
    row = next(r for r in rank_table(spectra.weight, spectra.feature) if r["layer"] == 0 and r["type"] == "down")
    assert _metric(at, "Feature rank for 99%") == str(row["feature_rank"]["0.99"])


# -- Sensitivity ----------------------------------------------------------------------------------------


def _no_running_jobs(at: AppTest) -> bool:
    return not any(b.label == "Stop" for b in at.button)


def test_sensitivity_page_sweeps_resumably_and_reopens_from_the_store(workbench):
    at = _app("sensitivity")
    assert at.selectbox(key="method").value == METHOD
    assert at.info and "No sensitivity points" in at.info[0].value
    at.multiselect(key="sweep_ratios").set_value([0.5, 0.8])
    at.multiselect(key="sweep_types").set_value(["q", "down"])
    at.button(key="run_type_sweep").click().run()
    _run_until(at, lambda a: _no_running_jobs(a) and "type_curves" in _chart_keys(a))
    _assert_clean(at)

    store = open_store()
    session, _ = _engine_session(workbench, store)
    texts = workbench["texts"]
    lookup = find_sweep(store, session.loaded.fingerprint, METHOD, session.calibration.record.calibration_id,
                        text_fingerprint(texts.evaluation_text), WINDOW_LEN, EVALUATION_WINDOWS)
    points = store.sensitivity_points(lookup.sweep_id)
    assert sorted((p.linear_type, p.ratio) for p in points) == [("down", 0.5), ("down", 0.8), ("q", 0.5), ("q", 0.8)]
    assert all(math.isfinite(p.perplexity) and p.kl_forward >= 0 for p in points)
    assert lookup.original_perplexity == pytest.approx(session.reference.perplexity)

    at.multiselect(key="layer_sweep_types").set_value(["o"])
    at.button(key="run_layer_sweep").click().run()
    _run_until(at, lambda a: _no_running_jobs(a) and "layer_heatmap" in _chart_keys(a))
    _assert_clean(at)
    layer_points = [p for p in store.sensitivity_points(lookup.sweep_id) if p.layer >= 0]
    assert sorted((p.linear_type, p.layer, p.ratio) for p in layer_points) == [("o", 0, 0.5), ("o", 1, 0.5)]

    # a fresh browser session draws both charts straight from the store, with nothing to run
    again = _app("sensitivity")
    assert {"type_curves", "layer_heatmap"} <= _chart_keys(again)
    assert _no_running_jobs(again)


# -- Allocate -------------------------------------------------------------------------------------------


def _meter(at: AppTest) -> tuple[int, int]:
    return (int(_metric(at, "Decoder-linear parameters").replace(",", "")),
            int(_metric(at, "Model parameters").replace(",", "")))


def test_allocate_page_meter_matches_the_engine_and_apply_shows_finite_quality(workbench):
    at = _app("allocate")
    assert at.radio(key="alloc_grouping").value == "5x1"
    assert {s.label for s in at.slider if s.key.startswith("ratio.")} == {"qk", "o", "gate", "up", "down"}
    assert len(at.data_editor) == 1

    store = open_store()
    session, shapes = _engine_session(workbench, store)
    grouping = Grouping("5x1")
    groups = grouping.groups(shapes, METHOD)
    ranks = ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups})
    counts = count_parameters(shapes, METHOD, ranks)
    assert _meter(at) == (counts.decoder_compressed, counts.total_compressed)
    assert _metric(at, "Removed from decoder linears") == f"{counts.decoder_reduction:.2%}"
    assert _metric(at, "Removed from the whole model") == f"{counts.total_reduction:.2%}"
    assert counts.decoder_compressed < counts.decoder_dense  # the default plan really compresses

    at.button(key="apply_plan").click().run()
    _run_until(at, _has_metric("Original perplexity"))
    _assert_clean(at)
    shown = float(_metric(at, "Perplexity"))
    assert math.isfinite(shown)
    expected = session.evaluate(session.plan(ranks)).metrics
    assert shown == pytest.approx(expected["perplexity"], abs=2e-3)
    assert float(_metric(at, "Original perplexity")) == pytest.approx(session.reference.perplexity, abs=2e-3)
    assert float(_metric(at, "KL(P_orig‖P_comp)")) == pytest.approx(expected["kl_forward"], rel=1e-2, abs=1e-7)
    assert float(_metric(at, "KL(P_comp‖P_orig)")) == pytest.approx(expected["kl_reverse"], rel=1e-2, abs=1e-7)

    at.text_input(key="alloc_plan_name").set_value("by-hand")
    at.button(key="save_plan").click().run()
    table = next(df.value for df in at.dataframe if "plan" in df.value.columns)
    row = table.to_dict("records")[0]
    assert row["plan"] == "by-hand" and row["Perplexity"] == pytest.approx(shown, abs=2e-3)
    assert row["decoder_params"] == counts.decoder_compressed
    saved = RankPlan.from_dict(at.session_state["alloc_saved_plans"]["by-hand"])
    assert saved.schema == "rankscope.plan/v1" and saved.metrics["perplexity"] == pytest.approx(shown, abs=2e-3)
    assert saved.evaluation["window_len"] == WINDOW_LEN and saved.ranks == ranks | saved.ranks
    assert len(at.get("download_button")) == 2  # the current plan, and the chosen saved plan


def test_allocate_page_projects_sliders_onto_a_budget(workbench):
    at = _app("allocate")
    at.toggle(key="alloc_budget_on").set_value(True).run()
    at.slider(key="alloc_budget").set_value(0.3).run()
    _assert_clean(at)
    store = open_store()
    shapes = ModelShapes.of(load_model(str(workbench["model"]), store))
    grouping = Grouping("5x1")
    ranks, _ = project_to_budget(shapes, METHOD, grouping, {g: DEFAULT_RATIO for g in grouping.groups(shapes, METHOD)},
                                 budget_target(shapes, 0.3))
    counts = count_parameters(shapes, METHOD, ranks)
    assert _meter(at) == (counts.decoder_compressed, counts.total_compressed)
    assert counts.decoder_compressed <= budget_target(shapes, 0.3)

    at.slider(key="alloc_budget").set_value(0.9).run()  # more than rank 8 everywhere can remove
    assert at.error and "infeasible" in at.error[0].value and not at.exception


def test_allocate_page_uses_edited_ranks_and_groupings(workbench):
    at = _app("allocate")
    editor = at.data_editor[0]
    table = editor.value
    down_row = int(table.index[(table["type"] == "down") & (table["layer"] == 1)][0])
    at.session_state[editor.key] = {"edited_rows": {down_row: {"rank": 8}}, "added_rows": [], "deleted_rows": []}
    at.run()
    _assert_clean(at)
    store = open_store()
    shapes = ModelShapes.of(load_model(str(workbench["model"]), store))
    groups = Grouping("5x1").groups(shapes, METHOD)
    ranks = ranks_from_ratios(groups, {g: DEFAULT_RATIO for g in groups})
    ranks["model.layers.1.mlp.down_proj"] = 8
    assert _meter(at)[0] == count_parameters(shapes, METHOD, ranks).decoder_compressed

    at.radio(key="alloc_grouping").set_value("per-layer").run()
    _assert_clean(at)
    assert {s.label for s in at.slider if s.key.startswith("ratio.")} == {
        f"{t}@{layer}" for t in ("q", "k", "o", "gate", "up", "down") for layer in (0, 1)}  # v stays dense
    at.radio(key="alloc_grouping").set_value("5xG").run()
    _assert_clean(at)
    assert {s.label for s in at.slider if s.key.startswith("ratio.")} == {
        f"{g}@{layer}-{layer}" for g in ("qk", "o", "gate", "up", "down") for layer in (0, 1)}  # G = 2 blocks
    at.selectbox(key="method").set_value("joint-svd").run()
    _assert_clean(at)
    assert at.data_editor[0].value["type"].tolist() == ["q+k", "v", "o", "gate+up", "down"] * 2


def test_allocate_page_refuses_bad_uploads_with_a_reason(workbench, tiny_model_dirs):
    at = _app("allocate")
    uploader = at.file_uploader(key="alloc_upload")
    uploader.set_value(("broken.json", b"{not json", "application/json")).run()
    assert not at.exception and "Refused 'broken.json'" in at.error[0].value and "not valid JSON" in at.error[0].value

    at.file_uploader(key="alloc_upload").set_value(("other.json", b'{"schema": "other/v9"}', "application/json")).run()
    assert not at.exception and "Unsupported plan schema" in at.error[0].value

    store = open_store()
    other = ModelShapes.of(load_model(str(tiny_model_dirs["qwen2"]), store))
    foreign = RankPlan.build(other, METHOD, {})
    at.file_uploader(key="alloc_upload").set_value(("qwen.json", foreign.to_json().encode(), "application/json")).run()
    assert not at.exception and "was made for model" in at.error[0].value

    shapes = ModelShapes.of(load_model(str(workbench["model"]), store))
    ranks = {s.path: 8 for s in shapes.linears if s.linear_type in ("gate", "up", "down")}
    good = RankPlan.build(shapes, METHOD, ranks, grouping={"kind": "custom-mlp"})
    at.file_uploader(key="alloc_upload").set_value(("mlp8.json", good.to_json().encode(), "application/json")).run()
    _assert_clean(at)
    assert "Loaded 'mlp8'" in at.success[0].value
    assert at.selectbox(key="alloc_chosen_plan").options == ["mlp8"]
    at.button(key="edit_saved_plan").click().run()
    _assert_clean(at)
    assert _meter(at)[0] == count_parameters(shapes, METHOD, ranks).decoder_compressed
    edited = at.data_editor[0].value
    assert edited.loc[edited["type"] == "down", "rank"].tolist() == [8, 8]
    assert edited.loc[edited["type"] == "q", "rank"].isna().all()


# -- Search ---------------------------------------------------------------------------------------------------

STUDY = "tiny-study"


def _start_tiny_study(at: AppTest, name: str = STUDY, trials: int = 4) -> None:
    """4 trials (3 random first) at budget 0.3, scored on 4 sensitive windows of 8 candidates found by 2 probes."""
    for key, value in (("search_budget", 0.3), ("search_trials", trials), ("search_initial_points", 3),
                       ("search_subset_candidates", 8), ("search_subset_size", 4), ("search_probe_plans", 2)):
        at.number_input(key=key).set_value(value)
    at.text_input(key="search_name").set_value(name)
    at.button(key="start_study").click().run()
    assert not at.exception, [e.value for e in at.exception]


def _study_finished(at: AppTest) -> bool:
    studies = next((df.value for df in at.dataframe if "study" in df.value.columns), None)
    return studies is not None and "finished" in studies["state"].tolist() and \
        any(m.label == "Best perplexity (full text)" and m.value != "–" for m in at.metric) and _no_running_jobs(at)


def test_search_page_runs_a_study_live_and_shows_the_stored_numbers(workbench):
    from engine.search.records import TrialKind
    from engine.search.summary import best_trial, study_summary
    from engine.store.study_storage import DuckDBStudyStorage

    at = _app("search")
    assert any("No studies for this model yet" in i.value for i in at.info)
    assert at.radio(key="search_grouping").value == "5x1" and at.radio(key="search_kl").value == "reverse"
    _start_tiny_study(at)
    _run_until(at, _has_metric("Trials"))  # the first trials arrive (live, or all at once on a fast machine)
    _run_until(at, _study_finished)
    _assert_clean(at)

    storage = DuckDBStudyStorage(open_store())
    summary = study_summary(storage, STUDY)
    trials = storage.trials(STUDY)
    best = best_trial(storage, STUDY)
    assert summary["state"] == "finished" and summary["trials_done"] == 4
    assert [t.label for t in trials if t.kind == TrialKind.BASELINE] == ["uniform", "lord"]  # no sweep: no greedy
    assert _metric(at, "Trials") == "4/4"
    assert _metric(at, "Best objective") == f"{best.objective:.4f}"
    assert _metric(at, "Best perplexity (validation)") == f"{best.perplexity:.3f}"
    assert _metric(at, "Best perplexity (full text)") == f"{summary['full_text']['best']['perplexity']:.3f}"
    assert {"best_so_far", "perplexity_vs_parameters", "group_values"} <= _chart_keys(at)
    table = next(df.value for df in at.dataframe if "objective" in df.value.columns and "kind" in df.value.columns)
    assert table["number"].tolist() == [t.number for t in trials]
    assert table["objective"].tolist() == pytest.approx([t.objective for t in trials])
    remeasured = next(df.value for df in at.dataframe if "vs best" in df.value.columns or "perplexity_vs_best"
                      in df.value.columns)
    by_plan = dict(zip(remeasured["plan"], remeasured["Perplexity"]))
    assert by_plan == pytest.approx({label: r["perplexity"] for label, r in summary["full_text"].items()})
    assert set(by_plan) == {"best", "uniform", "lord"}
    studies = next(df.value for df in at.dataframe if "study" in df.value.columns)
    assert studies.to_dict("records")[0]["state"] == "finished"

    # another tab on the same study sees the same trials: everything is read from the store
    other = _app("search")
    assert other.selectbox(key="search_study").value == STUDY
    assert _metric(other, "Trials") == "4/4" and _metric(other, "Best objective") == f"{best.objective:.4f}"

    at.button(key="use_best_plan").click().run()
    _run_until(at, lambda a: bool(a.success))
    _assert_clean(at)
    saved = RankPlan.from_dict(at.session_state["alloc_saved_plans"][f"{STUDY}-best"])
    assert saved.ranks == saved.ranks | best.ranks and saved.provenance["study_id"] == STUDY
    assert saved.metrics["perplexity"] == pytest.approx(summary["full_text"]["best"]["perplexity"])
    assert saved.grouping["budget"] == 0.3 and saved.calibration["n_windows"] == CALIBRATION_WINDOWS
    assert any(b.proto.label == "Download the best plan (JSON)" for b in at.get("download_button"))
    at.switch_page("../pages/export.py").run()  # the best plan is ready to export
    _assert_clean(at)
    assert at.selectbox(key="export_saved_plan").value == f"{STUDY}-best"
    at.radio(key="export_source").set_value("study").run()
    assert at.selectbox(key="export_study").value == STUDY
    at.button(key="export_use_best").click().run()
    _run_until(at, lambda a: any("plan" in df.value.columns for df in a.dataframe))
    _assert_clean(at)
    summary_row = next(df.value for df in at.dataframe if "plan" in df.value.columns).to_dict("records")[0]
    assert summary_row["plan"] == f"{STUDY}-best" and summary_row["decoder_params"] == best.decoder_params


def test_search_page_stops_a_study_between_trials_and_resumes_it(workbench):
    from app.resources import get_model_guard
    from engine.store.study_storage import DuckDBStudyStorage

    at = _app("search")
    _start_tiny_study(at, "stopped-study", trials=8)
    guard = get_model_guard(load_model(str(workbench["model"]), open_store()).fingerprint)
    _run_until(at, lambda a: any(m.label == "Trials" for m in a.metric))
    holding, release = threading.Event(), threading.Event()

    def hold():  # keep the study from evaluating while Stop is pressed, so it cannot finish first
        with guard.hold("a test"):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        holding.wait(30)
        at.run()
        at.button(key=next(b.key for b in at.button if b.label == "Stop")).click().run()
    finally:
        release.set()
        thread.join()
    _run_until(at, lambda a: _no_running_jobs(a) and any(b.key == "resume_study" for b in a.button))
    _assert_clean(at)
    storage = DuckDBStudyStorage(open_store())
    record = storage.get_study("stopped-study")
    assert record.state.value == "stopped" and record.message.startswith("stopped after")
    done = int(_metric(at, "Trials").split("/")[0])
    assert done < 8 and _metric(at, "Trials") == f"{done}/8"

    at.button(key="resume_study").click().run()
    _run_until(at, _study_finished)
    _assert_clean(at)
    assert storage.get_study("stopped-study").state.value == "finished" and _metric(at, "Trials") == "8/8"


def test_search_page_shows_why_a_study_could_not_start(workbench):
    at = _app("search")
    for key, value in (("search_subset_candidates", 8), ("search_subset_size", 12)):
        at.number_input(key=key).set_value(value)
    at.button(key="start_study").click().run()
    assert not at.exception and at.error[0].value.startswith("Cannot start this study: The validation subset size")

    at.number_input(key="search_subset_size").set_value(4)
    at.number_input(key="search_budget").set_value(0.9)  # more than rank 8 everywhere (v dense) can remove
    at.button(key="start_study").click().run()
    _run_until(at, lambda a: bool(a.error))
    assert not at.exception and "failed" in at.error[0].value and "infeasible" in at.error[0].value
    assert at.error[0].value.endswith("Change the settings under New study and start again.")
    at.button(key=next(b.key for b in at.button if b.label == "Dismiss")).click().run()
    _assert_clean(at)
    assert any("No studies for this model yet" in i.value for i in at.info)


def test_search_page_warm_starts_from_a_saved_plan(workbench):
    from engine.search.records import TrialKind
    from engine.search.summary import warm_start_from_plan
    from engine.store.study_storage import DuckDBStudyStorage

    store = open_store()
    shapes = ModelShapes.of(load_model(str(workbench["model"]), store))
    ranks = {s.path: 8 for s in shapes.linears if s.linear_type in ("gate", "up", "down")}
    plan = RankPlan.build(shapes, METHOD, ranks)
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["alloc_saved_plans"] = {"mlp8": plan.to_dict()}
    at.run()
    at.switch_page("../pages/search.py").run()
    at.radio(key="search_warm_kind").set_value("saved").run()
    assert at.selectbox(key="search_warm_saved").value == "mlp8"
    at.number_input(key="search_initial_points").set_value(2)
    at.selectbox(key="search_subset").set_value("random")
    _start_tiny_study(at, "warm")
    _run_until(at, _study_finished)
    _assert_clean(at)
    storage = DuckDBStudyStorage(store)
    record = storage.get_study("warm")
    assert record.settings["warm_start"] == pytest.approx(
        warm_start_from_plan(plan, shapes, METHOD, Grouping("5x1")))
    told = [t for t in storage.trials("warm") if t.kind != TrialKind.BASELINE]
    assert told[0].kind == TrialKind.WARM_START and len(told) == 4


def test_search_page_resumes_an_interrupted_study(workbench):
    from engine.search.records import StudyRecord, StudyState
    from engine.search.settings import StudySettings
    from engine.store.study_storage import DuckDBStudyStorage

    store = open_store()
    loaded = load_model(str(workbench["model"]), store)
    texts = {"calibration_text": workbench["texts"].calibration_text, "calibration_windows": CALIBRATION_WINDOWS,
             "evaluation_text": workbench["texts"].evaluation_text, "evaluation_windows": EVALUATION_WINDOWS,
             "window_len": WINDOW_LEN, "groups": GROUPS}
    settings = StudySettings(model=str(workbench["model"]), method=METHOD, budget=0.3, n_trials=2, n_initial_points=2,
                             subset="random", subset_candidates=8, subset_size=4, texts=texts)
    storage = DuckDBStudyStorage(store)  # as a study whose app was killed before its first trial: stored as running
    storage.create_study(StudyRecord("orphan", "orphan", loaded.fingerprint, settings.to_dict(), StudyState.RUNNING))

    at = _app("search")
    assert at.selectbox(key="search_study").value == "orphan"
    assert "interrupted" in next(df.value for df in at.dataframe if "study" in df.value.columns)["state"].tolist()
    at.button(key="resume_study").click().run()
    _run_until(at, _study_finished)
    _assert_clean(at)
    assert storage.get_study("orphan").state is StudyState.FINISHED
    assert _metric(at, "Trials") == "2/2"


# -- Export -----------------------------------------------------------------------------------------------------


def test_export_page_exports_a_plan_that_reloads_and_reports_its_numbers(workbench, tmp_path):
    from engine.export_format import count_parameters as reloaded_parameters
    from engine.export_format import load_compressed

    store = open_store()
    session, shapes = _engine_session(workbench, store)
    groups = Grouping("5x1").groups(shapes, METHOD)
    plan = session.plan(ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups}))
    expected = session.evaluate(plan).metrics

    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["alloc_saved_plans"] = {"by-hand": plan.to_dict()}
    at.run()
    at.switch_page("../pages/export.py").run()
    _assert_clean(at)
    assert at.selectbox(key="export_saved_plan").value == "by-hand"
    assert any(i.value.startswith("No exports of this model yet") for i in at.info)
    assert at.text_input(key="export_dir.by-hand").value.startswith(str(PROJECT_ROOT / "exports") + "/")
    out = tmp_path / "exported"
    at.text_input(key="export_dir.by-hand").set_value(str(out))
    at.number_input(key="export_new_tokens").set_value(8)
    at.number_input(key="export_runs").set_value(1)
    at.button(key="export_model").click().run()
    _run_until(at, _has_metric("Reload check"))
    _assert_clean(at)

    [entry] = store.exports(session.loaded.fingerprint)
    report = entry["report"]
    assert entry["path"] == str(out.resolve()) and report["passed"]
    assert _metric(at, "Reload check") == "passed"
    assert _metric(at, "Perplexity") == f"{report['quality']['reloaded']['perplexity']:.3f}"
    assert float(_metric(at, "Perplexity")) == pytest.approx(expected["perplexity"], abs=2e-3)
    assert float(_metric(at, "Original perplexity")) == pytest.approx(session.reference.perplexity, abs=2e-3)
    assert float(_metric(at, "KL(P_comp‖P_orig)")) == pytest.approx(expected["kl_reverse"], rel=1e-2, abs=1e-7)
    assert _metric(at, "Decoder-linear parameters") == f"{plan.parameters['decoder_linear']['compressed']:,}"
    assert _metric(at, "Model parameters") == f"{plan.parameters['total']['compressed']:,}"
    assert _metric(at, "Weights file") == f"{report['weights_bytes'] / 2 ** 20:,.2f} MiB"
    assert _metric(at, "Tokens/s compressed") == f"{report['speed']['compressed']['tokens_per_second']:.1f}"
    assert "size_and_speed" in _chart_keys(at)
    checks = next(df.value for df in at.dataframe if "check" in df.value.columns)
    assert len(checks) == len(report["checks"]) and set(checks["result"]) == {"passed"}
    assert {b.proto.label for b in at.get("download_button")} >= {
        "Download the rank plan (JSON)", "Download rank_plan.json (with the export's metrics)"}

    model, _, reloaded_plan = load_compressed(out)  # the directory the page wrote reloads on its own
    assert reloaded_plan.ranks == plan.ranks
    assert reloaded_parameters(model) == report["parameters"]["reloaded"]

    at.text_input(key="generate_prompt").set_value("Sherlock Holmes")
    at.number_input(key="generate_new_tokens").set_value(6)
    at.button(key="generate").click().run()
    _run_until(at, lambda a: len(a.text) >= 2)
    _assert_clean(at)
    assert all(t.value.startswith("Sherlock Holmes") for t in at.text[:2])


def test_export_page_refuses_a_foreign_plan_and_an_occupied_directory(workbench, tiny_model_dirs, tmp_path):
    store = open_store()
    foreign = RankPlan.build(ModelShapes.of(load_model(str(tiny_model_dirs["qwen2"]), store)), METHOD, {})
    at = _app("export")
    at.radio(key="export_source").set_value("upload").run()
    at.file_uploader(key="export_upload").set_value(("qwen.json", foreign.to_json().encode(), "application/json")).run()
    assert not at.exception and "was made for model" in at.error[0].value
    assert "export_model" not in {b.key for b in at.button}

    shapes = ModelShapes.of(load_model(str(workbench["model"]), store))
    mine = RankPlan.build(shapes, METHOD, {s.path: 8 for s in shapes.linears if s.linear_type == "down"})
    at.file_uploader(key="export_upload").set_value(("mine.json", mine.to_json().encode(), "application/json")).run()
    _assert_clean(at)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("not an export")
    at.text_input(key="export_dir.mine").set_value(str(occupied))
    at.button(key="export_model").click().run()
    _run_until(at, lambda a: bool(a.error))
    assert not at.exception
    assert "is not an earlier RankScope export" in at.error[0].value and "Choose another directory" in at.error[0].value
    assert (occupied / "notes.txt").read_text() == "not an export" and len(list(occupied.iterdir())) == 1


# -- job plumbing -------------------------------------------------------------------------------------------


def test_job_board_reports_progress_errors_and_stops_between_units():
    board = JobBoard()
    release = threading.Event()

    def counting(job):
        tracker = ProgressTracker(job.report, "points", total=50, unit="points")
        for _ in range(50):
            release.wait(5)
            tracker.advance()
        return "finished"

    job = board.start("model/sweep/x/1", "Sweep", counting, resumable=True)
    assert board.start("model/sweep/x/1", "Sweep", counting, resumable=True) is job  # same id joins the running job
    board.stop(job.job_id)
    release.set()
    board.wait(job.job_id, 10)
    assert job.state is JobState.STOPPED and "resume" in job.message
    assert job.event is None or job.event.done < 50  # stopped between units, not after all of them

    def failing(job):
        raise ValueError("boom")

    failed = board.wait(board.start("model/apply/y/2", "Apply", failing).job_id, 10)
    assert failed.state is JobState.FAILED and "ValueError: boom" in failed.message
    assert [j.job_id for j in board.with_prefix("model/")] == ["model/sweep/x/1", "model/apply/y/2"]
    board.forget("model/apply/y/2")
    assert board.get("model/apply/y/2") is None


def test_model_guard_names_its_holder_when_busy():
    guard = ModelGuard()
    holding, release = threading.Event(), threading.Event()

    def hold():
        with guard.hold("calibrating on 'war-and-peace'"):
            holding.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(5)
    with pytest.raises(ModelBusy, match="calibrating on 'war-and-peace'"):
        with guard.hold("measuring", timeout=0.05):
            pass
    release.set()
    thread.join()
    with guard.hold("measuring", timeout=0.05):
        assert guard.holder == "measuring"
    assert guard.holder is None

"""AppTests of the Search page on a tiny llama model: live study, stop and resume, errors, warm start."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from engine.compression.grouping import Grouping
from engine.compression.plan import RankPlan
from engine.compression.units import ModelShapes
from engine.models.loading import load_model
from engine.store import open_store
from tests.app_testing import (
    APP, CALIBRATION_WINDOWS, METHOD, assert_clean, chart_keys,
    guard_held_elsewhere, has_metric, metric_value, no_running_jobs, open_app, run_until,
)
from tests.app_testing import workbench  # noqa: F401 (a fixture)


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
        any(m.label == "Best perplexity (full text)" and m.value != "–" for m in at.metric) and no_running_jobs(at)


def test_search_page_runs_a_study_live_and_shows_the_stored_numbers(workbench):
    from engine.search.records import TrialKind
    from engine.search.summary import best_trial, study_summary
    from engine.search.duckdb_storage import DuckDBStudyStorage

    at = open_app("search")
    assert any("No studies for this model yet" in i.value for i in at.info)
    assert at.radio(key="search_grouping").value == "5x1" and at.radio(key="search_kl").value == "reverse"
    _start_tiny_study(at)
    run_until(at, has_metric("Trials"))  # the first trials arrive (live, or all at once on a fast machine)
    run_until(at, _study_finished)
    assert_clean(at)

    storage = DuckDBStudyStorage(open_store())
    summary = study_summary(storage, STUDY)
    trials = storage.trials(STUDY)
    best = best_trial(storage, STUDY)
    assert summary["state"] == "finished" and summary["trials_done"] == 4
    assert [t.label for t in trials if t.kind == TrialKind.BASELINE] == ["uniform", "lord"]  # no sweep: no greedy
    assert metric_value(at, "Trials") == "4/4"
    assert metric_value(at, "Chosen plan's objective") == f"{best.objective:.4f}"
    assert metric_value(at, "Best perplexity (validation)") == f"{best.perplexity:.3f}"
    assert metric_value(at, "Best perplexity (full text)") == f"{summary['full_text']['best']['perplexity']:.3f}"
    assert {"best_so_far", "perplexity_vs_parameters", "group_values"} <= chart_keys(at)
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
    other = open_app("search")
    assert other.selectbox(key="search_study").value == STUDY
    assert metric_value(other, "Trials") == "4/4" and metric_value(other, "Chosen plan's objective") == f"{best.objective:.4f}"

    at.button(key="use_best_plan").click().run()
    run_until(at, lambda a: bool(a.success))
    assert_clean(at)
    saved = RankPlan.from_dict(at.session_state["alloc_saved_plans"][f"{STUDY}-best"])
    assert saved.ranks == saved.ranks | best.ranks and saved.provenance["study_id"] == STUDY
    assert saved.metrics["perplexity"] == pytest.approx(summary["full_text"]["best"]["perplexity"])
    assert saved.grouping["budget"] == 0.3 and saved.calibration["n_windows"] == CALIBRATION_WINDOWS
    assert any(b.proto.label == "Download the best plan (JSON)" for b in at.get("download_button"))
    at.switch_page("../pages/export.py").run()  # the best plan is ready to export
    assert_clean(at)
    assert at.selectbox(key="export_saved_plan").value == f"{STUDY}-best"
    at.radio(key="export_source").set_value("study").run()
    assert at.selectbox(key="export_study").value == STUDY
    at.button(key="export_use_best").click().run()
    run_until(at, lambda a: any("plan" in df.value.columns for df in a.dataframe))
    assert_clean(at)
    summary_row = next(df.value for df in at.dataframe if "plan" in df.value.columns).to_dict("records")[0]
    assert summary_row["plan"] == f"{STUDY}-best" and summary_row["decoder_params"] == best.decoder_params


def test_search_page_stops_a_study_between_trials_and_resumes_it(workbench):
    from app.resources import get_model_guard
    from engine.search.duckdb_storage import DuckDBStudyStorage

    at = open_app("search")
    _start_tiny_study(at, "stopped-study", trials=8)
    guard = get_model_guard(load_model(str(workbench["model"]), open_store()).fingerprint)
    run_until(at, lambda a: any(m.label == "Trials" for m in a.metric))
    with guard_held_elsewhere(guard, "a test"):  # the study cannot evaluate, so cannot finish, while Stop is pressed
        at.run()
        at.button(key=next(b.key for b in at.button if b.label == "Stop")).click().run()
    run_until(at, lambda a: no_running_jobs(a) and any(b.key == "resume_study" for b in a.button))
    assert_clean(at)
    storage = DuckDBStudyStorage(open_store())
    record = storage.get_study("stopped-study")
    assert record.state.value == "stopped" and record.message.startswith("stopped after")
    done = int(metric_value(at, "Trials").split("/")[0])
    assert done < 8 and metric_value(at, "Trials") == f"{done}/8"

    at.button(key="resume_study").click().run()
    run_until(at, _study_finished)
    assert_clean(at)
    assert storage.get_study("stopped-study").state.value == "finished" and metric_value(at, "Trials") == "8/8"


def test_search_page_shows_why_a_study_could_not_start(workbench):
    at = open_app("search")
    for key, value in (("search_subset_candidates", 8), ("search_subset_size", 12)):
        at.number_input(key=key).set_value(value)
    at.button(key="start_study").click().run()
    assert not at.exception and at.error[0].value.startswith("Cannot start this study: The validation subset size")

    at.number_input(key="search_subset_size").set_value(4)
    at.number_input(key="search_budget").set_value(0.9)  # more than rank 8 everywhere (v dense) can remove
    at.button(key="start_study").click().run()
    run_until(at, lambda a: bool(a.error))
    assert not at.exception and "failed" in at.error[0].value and "infeasible" in at.error[0].value
    assert at.error[0].value.endswith("Change the settings under New study and start again.")
    at.button(key=next(b.key for b in at.button if b.label == "Dismiss")).click().run()
    assert_clean(at)
    assert any("No studies for this model yet" in i.value for i in at.info)


def test_search_page_warm_starts_from_a_saved_plan(workbench):
    from engine.search.records import TrialKind
    from engine.search.summary import warm_start_from_plan
    from engine.search.duckdb_storage import DuckDBStudyStorage

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
    run_until(at, _study_finished)
    assert_clean(at)
    storage = DuckDBStudyStorage(store)
    record = storage.get_study("warm")
    assert record.settings["warm_start"] == pytest.approx(
        warm_start_from_plan(plan, shapes, METHOD, Grouping("5x1")))
    told = [t for t in storage.trials("warm") if t.kind != TrialKind.BASELINE]
    assert told[0].kind == TrialKind.WARM_START and len(told) == 4


def test_search_page_resumes_an_interrupted_study(workbench):
    from engine.search.records import StudyRecord, StudyState
    from engine.search.settings import StudySettings
    from engine.search.duckdb_storage import DuckDBStudyStorage

    store = open_store()
    loaded = load_model(str(workbench["model"]), store)
    texts = workbench["texts"]
    settings = StudySettings(model=str(workbench["model"]), method=METHOD, budget=0.3, n_trials=2, n_initial_points=2,
                             subset="random", subset_candidates=8, subset_size=4, texts=texts)
    storage = DuckDBStudyStorage(store)  # as a study whose app was killed before its first trial: stored as running
    storage.create_study(StudyRecord("orphan", "orphan", loaded.fingerprint, settings.to_dict(), StudyState.RUNNING))

    at = open_app("search")
    assert at.selectbox(key="search_study").value == "orphan"
    assert "interrupted" in next(df.value for df in at.dataframe if "study" in df.value.columns)["state"].tolist()
    at.button(key="resume_study").click().run()
    run_until(at, _study_finished)
    assert_clean(at)
    assert storage.get_study("orphan").state is StudyState.FINISHED
    assert metric_value(at, "Trials") == "2/2"

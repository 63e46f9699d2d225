"""AppTests of the Allocate page's live quality on a tiny llama model: the instant estimate with its measured
error (or what to run without a sweep), the quick measurement that starts without a click and gives way to a
newer allocation, and the history chart of what the session measured."""

from __future__ import annotations

import base64
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from engine.analysis.quality_estimate import QualityEstimator, study_evaluations
from engine.compression.grouping import Grouping, ranks_from_ratios
from engine.compression.pruning import PruningSettings
from engine.compression.session import CompressionSession
from engine.compression.sweep import sweep_by_type, sweep_id
from engine.models.loading import load_model
from engine.store import open_store
from engine.texts.windows import Windowing
from tests.app_testing import (
    DEFAULT_RATIO, METHOD, WINDOW_LEN, assert_clean, guard_held_elsewhere, has_metric, metric_value, open_app,
    run_until,
)
from tests.app_testing import workbench  # noqa: F401 (a fixture)

QUICK = "Quick perplexity (2 windows)"


def _ranks(shapes, ratios: dict | None = None) -> dict:
    """The ranks the page's 5x1 sliders give (every group at DEFAULT_RATIO unless `ratios` says otherwise)."""
    groups = Grouping("5x1").groups(shapes, METHOD)
    return ranks_from_ratios(groups, {name: (ratios or {}).get(name, DEFAULT_RATIO) for name in groups})


def _four_evaluation_windows(workbench, monkeypatch) -> CompressionSession:
    """Four evaluation windows (a quick measurement uses the first two), with the session prepared and stored."""
    monkeypatch.setenv("RANKSCOPE_EVALUATION_WINDOWS", "4")
    texts = replace(workbench["texts"], evaluation_windowing=Windowing(WINDOW_LEN, 4))
    store = open_store()
    return CompressionSession.open(store, load_model(str(workbench["model"]), store), METHOD, texts)


def _array(values) -> list:
    """A plotly figure array: a JSON list, or plotly's typed-array form {"dtype", "bdata": base64}."""
    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).tolist()
    return list(values)


def _history(at: AppTest) -> dict[str, list[tuple[float, float]]]:
    """The history chart's points by trace name: (decoder-linear parameters, perplexity)."""
    chart = next(c for c in at.get("plotly_chart") if c.proto.id.endswith("alloc_history"))
    return {trace["name"]: list(zip(_array(trace["x"]), _array(trace["y"])))
            for trace in json.loads(chart.proto.spec)["data"]}


def _error_shown(at: AppTest, label: str, expected: float) -> None:
    """The metric's delta is '±x% error' with `expected` (a relative error) as the page rounds it."""
    delta = next(m.delta for m in at.metric if m.label == label)
    assert delta.startswith("±") and delta.endswith("% error"), delta
    assert float(delta[1:].removesuffix("% error")) == pytest.approx(100 * expected,
                                                                     abs=0.51 if expected >= 0.1 else 0.051)


def _slider(at: AppTest, group: str):
    return next(s for s in at.slider if s.key.startswith("ratio.") and s.label == group)


def _quick_shown(value: float):
    return lambda at: has_metric(QUICK)(at) and float(metric_value(at, QUICK)) == pytest.approx(value, abs=2e-3)


def test_without_a_sweep_the_page_says_what_to_run_instead_of_a_number(workbench):
    at = open_app("allocate")
    assert not has_metric("Predicted perplexity")(at)
    info = " ".join(i.value for i in at.info)
    assert "No instant estimate" in info and "run the per-type sweep on the Sensitivity page" in info
    # nothing is prepared for this method yet: the quick measurement waits for Apply rather than calibrating
    assert any("press Apply once" in c.value for c in at.caption)
    assert not has_metric(QUICK)(at)


def test_the_estimate_and_its_leave_one_out_error_come_from_the_stored_sweep_and_study(workbench):
    from engine.search.duckdb_storage import DuckDBStudyStorage
    from engine.search.runner import StudyRunner, create_study
    from engine.search.settings import StudySettings

    store = open_store()
    session = CompressionSession.open(store, load_model(str(workbench["model"]), store), METHOD, workbench["texts"])
    points = sweep_by_type(session, [0.25, 0.5])
    storage = DuckDBStudyStorage(store)
    settings = StudySettings(model=str(workbench["model"]), method=METHOD, budget=0.3, n_trials=3,
                             n_initial_points=3, subset_candidates=8, subset_size=4, subset_probe_plans=2,
                             texts=workbench["texts"])
    create_study(storage, session, settings, name="tiny")
    StudyRunner(storage, session, "tiny").run()
    results = storage.results("tiny")
    assert {"best", "uniform", "lord", "greedy"} <= set(results)

    at = open_app("allocate")
    estimator = QualityEstimator(
        session.shapes, METHOD, session.reference.perplexity, store.sensitivity_points(sweep_id(session)), [],
        study_evaluations("tiny", settings.to_dict(), storage.trials("tiny"), results), PruningSettings().to_dict())
    expected = estimator.estimate(_ranks(session.shapes))
    assert len(points) == 2 * 7 and expected.error is not None and expected.n_fit >= 4

    shown = float(metric_value(at, "Predicted perplexity"))
    assert shown == pytest.approx(expected.perplexity, abs=2e-3)
    _error_shown(at, "Predicted perplexity", expected.error.perplexity)
    assert metric_value(at, "Estimate checked on") == f"{expected.error.n} evaluations"
    assert float(metric_value(at, "Predicted KL(P_comp‖P_orig)")) == pytest.approx(expected.kl_reverse, rel=1e-3)
    assert any(f"corrected on {expected.n_fit} stored multi-type evaluations" in c.value for c in at.caption)
    assert not any("No instant estimate" in i.value for i in at.info)

    # a slider move changes the estimate at once (no job, no click)
    moved = estimator.estimate(_ranks(session.shapes, {"up": 0.5}))
    assert moved.kl_reverse != pytest.approx(expected.kl_reverse, rel=1e-3)
    _slider(at, "up").set_value(0.5).run()
    assert float(metric_value(at, "Predicted perplexity")) == pytest.approx(moved.perplexity, abs=2e-3)
    assert float(metric_value(at, "Predicted KL(P_comp‖P_orig)")) == pytest.approx(moved.kl_reverse, rel=1e-3)

def test_the_quick_measurement_arrives_without_apply_and_the_history_chart_gets_both_kinds(workbench, monkeypatch):
    session = _four_evaluation_windows(workbench, monkeypatch)
    sweep_by_type(session, [0.25, 0.5])
    ranks = _ranks(session.shapes)
    quick = session.evaluate_ranks(ranks, window_indices=[0, 1])
    original = session.evaluate_ranks({}, window_indices=[0, 1])

    at = open_app("allocate")
    run_until(at, has_metric(QUICK))
    assert_clean(at)
    assert metric_value(at, "Estimate checked on") == "nothing yet"
    assert float(metric_value(at, QUICK)) == pytest.approx(quick.perplexity, abs=2e-3)
    assert float(metric_value(at, "Original on the same 2 windows")) == pytest.approx(original.perplexity, abs=2e-3)
    assert float(metric_value(at, "Quick KL(P_comp‖P_orig)")) == pytest.approx(quick.kl_reverse, rel=1e-2)
    assert not has_metric("Perplexity")(at)  # Apply's full measurement was not asked for
    assert any("first 2 of the 4 evaluation windows" in c.value for c in at.caption)
    decoder = int(metric_value(at, "Decoder-linear parameters").replace(",", ""))
    assert _history(at) == {"quick (2 windows)": [(decoder, pytest.approx(quick.perplexity))]}

    at.button(key="apply_plan").click().run()
    run_until(at, has_metric("Original perplexity"))
    assert_clean(at)
    full = session.evaluate_ranks(ranks)
    assert float(metric_value(at, "Perplexity")) == pytest.approx(full.perplexity, abs=2e-3)
    # the applied plan is a stored evaluation at once: left out, the plain sum predicts it
    plain = QualityEstimator(session.shapes, METHOD, session.reference.perplexity,
                             open_store().sensitivity_points(sweep_id(session))).estimate(ranks)
    assert metric_value(at, "Estimate checked on") == "1 evaluation"
    _error_shown(at, "Predicted perplexity", abs(plain.perplexity / full.perplexity - 1))
    assert _history(at) == {"quick (2 windows)": [(decoder, pytest.approx(quick.perplexity))],
                            "Apply (4 windows)": [(decoder, pytest.approx(full.perplexity))]}
    assert math.isfinite(full.perplexity) and full.perplexity != pytest.approx(quick.perplexity)


def test_a_newer_allocation_supersedes_a_pending_quick_measurement_and_results_are_kept(workbench, monkeypatch):
    from app.resources import get_job_board, get_model_guard

    session = _four_evaluation_windows(workbench, monkeypatch)
    first, second = _ranks(session.shapes), _ranks(session.shapes, {"up": 0.5})
    first_quick = session.evaluate_ranks(first, window_indices=[0, 1]).perplexity
    second_quick = session.evaluate_ranks(second, window_indices=[0, 1]).perplexity
    assert first_quick != pytest.approx(second_quick, abs=2e-3)

    at = open_app("allocate")
    with guard_held_elsewhere(get_model_guard(session.loaded.fingerprint), "a sweep in another tab"):
        run_until(at, lambda a: "alloc_quick_job" in a.session_state)  # started, waiting for the model
        pending = at.session_state["alloc_quick_job"]
        assert get_job_board().get(pending).running
        _slider(at, "up").set_value(0.5).run()
        run_until(at, lambda a: a.session_state["alloc_quick_job"] != pending)
        assert get_job_board().get(pending).stop_requested  # superseded: it will not measure
    run_until(at, _quick_shown(second_quick))
    assert_clean(at)
    assert get_job_board().wait(pending, 30).state.value == "stopped"
    assert [name for name in _history(at)] == ["quick (2 windows)"] and len(_history(at)["quick (2 windows)"]) == 1

    _slider(at, "up").set_value(DEFAULT_RATIO).run()  # back to the first allocation: measured now
    run_until(at, _quick_shown(first_quick))
    _slider(at, "up").set_value(0.5).run()  # and to the second again: shown at once, from its finished job
    assert float(metric_value(at, QUICK)) == pytest.approx(second_quick, abs=2e-3)
    assert len(_history(at)["quick (2 windows)"]) == 2


def test_pruned_mlps_need_the_mlp_sweep_and_then_join_the_estimate(workbench):
    from engine.compression.sweep import mlp_sweep_id, sweep_mlp_by_type

    store = open_store()
    session = CompressionSession.open(store, load_model(str(workbench["model"]), store), METHOD, workbench["texts"])
    sweep_by_type(session, [0.25, 0.5])
    at = open_app("allocate")
    assert has_metric("Predicted perplexity")(at)
    at.radio(key="alloc_mlp_mode").set_value("pruned by channels (LoRAP)").run()
    assert_clean(at)
    info = " ".join(i.value for i in at.info)
    assert "MLP sweep on the Sensitivity page" in info and "low-rank MLPs only" in info
    assert not has_metric("Predicted perplexity")(at)

    sweep_mlp_by_type(session, [0.2, 0.5])
    at.run()
    assert_clean(at)
    estimator = QualityEstimator(session.shapes, METHOD, session.reference.perplexity,
                                 store.sensitivity_points(sweep_id(session)),
                                 store.sensitivity_points(mlp_sweep_id(session)), [], PruningSettings().to_dict())
    ranks = {path: (None if any(path.endswith(p) for p in ("gate_proj", "up_proj", "down_proj")) else rank)
             for path, rank in _ranks(session.shapes).items()}
    kept = {mlp.path: round((1 - DEFAULT_RATIO) * mlp.d_ff) for mlp in session.shapes.mlps}  # the table's start
    expected = estimator.estimate(ranks, kept)
    assert "mlp-prune" in expected.contributions
    assert float(metric_value(at, "Predicted perplexity")) == pytest.approx(expected.perplexity, abs=2e-3)
    # nothing multi-type is stored: the plain sum, and the page says its error is not known yet
    assert metric_value(at, "Estimate checked on") == "nothing yet"
    assert next(m.delta for m in at.metric if m.label == "Predicted perplexity") in (None, "")
    assert any("its error is not known yet" in c.value for c in at.caption)

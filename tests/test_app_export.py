"""AppTests of the Export page on a tiny llama model: export, reload report, refusals."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from engine.compression.grouping import Grouping, ranks_from_ratios
from engine.compression.plan import RankPlan
from engine.compression.units import ModelShapes
from engine.models.loading import load_model
from engine.paths import PROJECT_ROOT
from engine.store import open_store
from tests.app_testing import (
    APP, DEFAULT_RATIO, METHOD, assert_clean, chart_keys, engine_session, has_metric, metric_value, open_app, run_until,
)
from tests.app_testing import workbench  # noqa: F401 (a fixture)


def test_export_page_exports_a_plan_that_reloads_and_reports_its_numbers(workbench, tmp_path):
    from engine.export.format import count_module_parameters as reloaded_parameters
    from engine.export.format import load_compressed

    store = open_store()
    session, shapes = engine_session(workbench, store)
    groups = Grouping("5x1").groups(shapes, METHOD)
    plan = session.plan(ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups}))
    expected = session.evaluate(plan).metrics

    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["alloc_saved_plans"] = {"by-hand": plan.to_dict()}
    at.run()
    at.switch_page("../pages/export.py").run()
    assert_clean(at)
    assert at.selectbox(key="export_saved_plan").value == "by-hand"
    assert any(i.value.startswith("No exports of this model yet") for i in at.info)
    assert at.text_input(key="export_dir.by-hand").value.startswith(str(PROJECT_ROOT / "exports") + "/")
    out = tmp_path / "exported"
    at.text_input(key="export_dir.by-hand").set_value(str(out))
    at.number_input(key="export_new_tokens").set_value(8)
    at.number_input(key="export_runs").set_value(1)
    at.button(key="export_model").click().run()
    run_until(at, has_metric("Reload check"))
    assert_clean(at)

    [entry] = store.exports(session.loaded.fingerprint)
    report = entry["report"]
    assert entry["path"] == str(out.resolve()) and report["passed"]
    assert metric_value(at, "Reload check") == "passed"
    assert metric_value(at, "Perplexity") == f"{report['quality']['reloaded']['perplexity']:.3f}"
    assert float(metric_value(at, "Perplexity")) == pytest.approx(expected["perplexity"], abs=2e-3)
    assert float(metric_value(at, "Original perplexity")) == pytest.approx(session.reference.perplexity, abs=2e-3)
    assert float(metric_value(at, "KL(P_comp‖P_orig)")) == pytest.approx(expected["kl_reverse"], rel=1e-2, abs=1e-7)
    assert metric_value(at, "Decoder-linear parameters") == f"{plan.parameters['decoder_linear']['compressed']:,}"
    assert metric_value(at, "Model parameters") == f"{plan.parameters['total']['compressed']:,}"
    assert metric_value(at, "Weights file") == f"{report['weights_bytes'] / 2 ** 20:,.2f} MiB"
    assert metric_value(at, "Tokens/s compressed") == f"{report['speed']['compressed']['tokens_per_second']:.1f}"
    assert "size_and_speed" in chart_keys(at)
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
    run_until(at, lambda a: len(a.text) >= 2)
    assert_clean(at)
    assert all(t.value.startswith("Sherlock Holmes") for t in at.text[:2])


def test_export_page_refuses_a_foreign_plan_and_an_occupied_directory(workbench, tiny_model_dirs, tmp_path):
    store = open_store()
    qwen = ModelShapes.of(load_model(str(tiny_model_dirs["qwen2"]), store))
    foreign = RankPlan.build(qwen, METHOD, {qwen.linears[-1].path: 8})  # a plan compresses at least one linear
    at = open_app("export")
    at.radio(key="export_source").set_value("upload").run()
    at.file_uploader(key="export_upload").set_value(("qwen.json", foreign.to_json().encode(), "application/json")).run()
    assert not at.exception and "was made for model" in at.error[0].value
    assert "export_model" not in {b.key for b in at.button}

    shapes = ModelShapes.of(load_model(str(workbench["model"]), store))
    mine = RankPlan.build(shapes, METHOD, {s.path: 8 for s in shapes.linears if s.linear_type == "down"})
    at.file_uploader(key="export_upload").set_value(("mine.json", mine.to_json().encode(), "application/json")).run()
    assert_clean(at)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("not an export")
    at.text_input(key="export_dir.mine").set_value(str(occupied))
    at.button(key="export_model").click().run()
    run_until(at, lambda a: bool(a.error))
    assert not at.exception
    assert "is not an earlier RankScope export" in at.error[0].value and "Choose another directory" in at.error[0].value
    assert (occupied / "notes.txt").read_text() == "not an export" and len(list(occupied.iterdir())) == 1


def test_export_page_refuses_a_plan_whose_calibration_text_changed_and_notes_another_evaluation(workbench, tmp_path):
    """The page runs a plan through the same engine check as `rankscope export` (engine.compression.plan_settings)."""
    store = open_store()
    session, shapes = engine_session(workbench, store)
    groups = Grouping("5x1").groups(shapes, METHOD)
    plan = session.plan(ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups}))
    measured_elsewhere = RankPlan.from_dict({**plan.to_dict(), "evaluation": {**plan.evaluation, "n_windows": 7}})
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["alloc_saved_plans"] = {"elsewhere": measured_elsewhere.to_dict()}
    at.run()
    at.switch_page("../pages/export.py").run()
    assert_clean(at)
    assert any("the plan's metrics were measured on" in i.value and "7 windows" in i.value for i in at.info)

    calibration = workbench["texts"].calibration_text
    with open(calibration, "a") as handle:
        handle.write(" A line added after the plan was made.")
    at.run()
    assert [e.value for e in at.error if "cannot be exported as it was measured" in e.value
            and plan.calibration["text_fingerprint"][:12] in e.value and "has other content" in e.value]
    assert at.button(key="export_model") if False else not [b for b in at.button if b.key == "export_model"]


def test_export_page_replaces_an_earlier_export_only_when_the_box_is_ticked(workbench, tmp_path):
    from engine.export import export_compressed, load_compressed

    store = open_store()
    session, shapes = engine_session(workbench, store)
    groups = Grouping("5x1").groups(shapes, METHOD)
    plan = session.plan(ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups}))
    out = tmp_path / "exported"
    earlier = session.uniform_plan(0.5)
    export_compressed(session, earlier, out, timing_runs=1, max_new_tokens=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["alloc_saved_plans"] = {"by-hand": plan.to_dict()}
    at.run()
    at.switch_page("../pages/export.py").run()
    assert_clean(at)
    at.text_input(key="export_dir.by-hand").set_value(str(out))
    at.number_input(key="export_new_tokens").set_value(4)
    at.number_input(key="export_runs").set_value(1)
    assert at.checkbox(key="export_overwrite").value is False
    at.button(key="export_model").click().run()
    run_until(at, lambda a: bool(a.error))
    assert not at.exception
    assert "holds an earlier RankScope export" in at.error[0].value and "tick" in at.error[0].value
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    (out / "NOTES.txt").write_text("mine")
    at.checkbox(key="export_overwrite").check().run()
    at.button(key="export_model").click().run()
    run_until(at, lambda a: bool(a.error))
    assert "NOTES.txt" in at.error[0].value and (out / "NOTES.txt").read_text() == "mine"
    assert load_compressed(out)[2].ranks == earlier.ranks

    (out / "NOTES.txt").unlink()
    at.button(key="export_model").click().run()
    run_until(at, lambda a: any(s.value.startswith("Exported to") for s in a.success))
    assert_clean(at)
    assert load_compressed(out)[2].ranks == plan.ranks

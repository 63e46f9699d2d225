"""AppTests of the Recover page on a tiny llama model: a live run, its stored result, saving, refusals, resuming."""

from __future__ import annotations

import os
import threading

import pytest
from streamlit.testing.v1 import AppTest

from engine.analysis.recovery_summary import history_rows, loss_points, parameter_rows, quality_rows, validation_points
from engine.compression.grouping import Grouping, ranks_from_ratios
from engine.compression.plan import RankPlan
from engine.compression.plan_shelf import PlanShelf
from engine.compression.units import ModelShapes
from engine.models.loading import load_model
from engine.recovery.settings import RecoverySettings
from engine.recovery.training import checkpoint_path, run_id_for, stored_outcome
from engine.store import open_store
from tests.app_testing import (
    APP, DEFAULT_RATIO, METHOD, assert_clean, chart_keys, engine_session, metric_value, no_running_jobs, run_until,
)
from tests.app_testing import workbench  # noqa: F401 (a fixture)

PLAN = "by-hand"
# a short run on the tiny texts: 3 steps of 2 windows (of the plan's 32 tokens) cycling through 4, 2 held out
SHORT_RUN = {"recover_steps": 3, "recover_batch": 2, "recover_training_windows": 4, "recover_validation_windows": 2,
             "recover_eval_every": 2}
SHORT_SETTINGS = dict(steps=3, batch_windows=2, training_windows=4, validation_windows=2, eval_every=2)


def _plan(workbench, store) -> RankPlan:
    session, shapes = engine_session(workbench, store)
    groups = Grouping("5x1").groups(shapes, METHOD)
    return session.evaluate(session.plan(ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups})))


def _open_recover(plan: RankPlan) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["alloc_saved_plans"] = {PLAN: plan.to_dict()}
    at.run()
    at.switch_page("../pages/recover.py").run()
    assert_clean(at)
    return at


def _set(at: AppTest, values: dict) -> None:
    for key, value in values.items():
        at.number_input(key=key).set_value(value)
    at.run()


def _finished(at: AppTest) -> bool:
    return any(m.label == "Peak memory" for m in at.metric) and no_running_jobs(at)


def _frame(at: AppTest, column: str):
    return next(df.value for df in at.dataframe if column in df.value.columns)


def _run_id(plan: RankPlan, **settings) -> str:
    """The engine's key of a run (what `rankscope recover` would find for the same plan and settings)."""
    resolved = RecoverySettings(**settings).resolved(plan.calibration, plan.evaluation)
    return run_id_for(plan, resolved)


def test_recover_page_runs_a_recovery_shows_before_and_after_and_saves_the_plan_for_export(workbench, tmp_path):
    store = open_store()
    plan = _plan(workbench, store)
    at = _open_recover(plan)
    assert at.selectbox(key="recover_plan").value == PLAN
    assert at.radio(key="recover_kind").value == "subspace" and at.number_input(key="recover_steps").value == 100
    assert at.selectbox(key="recover_text_book").value == ""  # the plan's calibration text
    assert at.button(key="recover_start").proto.label == "Start recovery"
    _set(at, SHORT_RUN)
    assert_clean(at)
    assert any("subspace: 3 steps of 2 windows of 32 tokens" in c.value for c in at.caption)
    at.button(key="recover_start").click().run()
    run_until(at, _finished)
    assert_clean(at)

    outcome = stored_outcome(store, _run_id(plan, **SHORT_SETTINGS))  # the page's run is the engine's
    assert outcome is not None
    result = outcome.result
    assert any(s.value == "Finished." for s in at.success)
    assert metric_value(at, "Steps") == "3" and metric_value(at, "Tokens") == f"{3 * 2 * 32:,}"
    assert metric_value(at, "Peak memory") == f"{outcome.record.peak_rss_bytes / 2 ** 30:.2f} GiB"
    quality = _frame(at, "after")
    by_measure = {row["measure"]: row for row in quality.to_dict("records")}
    assert by_measure["Perplexity"]["before"] == pytest.approx(result["before"]["perplexity"])
    assert by_measure["Perplexity"]["after"] == pytest.approx(result["after"]["perplexity"])
    assert by_measure["Perplexity"]["before"] == pytest.approx(plan.metrics["perplexity"], rel=1e-6)
    assert by_measure["KL(P_comp‖P_orig)"]["after"] == pytest.approx(result["after"]["kl_reverse"])
    assert by_measure["Perplexity (held-out training text)"]["after"] == pytest.approx(result["validation"]["after"])
    parameters = _frame(at, "removed_after")
    assert parameters["after"].tolist()[0] == plan.parameters["decoder_linear"]["compressed"]  # subspace keeps ranks
    assert "recovery_curve" in chart_keys(at)

    # after a restart of the app (its job board forgotten), the same settings show the stored result at once
    from app.resources import get_job_board
    from app.tasks import recovery_job_id

    get_job_board().forget(recovery_job_id(load_model(str(workbench["model"]), store), outcome.record.run_id))
    other = _open_recover(plan)
    _set(other, SHORT_RUN)
    assert any("finished before; its stored result is shown" in i.value for i in other.info)
    assert other.button(key="recover_start").disabled

    assert at.text_input(key=f"recover_save_name.{outcome.record.run_id[:12]}").value == f"{PLAN}-subspace"
    at.button(key="recover_save").click().run()
    assert_clean(at)
    assert any(s.value.startswith(f"'{PLAN}-subspace' is in the saved plans") for s in at.success)
    saved = RankPlan.from_dict(at.session_state["alloc_saved_plans"][f"{PLAN}-subspace"])
    assert saved.recovery["run_id"] == outcome.record.run_id
    assert saved.metrics["perplexity"] == pytest.approx(result["after"]["perplexity"])
    assert f"{PLAN}-subspace" in PlanShelf(store.cache_dir).load()
    # a recovered plan is not offered for recovery again (runs do not stack) ...
    assert at.selectbox(key="recover_plan").options == [PLAN]
    # ... and it is ready to export
    at.switch_page("../pages/export.py").run()
    assert_clean(at)
    assert f"{PLAN}-subspace" in at.selectbox(key="export_saved_plan").options
    assert at.selectbox(key="export_saved_plan").value == f"{PLAN}-subspace"
    out = tmp_path / "recovered-export"
    at.text_input(key=f"export_dir.{PLAN}-subspace").set_value(str(out))
    at.number_input(key="export_new_tokens").set_value(4)
    at.number_input(key="export_runs").set_value(1)
    at.button(key="export_model").click().run()
    run_until(at, lambda a: any(m.label == "Reload check" for m in a.metric))
    assert_clean(at)
    assert metric_value(at, "Reload check") == "passed"
    assert float(metric_value(at, "Perplexity")) == pytest.approx(result["after"]["perplexity"], abs=2e-3)


def test_recover_page_shows_bad_settings_and_a_too_short_text_and_keeps_everything(workbench):
    store = open_store()
    plan = _plan(workbench, store)
    at = _open_recover(plan)
    _set(at, SHORT_RUN)
    at.number_input(key="recover_lr.subspace").set_value(0.0).run()
    assert not at.exception
    assert at.error[0].value == "Cannot start this recovery: The learning rate must be between 0 and 1, got 0.0."
    assert not [b for b in at.button if b.key == "recover_start"]

    at.number_input(key="recover_lr.subspace").set_value(2e-3)
    at.radio(key="recover_kind").set_value("basis").run()
    at.checkbox(key="recover_prune").check().run()  # 4 pruning rounds in 3 steps
    assert not at.exception
    assert "4 pruning rounds need more than 4 training steps (got 3)" in at.error[0].value

    _set(at, {"recover_steps": 6, "recover_prune_to": 0.05})  # the plan already removes more
    assert_clean(at)
    at.button(key="recover_start").click().run()
    run_until(at, lambda a: bool(a.error))
    assert not at.exception
    message = at.error[0].value
    assert "failed" in message and "does not prune" in message and "Give a larger reduction" in message

    at.checkbox(key="recover_prune").uncheck()
    _set(at, {"recover_training_windows": 100_000})  # far more windows than the tiny text holds
    at.button(key="recover_start").click().run()
    run_until(at, lambda a: any("cannot give this run its windows" in e.value for e in a.error))
    assert not at.exception
    assert "or a longer text" in next(e.value for e in at.error if "cannot give" in e.value)
    # nothing was lost: the settings and the saved plan are as they were
    assert at.number_input(key="recover_steps").value == 6 and at.radio(key="recover_kind").value == "basis"
    assert at.session_state["alloc_saved_plans"] == {PLAN: plan.to_dict()}


def test_recover_page_refuses_a_plan_of_another_model(workbench, tiny_model_dirs):
    qwen = ModelShapes.of(load_model(str(tiny_model_dirs["qwen2"]), open_store()))
    foreign = RankPlan.build(qwen, METHOD, {qwen.linears[-1].path: 8})
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("../pages/recover.py").run()
    assert_clean(at)
    assert any("No saved plans for this model to recover yet" in i.value for i in at.info)
    at.radio(key="recover_source").set_value("upload").run()
    upload = ("qwen.json", foreign.to_json().encode(), "application/json")
    at.file_uploader(key="recover_upload").set_value(upload).run()
    assert not at.exception and "was made for model" in at.error[0].value
    assert not [b for b in at.button if b.key == "recover_start"]


def test_recover_page_stops_a_run_at_a_checkpoint_and_resumes_it(workbench, monkeypatch):
    import app.tasks

    store = open_store()
    plan = _plan(workbench, store)
    pause, paused = threading.Event(), threading.Event()
    real_recover = app.tasks.recover

    def held_after_step_2(*args, on_step, **kwargs):
        """The real run, held after its second step until the test has pressed Stop (so the stop lands there)."""
        def report(step):
            on_step(step)
            if step.step == 2 and not paused.is_set():
                paused.set()
                pause.wait(60)
        return real_recover(*args, on_step=report, **kwargs)

    monkeypatch.setattr(app.tasks, "recover", held_after_step_2)
    at = _open_recover(plan)
    _set(at, {**SHORT_RUN, "recover_steps": 6, "recover_checkpoint_every": 100})  # only Stop checkpoints
    at.button(key="recover_start").click().run()
    assert paused.wait(60)
    at.run()
    assert "recovery_live_curve" in chart_keys(at)  # the two steps so far, live
    at.button(key=next(b.key for b in at.button if b.label == "Stop")).click().run()
    pause.set()
    run_until(at, lambda a: no_running_jobs(a) and bool(a.warning))
    assert not at.exception and not at.error
    assert "was stopped" in at.warning[0].value and "resume where it stopped" in at.warning[0].value
    assert any("checkpoint is kept: Resume recovery continues from it" in i.value for i in at.info)
    assert at.button(key="recover_start").proto.label == "Resume recovery"
    run_id = _run_id(plan, **{**SHORT_SETTINGS, "steps": 6, "checkpoint_every": 100})
    assert checkpoint_path(store, run_id).is_file()

    at.button(key="recover_start").click().run()
    run_until(at, _finished)
    assert_clean(at)
    assert any(s.value == "Finished, resumed from the checkpoint at step 2." for s in at.success)
    assert metric_value(at, "Steps") == "6" and not checkpoint_path(store, run_id).exists()
    from app.tasks import recovery_job_id, recovery_steps

    job_id = recovery_job_id(load_model(str(workbench["model"]), store), run_id)
    assert [s["step"] for s in recovery_steps(job_id)] == [1, 2, 3, 4, 5, 6]  # the live curve went on from step 2
    outcome = stored_outcome(store, run_id)
    assert outcome.result["resumed_from"] == 2
    assert [h["step"] for h in outcome.result["history"]] == [1, 2, 3, 4, 5, 6]


def test_recover_page_reads_a_training_text_file_only_inside_the_shared_roots(workbench, tiny_model_dirs, tmp_path,
                                                                              tmp_path_factory, monkeypatch):
    """Share mode (app/access.py): a training text file is read only inside the allowed roots, as the sidebar's."""
    store = open_store()
    plan = _plan(workbench, store)
    outside = tmp_path_factory.mktemp("outside") / "private.txt"
    outside.write_text("Not for the team. " * 200)
    inside = tmp_path / "target.txt"
    inside.write_text("A target application's text. " * 200)
    secret = "a shared secret"
    for name, value in (("RANKSCOPE_SHARE", "1"), ("RANKSCOPE_SECRET", secret),
                        ("RANKSCOPE_WORKSPACE", str(tmp_path / "workspace")),
                        ("RANKSCOPE_ALLOWED_ROOTS", os.pathsep.join([str(tmp_path),
                                                                     str(tiny_model_dirs["llama"].parent)]))):
        monkeypatch.setenv(name, value)
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["alloc_saved_plans"] = {PLAN: plan.to_dict()}
    at.run()
    at.text_input(key="access_secret").input(secret)
    at.button(key="access_enter").click().run()
    at.switch_page("../pages/recover.py").run()
    assert_clean(at)

    at.text_input(key="recover_text_file").input(str(outside)).run()
    assert not at.exception
    [error] = at.error
    assert error.value.startswith("Training text: This shared app reads a built-in text")
    assert str(outside) not in error.value
    assert not [b for b in at.button if b.key == "recover_start"]

    at.text_input(key="recover_text_file").input(str(inside)).run()
    assert_clean(at)
    assert any(f"from '{inside.resolve()}'" in c.value for c in at.caption)
    assert at.button(key="recover_start").proto.label == "Start recovery"


def test_recovery_summary_rows_read_a_plain_result():
    """The page's tables and curve come from plain dicts; a resumed run's repeated step counts once."""
    result = {"before": {"perplexity": 20.0, "kl_forward": 0.2, "kl_reverse": 0.1},
              "after": {"perplexity": 18.0, "kl_forward": 0.1, "kl_reverse": 0.1},
              "validation": {"text": "war-and-peace", "n_windows": 8, "before": 30.0, "after": None},
              "parameters": {"before": {"decoder_linear": {"dense": 100, "compressed": 80, "reduction": 0.2}},
                             "after": {"decoder_linear": {"dense": 100, "compressed": 60, "reduction": 0.4}}}}
    rows = quality_rows(result, {"text": "sherlock-holmes", "n_windows": 16})
    assert [r["measure"] for r in rows] == ["Perplexity", "KL(P_orig‖P_comp)", "KL(P_comp‖P_orig)",
                                            "Perplexity (held-out training text)"]
    assert rows[0]["on"] == "'sherlock-holmes', 16 windows" and rows[0]["change"] == pytest.approx(-0.1)
    assert rows[3]["after"] is None and rows[3]["change"] is None
    decoder, total = parameter_rows(result)
    assert decoder == {"parameters": "decoder linears", "dense": 100, "before": 80, "after": 60, "removed_before": 0.2,
                       "removed_after": 0.4}
    assert total["before"] is None and total["after"] is None
    history = [{"step": 1, "loss": 3.0, "validation_perplexity": None},
               {"step": 2, "loss": 2.9, "validation_perplexity": 25.0},
               {"step": 2, "loss": 2.8, "validation_perplexity": 24.0}]  # step 2 again, after a resume
    curve = history_rows(history, validation_before=30.0)
    assert [r["step"] for r in curve] == [0, 1, 2]
    assert loss_points(curve) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.8}]
    assert validation_points(curve) == [{"step": 0, "validation_perplexity": 30.0},
                                        {"step": 2, "validation_perplexity": 24.0}]

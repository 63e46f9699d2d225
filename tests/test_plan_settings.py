"""A plan reproduces itself: commands that take a plan run it with the plan's own settings.

Unit tests of `engine.compression.plan_settings` on a plan document (no model), then the CLI end to
end on the tiny llama: a plan made with non-default windows compresses, evaluates and exports with
no options and reproduces its recorded perplexity; a contradicting option fails before any work.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.compression.plan import PlanError, RankPlan
from engine.compression.plan_settings import plan_settings
from engine.texts.corpus import text_fingerprint
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing
from tests.tiny_models import TRAINING_TEXT


@pytest.fixture
def texts(tmp_path):
    calibration, evaluation = tmp_path / "calibration.txt", tmp_path / "evaluation.txt"
    calibration.write_text(TRAINING_TEXT * 4)
    evaluation.write_text(TRAINING_TEXT * 3 + "A different ending.")
    return calibration, evaluation


def _plan(calibration, evaluation, method="whiten") -> RankPlan:
    """A plan document as a session writes it (ranks do not matter here)."""
    return RankPlan(
        model={"id": "m", "fingerprint": "f", "model_type": "llama", "num_layers": 2}, method=method, ranks={"q": 8},
        calibration={"text": str(calibration), "text_fingerprint": text_fingerprint(str(calibration)),
                     "window_len": 64, "n_windows": 6, "n_groups": 3},
        evaluation={"text": str(evaluation), "text_fingerprint": text_fingerprint(str(evaluation)),
                    "window_len": 64, "n_windows": 2},
    )


def test_by_default_a_plan_runs_with_everything_it_recorded(texts):
    calibration, evaluation = texts
    run = plan_settings(_plan(calibration, evaluation))
    assert run.method == "whiten" and run.notes == ()
    assert run.texts == TextSettings(str(calibration), Windowing(64, 6), 3, str(evaluation), Windowing(64, 2))


def test_options_equal_to_the_plan_are_accepted(texts):
    calibration, evaluation = texts
    run = plan_settings(_plan(calibration, evaluation), method="whiten",
                        calibration={"text": str(calibration), "n_windows": 6, "window_len": 64, "n_groups": 3},
                        evaluation={"text": str(evaluation), "n_windows": 2, "window_len": 64})
    assert run.notes == () and run.texts.calibration_windowing == Windowing(64, 6)


@pytest.mark.parametrize("given,words", [
    ({"n_windows": 128}, "--calibration-windows 128 (the plan: 6)"),
    ({"n_groups": 32}, "--groups 32 (the plan: 3)"),
    ({"window_len": 512}, "--window-len 512 (the plan: 64)"),
])
def test_a_calibration_option_that_contradicts_the_plan_is_refused(texts, given, words):
    calibration, evaluation = texts
    with pytest.raises(PlanError, match="contradict") as caught:
        plan_settings(_plan(calibration, evaluation), calibration=given)
    assert words in str(caught.value) and "Leave those options out" in str(caught.value)


def test_another_method_is_refused_naming_both(texts):
    with pytest.raises(PlanError, match="made with method 'whiten'; --method svd contradicts it"):
        plan_settings(_plan(*texts), method="svd")


def test_a_moved_or_changed_calibration_text_is_refused_with_its_fingerprint_and_path(texts, tmp_path):
    calibration, evaluation = texts
    plan = _plan(calibration, evaluation)
    fingerprint = plan.calibration["text_fingerprint"][:12]
    moved = tmp_path / "moved" / "calibration.txt"
    moved.parent.mkdir()
    shutil.move(calibration, moved)
    with pytest.raises(PlanError, match=f"text is '{calibration}' with fingerprint {fingerprint}.*cannot be read"):
        plan_settings(plan)
    # located by content: the moved file is the plan's text
    assert plan_settings(plan, calibration={"text": str(moved)}).texts.calibration_text == str(moved)
    moved.write_text("other words entirely")
    with pytest.raises(PlanError, match=f"fingerprint {fingerprint}.*has other content"):
        plan_settings(plan, calibration={"text": str(moved)})


def test_another_evaluation_set_is_allowed_and_noted(texts, tmp_path):
    calibration, evaluation = texts
    other = tmp_path / "other.txt"
    other.write_text(TRAINING_TEXT * 5)
    run = plan_settings(_plan(calibration, evaluation), evaluation={"text": str(other), "n_windows": 3})
    assert run.texts.evaluation_text == str(other) and run.texts.evaluation_windowing == Windowing(64, 3)
    assert run.texts.calibration_windowing == Windowing(64, 6)  # the factors stay the plan's
    assert len(run.notes) == 1 and f"Evaluated on '{other}', 3 windows" in run.notes[0]
    assert f"measured on '{evaluation}', 2 windows" in run.notes[0]


def test_a_warm_start_may_take_other_settings_with_a_note(texts):
    calibration, evaluation = texts
    run = plan_settings(_plan(calibration, evaluation), method="feature-pca", calibration={"n_windows": 12},
                        transfer=True)
    assert run.method == "feature-pca" and run.texts.calibration_windowing == Windowing(64, 12)
    assert any("seeds a feature-pca study" in n for n in run.notes)
    assert any("the study calibrates on" in n and "12 windows" in n for n in run.notes)
    assert plan_settings(_plan(calibration, evaluation), transfer=True).notes == ()


def test_a_data_free_plan_ignores_calibration_options_with_a_note(texts):
    calibration, evaluation = texts
    plan = RankPlan.from_dict({**_plan(calibration, evaluation, "svd").to_dict(), "calibration": None})
    run = plan_settings(plan, calibration={"n_windows": 7})
    assert run.method == "svd" and "uses no calibration" in run.notes[0]


# -- the command line, end to end on the tiny llama -----------------------------------------------------------


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def made_plan(runner, tiny_model_dirs, sample_text_file, tmp_path):
    """A whiten plan made with non-default windows, groups and window length."""
    text = str(sample_text_file)
    plan_file = tmp_path / "plan.json"
    result = runner.invoke(app, ["compress", "--model", str(tiny_model_dirs["llama"]), "--method", "whiten",
                                 "--uniform", "0.3", "--calibration-text", text, "--calibration-windows", "8",
                                 "--groups", "2", "--eval-text", text, "--eval-windows", "3", "--window-len", "32",
                                 "--save-plan", str(plan_file), "--json"])
    assert result.exit_code == 0, result.output
    return plan_file, RankPlan.load(plan_file)


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_plan_compresses_evaluates_and_exports_with_no_options(runner, made_plan, tmp_path):
    plan_file, plan = made_plan
    recorded = plan.metrics["perplexity"]
    assert plan.calibration["n_windows"] == 8 and plan.calibration["n_groups"] == 2 and plan.method == "whiten"
    compressed = _json(runner.invoke(app, ["compress", "--plan", str(plan_file), "--json"]))
    assert compressed["method"] == "whiten" and compressed["notes"] == []
    assert compressed["compressed"]["perplexity"] == pytest.approx(recorded, rel=1e-5)
    assert compressed["texts"]["calibration"] == {k: plan.calibration[k] for k in ("text", "window_len", "n_windows",
                                                                                   "n_groups")}
    evaluated = _json(runner.invoke(app, ["evaluate", "--plan", str(plan_file), "--json"]))
    assert evaluated["perplexity"] == pytest.approx(recorded, rel=1e-5) and evaluated["windows"] == 3
    exported = _json(runner.invoke(app, ["export", "--plan", str(plan_file), "--out", str(tmp_path / "export"),
                                         "--new-tokens", "2", "--timing-runs", "1", "--json"]))
    assert exported["quality"]["reloaded"]["perplexity"] == pytest.approx(recorded, rel=1e-5)


def test_a_contradicting_option_fails_at_once_naming_both_values(runner, made_plan):
    plan_file, _ = made_plan
    for command in (["compress"], ["evaluate"], ["export", "--out", "never"]):
        start = time.perf_counter()
        result = runner.invoke(app, [*command, "--plan", str(plan_file), "--calibration-windows", "16"])
        seconds = time.perf_counter() - start
        assert result.exit_code == 2, result.output
        assert "--calibration-windows 16 (the plan: 8)" in result.stderr and "Traceback" not in result.output
        assert seconds < 1.0, f"{command[0]} took {seconds:.2f} s to refuse"


def test_evaluating_a_plan_on_another_text_says_so(runner, made_plan, tmp_path):
    plan_file, plan = made_plan
    other = tmp_path / "other.txt"
    other.write_text(TRAINING_TEXT[97:] * 6)  # other tokens in the first windows
    out = _json(runner.invoke(app, ["evaluate", "--plan", str(plan_file), "--eval-text", str(other), "--json"]))
    assert out["evaluation_text"] == str(other) and out["windows"] == 3
    assert len(out["notes"]) == 1 and "the plan's metrics were measured on" in out["notes"][0]
    assert out["perplexity"] != pytest.approx(plan.metrics["perplexity"], rel=1e-6)

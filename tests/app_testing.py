"""Shared AppTest set-up for the workbench page tests (`tests/test_app_*.py`).

Each page renders without an exception, shows its key widgets, runs its long action as a
background job (polled here as the browser's fragment would), and shows numbers that match the
engine's for the same settings. Small windows come from the environment variables the sidebar
reads (`app/workspace.py`); the texts are files written from the tiny tokenizer's training text.
Test modules import the `workbench` fixture from here.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
from streamlit.testing.v1 import AppTest

from engine.compression.session import CompressionSession
from engine.texts.settings import TextSettings
from engine.compression.units import ModelShapes
from engine.models.loading import load_model
from engine.paths import PROJECT_ROOT
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


def open_app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if page is not None:
        at.switch_page(f"../pages/{page}.py")
        at.run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def run_until(at: AppTest, condition, timeout: float = 90.0) -> None:
    """Rerun the page (as the polling fragment does) until `condition(at)` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if condition(at):
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out; errors: {[e.value for e in at.error]}, infos: {[i.value for i in at.info]}")


def metric_value(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def has_metric(label: str):
    return lambda at: any(m.label == label for m in at.metric)


@contextmanager
def guard_held_elsewhere(guard, holder: str):
    """Hold a model guard from another thread (as another tab's task would) until the block ends."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        with guard.hold(holder):
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(30), "the other thread never got the guard"
        yield
    finally:
        release.set()
        thread.join()


def no_running_jobs(at: AppTest) -> bool:
    return not any(b.label == "Stop" for b in at.button)


def chart_keys(at: AppTest) -> set[str]:
    return {chart.proto.id.rsplit("-", 1)[-1] for chart in at.get("plotly_chart")}


def engine_session(workbench, store) -> tuple[CompressionSession, ModelShapes]:
    loaded = load_model(str(workbench["model"]), store)
    session = CompressionSession.open(store, loaded, METHOD, workbench["texts"])
    return session, session.shapes

"""AppTest of the landing page (Model & texts) on a tiny model: renders, summarises, evaluates."""

from __future__ import annotations

import math

import pytest
from streamlit.testing.v1 import AppTest

from engine.paths import PROJECT_ROOT

APP = str(PROJECT_ROOT / "app" / "main.py")


@pytest.fixture
def app_on_tiny_model(tiny_model_dirs, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_MODEL", str(tiny_model_dirs["llama"]))
    at = AppTest.from_file(APP, default_timeout=120)
    return at


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_landing_page_shows_summary_and_perplexity(app_on_tiny_model):
    at = app_on_tiny_model
    at.run()
    at.sidebar.number_input(key="window_len").set_value(32)
    at.sidebar.number_input(key="evaluation_windows").set_value(2)
    at.run()
    assert not at.exception, at.exception
    assert not at.error
    assert _metric(at, "Architecture") == "llama"
    assert _metric(at, "Layers") == "2"
    perplexity = float(_metric(at, "Perplexity"))
    # an untrained model is close to uniform over its 320-token vocabulary
    assert 100 < perplexity < 1000 and math.isfinite(perplexity)
    assert _metric(at, "Predicted tokens") == "62"  # 2 windows x (32 - 1)


def test_landing_page_reports_a_missing_model_clearly(app_on_tiny_model):
    at = app_on_tiny_model
    at.run()
    at.sidebar.text_input(key="model_custom").set_value("/no/such/model").run()
    assert not at.exception
    assert at.error and "No model found for '/no/such/model'" in at.error[0].value

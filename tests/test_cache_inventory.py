"""What the cache holds for a model (`engine.store.cache_inventory`), answered from DuckDB alone."""

from __future__ import annotations

import pytest

from engine.compression.session import CompressionSession
from engine.texts.settings import TextSettings
from engine.compression.sweep import sweep_by_layer, sweep_by_type, sweep_id
from engine.models.loading import load_model
from engine.store.cache_inventory import cached_calibrations, cached_evaluations, cached_sweeps, find_sweep
from engine.texts.corpus import text_fingerprint
from engine.texts.windows import Windowing
from engine.cache.evaluation import ensure_baseline_evaluation
from engine.cache.calibration import ensure_calibration


def test_calibrations_and_evaluations_are_listed_with_text_names(store, tiny_model_dirs, sample_text_file):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    assert cached_calibrations(store, loaded.fingerprint) == [] and cached_evaluations(store, loaded.fingerprint) == []
    ensure_calibration(store, loaded, str(sample_text_file), Windowing(32, 4), 2)
    baseline = ensure_baseline_evaluation(store, loaded, str(sample_text_file), Windowing(16, 3))
    [calibration] = cached_calibrations(store, loaded.fingerprint)
    assert {k: calibration[k] for k in ("text", "window_len", "n_windows", "n_groups", "n_tokens")} == {
        "text": "sample", "window_len": 32, "n_windows": 4, "n_groups": 2, "n_tokens": 128}
    [evaluation] = cached_evaluations(store, loaded.fingerprint)
    assert evaluation["text"] == "sample" and evaluation["n_tokens"] == 3 * 15
    assert evaluation["perplexity"] == pytest.approx(baseline.perplexity)
    assert cached_calibrations(store, "another-model") == []


@pytest.mark.parametrize("method, needs_calibration", [("svd", False), ("feature-pca", True)])
def test_find_sweep_finds_exactly_the_session_sweep(store, tiny_model_dirs, sample_text_file, method,
                                                    needs_calibration):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    texts = TextSettings(str(sample_text_file), Windowing(32, 4), 2, str(sample_text_file), Windowing(32, 2))
    fingerprint = text_fingerprint(str(sample_text_file))

    def lookup(calibration_id, n_windows=2):
        return find_sweep(store, loaded.fingerprint, method, calibration_id, fingerprint, 32, n_windows)

    assert lookup("") is None
    session = CompressionSession.open(store, loaded, method, texts)
    calibration_id = session.calibration.record.calibration_id if needs_calibration else ""
    sweep_by_type(session, [0.5], ["q"])
    sweep_by_layer(session, "o", 0.5)
    found = lookup(calibration_id)
    assert found is not None and found.sweep_id == sweep_id(session)
    assert found.original_perplexity == pytest.approx(session.reference.perplexity)
    assert lookup(calibration_id, n_windows=3) is None  # another evaluation set
    if needs_calibration:
        assert lookup("") is None  # a sweep is tied to its calibration
    [summary] = cached_sweeps(store, loaded.fingerprint)
    assert (summary["method"], summary["points_by_type"], summary["points_by_layer"]) == (method, 1, 2)

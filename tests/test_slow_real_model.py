"""Slow checks on the real default model (`make test-slow`): full baseline perplexity and conversion."""

from __future__ import annotations

import pytest

from engine.models.loading import load_model
from engine.texts.windows import Windowing
from engine.cache.evaluation import ensure_baseline_evaluation

pytestmark = pytest.mark.slow


def test_original_perplexity_on_the_first_8192_tokens_of_sherlock_holmes(real_model_dir, store):
    """DESIGN.md and issue 2: a correct implementation gives about 29-31 on this text and windowing."""
    loaded = load_model(str(real_model_dir), store)
    record = ensure_baseline_evaluation(store, loaded, "sherlock-holmes", Windowing(512, 16))
    assert record.n_tokens == 16 * 511
    assert 27.0 < record.perplexity < 31.5
    # every window is predicted reasonably: no window is broken by the windowing
    assert max(record.window_nll) < 4.5 and min(record.window_nll) > 2.0

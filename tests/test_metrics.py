"""Perplexity: exp(mean NLL) over every predicted token, checked against the model's own logits."""

from __future__ import annotations

import math

import pytest
import torch

from engine.metrics import evaluate_perplexity
from engine.models.loading import load_model
from engine.progress import ProgressEvent
from engine.texts.corpus import Corpus
from engine.texts.windows import Windowing, make_windows
from tests.tiny_models import TRAINING_TEXT


@torch.no_grad()
def _manual_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """NLL of every predicted token, [N, L-1], float64, from one batched forward pass."""
    logits = model(input_ids=windows).logits.double()  # [N, L, V]
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    return -log_probs.gather(-1, windows[:, 1:].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_perplexity_is_exp_of_mean_nll(family, tiny_model_dirs, store):
    loaded = load_model(str(tiny_model_dirs[family]), store)
    windows = make_windows(Corpus("s", "s", TRAINING_TEXT * 4, "fp"), loaded.tokenizer, Windowing(24, 5))
    events: list[ProgressEvent] = []
    result = evaluate_perplexity(loaded.model, windows, progress=events.append)

    nll = _manual_nll(loaded.model, windows)
    assert result.n_tokens == 5 * 23 == nll.numel()
    assert len(result.window_nll) == 5
    assert result.mean_nll == pytest.approx(nll.mean().item(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert result.window_nll == pytest.approx(nll.mean(dim=1).tolist(), rel=1e-5)
    # a random model over a 320-token vocabulary is near uniform, not better than it by much
    assert 100 < result.perplexity < 1000
    assert len(set(round(v, 6) for v in result.window_nll)) > 1
    assert [e.done for e in events] == [0, 1, 2, 3, 4, 5] and events[-1].total == 5


def test_perplexity_counts_every_window_equally(tiny_model_dirs, store):
    loaded = load_model(str(tiny_model_dirs["qwen2"]), store)
    windows = make_windows(Corpus("s", "s", TRAINING_TEXT * 4, "fp"), loaded.tokenizer, Windowing(16, 3))
    whole = evaluate_perplexity(loaded.model, windows)
    parts = [evaluate_perplexity(loaded.model, windows[i : i + 1]) for i in range(3)]
    assert [p.n_tokens for p in parts] == [15, 15, 15]
    assert whole.window_nll == pytest.approx([p.mean_nll for p in parts], rel=1e-6)
    assert whole.mean_nll == pytest.approx(sum(p.mean_nll for p in parts) / 3, rel=1e-9)
    assert whole.perplexity == pytest.approx(math.exp(whole.mean_nll), rel=1e-12)

"""Perplexity: exp(mean NLL) over every predicted token, checked against the model's own logits; the one
next-token log-probability loop every metric consumes; and the single source of metric labels and definitions."""

from __future__ import annotations

import math

import pytest
import torch

from engine.metrics import compute_reference, evaluate_perplexity, evaluate_quality, next_token_logprobs
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


# -- the one forward loop ------------------------------------------------------------------------------------

def _tiny_windows(family: str, tiny_model_dirs, store, n: int = 4, length: int = 20):
    loaded = load_model(str(tiny_model_dirs[family]), store)
    return loaded, make_windows(Corpus("s", "s", TRAINING_TEXT * 4, "fp"), loaded.tokenizer, Windowing(length, n))


def test_next_token_logprobs_yields_one_normalized_entry_per_requested_window(tiny_model_dirs, store):
    loaded, windows = _tiny_windows("llama", tiny_model_dirs, store)
    vocab = loaded.model.config.vocab_size
    events: list[ProgressEvent] = []
    entries = list(next_token_logprobs(loaded.model, windows, [2, 0, 3], progress=events.append, stage="probe"))

    assert [e.index for e in entries] == [2, 0, 3]
    for entry in entries:
        assert entry.logp.shape == (windows.shape[1] - 1, vocab) and entry.logp.dtype == torch.float32
        assert torch.equal(entry.targets, windows[entry.index, 1:])
        row_mass = entry.logp.double().exp().sum(dim=-1)  # [L-1]
        torch.testing.assert_close(row_mass, torch.ones_like(row_mass), rtol=0, atol=1e-5)
        assert not entry.logp.requires_grad
    # the same numbers as the model's own logits for that window
    expected = torch.log_softmax(loaded.model(input_ids=windows[2:3]).logits[0, :-1].double(), dim=-1)
    torch.testing.assert_close(entries[0].logp.double(), expected, rtol=0, atol=1e-5)
    assert [(e.stage, e.done, e.total, e.unit) for e in events] == [("probe", d, 3, "windows") for d in range(4)]

    everything = list(next_token_logprobs(loaded.model, windows))
    assert [e.index for e in everything] == list(range(windows.shape[0]))


def test_perplexity_and_quality_agree_on_the_mean_nll(tiny_model_dirs, store):
    loaded, windows = _tiny_windows("gemma3", tiny_model_dirs, store, n=3)
    reference = compute_reference(loaded.model, windows)
    quality = evaluate_quality(loaded.model, windows, reference)
    plain = evaluate_perplexity(loaded.model, windows)

    manual = _manual_nll(loaded.model, windows)
    assert plain.mean_nll == pytest.approx(manual.mean().item(), rel=1e-5)
    assert quality.mean_nll == pytest.approx(plain.mean_nll, rel=1e-12)
    assert quality.window_nll == pytest.approx(plain.window_nll, rel=1e-12)
    assert quality.perplexity == pytest.approx(plain.perplexity, rel=1e-12)
    assert reference.perplexity == pytest.approx(plain.perplexity, rel=1e-12)
    assert quality.n_tokens == plain.n_tokens == 3 * 19
    assert abs(quality.kl_forward) < 1e-9 and abs(quality.kl_reverse) < 1e-9  # the model against itself


# -- metric labels and definitions, stated once -----------------------------------------------------------

def test_plan_and_analysis_take_metric_labels_and_definitions_from_one_place(tmp_path):
    import json

    from engine.analysis import METRIC_LABELS
    from engine.compression.plan import METRIC_DEFINITIONS, RankPlan
    from engine.compression.units import LinearShape, ModelShapes
    from engine.metric_definitions import METRICS, metric_definitions, metric_labels
    from engine.metrics import QualityResult

    assert list(METRICS) == ["perplexity", "kl_forward", "kl_reverse"]
    assert all(key == m.key for key, m in METRICS.items())
    assert METRIC_LABELS == metric_labels() == {key: m.label for key, m in METRICS.items()}
    assert METRIC_DEFINITIONS == metric_definitions() == {key: m.definition for key, m in METRICS.items()}
    # saved plans contain these exact strings
    assert METRIC_DEFINITIONS == {
        "perplexity": "exp(mean next-token negative log-likelihood) over all predicted tokens of the "
                      "evaluation windows",
        "kl_forward": "KL(P_orig || P_comp) per predicted token, averaged (nats)",
        "kl_reverse": "KL(P_comp || P_orig) per predicted token, averaged (nats)",
    }
    # every defined metric is a number the evaluation reports
    assert set(METRICS) <= set(QualityResult(1.0, 0.0, 0.0, 0.0, 1, [0.0]).to_dict())

    shapes = ModelShapes("m", "f" * 64, "llama", 1, (LinearShape("model.layers.0.q", 0, "q", 64, 64),), 4096)
    plan = RankPlan.build(shapes, "svd", {"model.layers.0.q": 16}).with_metrics(
        {"perplexity": 12.5, "kl_forward": 0.25, "kl_reverse": 0.125, "tokens": 10})
    saved = json.loads(plan.save(tmp_path / "plan.json").read_text())
    assert saved["metrics"]["definitions"] == {key: m.definition for key, m in METRICS.items()}
    assert RankPlan.load(tmp_path / "plan.json").metrics["definitions"] == METRIC_DEFINITIONS

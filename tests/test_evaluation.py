"""Quality metrics of compressed models: perplexity, forward/reverse KL, and the top-k reference."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from engine.compression.lowrank import compress_, restore_
from engine.compression.units import ModelShapes
from engine.methods import METHODS
from engine.metrics import compute_reference, evaluate_perplexity, evaluate_quality, exact_kl
from tests.tiny_models import TRAINING_TEXT, VOCAB_SIZE


class Setup:
    def __init__(self, loaded, windows):
        self.loaded, self.windows = loaded, windows
        self.factorization = METHODS["svd"].factorize(loaded, None)
        shapes = ModelShapes.of(loaded)
        self.half_ranks = {p: u.rank_for_ratio(0.5) for u in shapes.units("svd") for p in u.paths}

    @property
    def model(self):
        return self.loaded.model

    @torch.no_grad()
    def log_probs(self) -> torch.Tensor:
        """Full next-token log-probabilities `[N, L−1, V]` of the model as it is now."""
        rows = [self.model(input_ids=self.windows[i : i + 1], use_cache=False).logits[0, :-1]
                for i in range(self.windows.shape[0])]  # each [L-1, V]
        return F.log_softmax(torch.stack(rows), dim=-1)


@pytest.fixture(scope="module")
def setup(tiny_model_dirs, tmp_path_factory) -> Setup:
    from engine.models.loading import load_model
    from engine.store import open_store
    from engine.texts.corpus import load_corpus
    from engine.texts.windows import Windowing, make_windows

    root = tmp_path_factory.mktemp("evaluation")
    text = root / "evaluation.txt"
    text.write_text(TRAINING_TEXT * 4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKSCOPE_CACHE", str(root / "cache"))
        loaded = load_model(str(tiny_model_dirs["llama"]), open_store(root / "cache" / "rankscope.duckdb"))
        windows = make_windows(load_corpus(str(text)), loaded.tokenizer, Windowing(32, 4))
    yield Setup(loaded, windows)
    restore_(loaded.model)


@contextmanager
def compressed(setup: Setup):
    """The tiny model with every linear at the rank of a 0.5 ratio (svd), restored afterwards."""
    compress_(setup.model, setup.half_ranks, setup.factorization)
    try:
        yield setup.model
    finally:
        restore_(setup.model)


def test_reference_keeps_top_k_and_the_tail_mass(setup):
    reference = compute_reference(setup.model, setup.windows, top_k=16)
    n, length = setup.windows.shape
    assert reference.top_logprobs.shape == reference.top_indices.shape == (n, length - 1, 16)
    assert reference.tail_logmass.shape == (n, length - 1)
    total = torch.logsumexp(reference.top_logprobs, -1).exp() + reference.tail_logmass.exp()
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)
    assert (reference.top_logprobs[..., :-1] >= reference.top_logprobs[..., 1:]).all()  # descending
    exact = setup.log_probs()
    torch.testing.assert_close(reference.top_logprobs, exact.topk(16, -1).values, rtol=0, atol=1e-6)
    nll = -exact.gather(-1, setup.windows[:, 1:, None]).mean().item()
    assert reference.perplexity == pytest.approx(math.exp(nll), rel=1e-6)


def test_the_original_model_has_zero_kl_and_its_own_perplexity(setup):
    reference = compute_reference(setup.model, setup.windows, top_k=64)
    quality = evaluate_quality(setup.model, setup.windows, reference)
    perplexity = evaluate_perplexity(setup.model, setup.windows)
    assert abs(quality.kl_forward) < 1e-9 and abs(quality.kl_reverse) < 1e-9
    assert quality.perplexity == pytest.approx(perplexity.perplexity, rel=1e-6)
    assert quality.perplexity == pytest.approx(reference.perplexity, rel=1e-6)
    assert quality.n_tokens == perplexity.n_tokens == setup.windows.shape[0] * (setup.windows.shape[1] - 1)
    assert quality.window_nll == pytest.approx(perplexity.window_nll, rel=1e-6)
    assert 1.0 < quality.perplexity < 2 * VOCAB_SIZE  # an untrained model is near uniform over the vocabulary


def _exact_kls(original: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    forward, reverse = exact_kl(original.flatten(0, 1), other.flatten(0, 1))
    tokens = original.shape[0] * original.shape[1]
    return forward / tokens, reverse / tokens


def test_top_k_kl_with_the_whole_vocabulary_is_the_exact_kl(setup):
    original = setup.log_probs()
    reference = compute_reference(setup.model, setup.windows, top_k=VOCAB_SIZE)
    assert reference.top_k == VOCAB_SIZE
    with compressed(setup):
        approximated = setup.log_probs()
        quality = evaluate_quality(setup.model, setup.windows, reference)
    forward, reverse = _exact_kls(original, approximated)
    assert forward > 1e-4 and reverse > 1e-4
    assert quality.kl_forward == pytest.approx(forward, rel=1e-4)
    assert quality.kl_reverse == pytest.approx(reverse, rel=1e-4)
    nll = -approximated.gather(-1, setup.windows[:, 1:, None]).mean().item()
    assert quality.perplexity == pytest.approx(math.exp(nll), rel=1e-6)


def test_top_k_kl_is_a_lower_bound_that_grows_with_k(setup):
    original = setup.log_probs()
    references = {k: compute_reference(setup.model, setup.windows, top_k=k) for k in (1, 4, 16, 64, VOCAB_SIZE)}
    with compressed(setup):
        forward, reverse = _exact_kls(original, setup.log_probs())
        results = [evaluate_quality(setup.model, setup.windows, references[k]) for k in sorted(references)]
    for smaller, larger in zip(results, results[1:]):
        # merging tokens into one tail bucket can only lose divergence (coarse-graining)
        assert smaller.kl_forward <= larger.kl_forward + 1e-7
        assert smaller.kl_reverse <= larger.kl_reverse + 1e-7
    assert results[-1].kl_forward <= forward * (1 + 1e-4) and results[-1].kl_reverse <= reverse * (1 + 1e-4)
    assert results[0].kl_forward < 0.9 * forward  # top-1 misses a real part of it
    assert len({r.perplexity for r in results}) == 1  # perplexity does not depend on the reference


def test_window_indices_restrict_evaluation(setup):
    reference = compute_reference(setup.model, setup.windows, top_k=32)
    with compressed(setup):
        everything = evaluate_quality(setup.model, setup.windows, reference)
        some = evaluate_quality(setup.model, setup.windows, reference, window_indices=[3, 1])
    per_token = setup.windows.shape[1] - 1
    assert some.n_tokens == 2 * per_token and everything.n_tokens == 4 * per_token
    assert some.window_nll == pytest.approx([everything.window_nll[3], everything.window_nll[1]], rel=1e-6)
    assert some.mean_nll == pytest.approx((everything.window_nll[3] + everything.window_nll[1]) / 2, rel=1e-6)
    assert some.perplexity == pytest.approx(math.exp(some.mean_nll), rel=1e-12)
    assert some.perplexity != pytest.approx(everything.perplexity, rel=1e-6)


def test_a_compressed_session_plan_has_positive_kl(store, tiny_model_dirs, sample_text_file):
    from engine.compression.lowrank import compressed_paths
    from engine.compression.session import CompressionSession
    from engine.texts.settings import TextSettings
    from engine.models.loading import load_model
    from engine.texts.windows import Windowing

    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    texts = TextSettings(str(sample_text_file), Windowing(32, 16), 4, str(sample_text_file), Windowing(32, 4))
    session = CompressionSession.open(store, loaded, "svd", texts)
    original = session.original_quality()
    assert original["perplexity"] == pytest.approx(evaluate_perplexity(loaded.model, session.windows).perplexity,
                                                   rel=1e-6)
    plan = session.evaluate(session.uniform_plan(0.5))
    assert compressed_paths(loaded.model) == []  # evaluation restores the original modules
    metrics = plan.metrics
    assert metrics["kl_forward"] > 1e-4 and metrics["kl_reverse"] > 1e-4
    assert metrics["perplexity"] != pytest.approx(original["perplexity"], rel=1e-4)
    assert metrics["tokens"] == original["tokens"] == 4 * 31
    decoder = plan.parameters["decoder_linear"]
    assert decoder["compressed"] <= round(0.5 * decoder["dense"])
    # the same ranks evaluated directly give the same numbers
    direct = session.evaluate_ranks(plan.ranks)
    assert direct.kl_forward == pytest.approx(metrics["kl_forward"], rel=1e-9)
    assert direct.perplexity == pytest.approx(metrics["perplexity"], rel=1e-9)
    some = session.evaluate_ranks(plan.ranks, window_indices=[0])
    assert some.n_tokens == 31 and some.window_nll == pytest.approx(direct.window_nll[:1], rel=1e-9)

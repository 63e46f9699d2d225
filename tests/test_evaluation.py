"""Quality metrics of compressed models: perplexity, exact forward/reverse KL, and the hidden-state reference."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from engine.compression.lowrank import compress_, restore_
from engine.compression.units import ModelShapes
from engine.methods import METHODS
from engine.metrics import (
    ReferenceDistribution, compute_reference, evaluate_perplexity, evaluate_quality, exact_kl, head_logits,
)
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


def test_reference_keeps_the_final_hidden_states_and_gives_back_the_exact_distribution(setup):
    reference = compute_reference(setup.model, setup.windows)
    n, length = setup.windows.shape
    assert reference.hidden.shape == (n, length - 1, setup.model.config.hidden_size)
    exact = setup.log_probs()  # [N, L-1, V]
    for i in range(n):
        torch.testing.assert_close(reference.logprobs(setup.model, i), exact[i], rtol=0, atol=1e-5)
    nll = -exact.gather(-1, setup.windows[:, 1:, None]).mean().item()
    assert reference.perplexity == pytest.approx(math.exp(nll), rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_the_head_turns_final_hidden_states_into_the_models_own_logits(tiny_model_dirs, family, tmp_path):
    """Exact KL rests on this: the LM head of the captured hidden states is the forward's logits, in every
    supported family (Gemma's scaled embeddings and untied Qwen2 heads included)."""
    from engine.models.loading import load_model
    from engine.store.duckdb_store import Store

    store = Store(tmp_path / "rankscope.duckdb")
    try:
        model = load_model(str(tiny_model_dirs[family]), store).model
    finally:
        store.close()
    ids = torch.randint(3, VOCAB_SIZE, (2, 24))
    reference = compute_reference(model, ids)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # [2, L-1, V]
    torch.testing.assert_close(head_logits(model, reference.hidden), logits, rtol=1e-5, atol=1e-5)


def test_windows_beyond_the_memory_budget_are_recomputed_with_the_same_values(setup):
    roomy = compute_reference(setup.model, setup.windows)
    tight = ReferenceDistribution(roomy.hidden, roomy.perplexity, memory_bytes=0)
    with compressed(setup):
        a = evaluate_quality(setup.model, setup.windows, roomy)
        b = evaluate_quality(setup.model, setup.windows, tight)
    assert len(roomy._kept) == setup.windows.shape[0] and tight._kept == {}
    assert (a.kl_forward, a.kl_reverse, a.perplexity) == (b.kl_forward, b.kl_reverse, b.perplexity)


def test_the_original_model_has_zero_kl_and_its_own_perplexity(setup):
    reference = compute_reference(setup.model, setup.windows)
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


def test_both_kls_are_exact(setup):
    original = setup.log_probs()
    reference = compute_reference(setup.model, setup.windows)
    with compressed(setup):
        approximated = setup.log_probs()
        quality = evaluate_quality(setup.model, setup.windows, reference)
    forward, reverse = _exact_kls(original, approximated)
    assert forward > 1e-4 and reverse > 1e-4 and forward != pytest.approx(reverse, rel=1e-3)
    assert quality.kl_forward == pytest.approx(forward, rel=1e-4)
    assert quality.kl_reverse == pytest.approx(reverse, rel=1e-4)
    p, q = original.exp(), approximated.exp()  # the definitions, written out
    assert forward == pytest.approx(float((p * (original - approximated)).sum(-1).mean()), rel=1e-4)
    assert reverse == pytest.approx(float((q * (approximated - original)).sum(-1).mean()), rel=1e-4)
    nll = -approximated.gather(-1, setup.windows[:, 1:, None]).mean().item()
    assert quality.perplexity == pytest.approx(math.exp(nll), rel=1e-6)


def test_window_indices_restrict_evaluation(setup):
    reference = compute_reference(setup.model, setup.windows)
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

"""`exact_kl`'s one-pass, chunked form against the plain formula `Σ P·(log P − log Q)` both ways, and
`window_quality` (log-softmax, NLL and both KLs from the logits in one chunked pass) against them."""

import pytest
import torch
import torch.nn.functional as F

from engine.metrics import _KL_ROWS, exact_kl, token_nll, window_quality


def _plain_kl(logp: torch.Tensor, logq: torch.Tensor) -> tuple[float, float]:
    p, q = logp.double().exp(), logq.double().exp()
    return float((p * (logp.double() - logq.double())).sum()), float((q * (logq.double() - logp.double())).sum())


@pytest.mark.parametrize("positions", [1, _KL_ROWS, 3 * _KL_ROWS + 5])
@pytest.mark.parametrize("spread", [1e-4, 0.3, 3.0])
def test_exact_kl_equals_the_plain_formula_both_ways(positions, spread):
    generator = torch.Generator().manual_seed(positions)
    logits = 4 * torch.randn(positions, 1000, generator=generator)
    logp = F.log_softmax(logits, dim=-1)
    logq = F.log_softmax(logits + spread * torch.randn(positions, 1000, generator=generator), dim=-1)
    forward, reverse = exact_kl(logp, logq)
    expected_forward, expected_reverse = _plain_kl(logp, logq)
    assert forward == pytest.approx(expected_forward, rel=1e-5, abs=1e-6 * positions)
    assert reverse == pytest.approx(expected_reverse, rel=1e-5, abs=1e-6 * positions)
    # and the two fused KL divergences it replaced
    assert forward == pytest.approx(float(F.kl_div(logq, logp, reduction="sum", log_target=True)), rel=1e-5, abs=1e-6 * positions)
    assert reverse == pytest.approx(float(F.kl_div(logp, logq, reduction="sum", log_target=True)), rel=1e-5, abs=1e-6 * positions)
    if spread >= 0.3:  # at 1e-4 the KLs (~1e-8 a position) are below float32 rounding of log P − log Q
        assert forward > 0 and reverse > 0


def test_exact_kl_of_a_distribution_with_itself_is_zero():
    logp = F.log_softmax(torch.randn(2 * _KL_ROWS + 1, 500, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert exact_kl(logp, logp.clone()) == (0.0, 0.0)


@pytest.mark.parametrize("positions", [1, _KL_ROWS, 3 * _KL_ROWS + 5])
@pytest.mark.parametrize("spread", [1e-4, 0.3, 3.0])
def test_window_quality_equals_log_softmax_then_nll_and_exact_kl(positions, spread):
    generator = torch.Generator().manual_seed(positions + 7)
    reference_logits = 4 * torch.randn(positions, 1000, generator=generator)
    logits = reference_logits + spread * torch.randn(positions, 1000, generator=generator)
    targets = torch.randint(0, 1000, (positions,), generator=generator)
    logp = F.log_softmax(reference_logits, dim=-1)
    logq = F.log_softmax(logits, dim=-1)
    nll, forward, reverse = window_quality(logits.clone(), targets, logp, logp.exp())
    assert torch.allclose(nll, token_nll(logq, targets), rtol=1e-6, atol=1e-6)
    expected_forward, expected_reverse = _plain_kl(logp, logq)
    assert forward == pytest.approx(expected_forward, rel=1e-5, abs=1e-6 * positions)
    assert reverse == pytest.approx(expected_reverse, rel=1e-5, abs=1e-6 * positions)
    same_forward, same_reverse = exact_kl(logp, logq)  # what evaluations computed before, to float rounding
    assert forward == pytest.approx(same_forward, rel=1e-5, abs=1e-6 * positions)
    assert reverse == pytest.approx(same_reverse, rel=1e-5, abs=1e-6 * positions)


def test_window_quality_of_the_reference_itself_is_zero_kl():
    logits = torch.randn(2 * _KL_ROWS + 3, 500, generator=torch.Generator().manual_seed(3))
    logp = F.log_softmax(logits, dim=-1)
    _nll, forward, reverse = window_quality(logits.clone(), torch.zeros(logits.shape[0], dtype=torch.long), logp,
                                            logp.exp())
    assert abs(forward) < 1e-5 and abs(reverse) < 1e-5

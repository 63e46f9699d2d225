"""`exact_kl`'s one-pass, chunked form against the plain formula `Σ P·(log P − log Q)` both ways."""

import pytest
import torch
import torch.nn.functional as F

from engine.metrics import _KL_ROWS, exact_kl


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

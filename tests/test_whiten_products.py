"""whiten's block products (triangular `W S`, lower-triangle Gram) on matrices wider than one block,
against plain products and the SVD of the whitened weight."""

import pytest
import torch

from engine.methods import whiten
from engine.methods.whiten import _lower_gram, _times_lower_triangular, cholesky_with_ridge, whitened_factors


def _second_moment(d: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(3 * d, d, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("shape", [(300, 200), (200, 301), (290, 290)])
def test_block_products_equal_the_full_ones(shape):
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, generator=generator, dtype=torch.float64)
    S = cholesky_with_ridge(_second_moment(shape[1], generator))
    X = _times_lower_triangular(w, S)
    torch.testing.assert_close(X, w @ S, rtol=1e-12, atol=1e-12)
    full = X.T @ X
    gram = _lower_gram(X)
    torch.testing.assert_close(gram.tril(), full.tril(), rtol=1e-12, atol=1e-12 * full.abs().max().item())
    torch.testing.assert_close(torch.linalg.eigvalsh(gram), torch.linalg.eigvalsh(full), rtol=1e-10, atol=1e-12 * full.abs().max().item())


@pytest.mark.parametrize("shape", [(300, 200), (200, 301), (290, 290)])
def test_whitened_factors_of_matrices_wider_than_a_block_match_the_svd_up_to_sign(shape):
    assert max(shape) > whiten._BLOCK  # several blocks, the last one partial
    generator = torch.Generator().manual_seed(6)
    w = torch.randn(*shape, generator=generator, dtype=torch.float64)
    S = cholesky_with_ridge(_second_moment(shape[1], generator))
    B, A = whitened_factors(w, S)
    U, sigma, Vh = torch.linalg.svd(w @ S, full_matrices=False)
    B_ref, A_ref = U * sigma, torch.linalg.solve_triangular(S, Vh, upper=False, left=False)
    scale = w.abs().max().item()
    for r in (1, 50, min(shape) // 2, min(shape)):
        torch.testing.assert_close(B[:, :r] @ A[:r], B_ref[:, :r] @ A_ref[:r], rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(B.abs(), B_ref.abs(), rtol=1e-6, atol=1e-9 * B_ref.abs().max().item())
    torch.testing.assert_close(A.abs(), A_ref.abs(), rtol=1e-6, atol=1e-9 * A_ref.abs().max().item())

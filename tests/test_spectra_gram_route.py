"""Spectra from the smaller side's Gram matrix equal the direct route (SVD of W, eigenvalues of W C Wᵀ).

The Gram route resolves an energy only to about 1e-16 × the largest (see `engine.spectra`), so energies are compared
with an absolute tolerance of `1e-10 ×` the largest: loose enough for rounding, far too tight for a wrong matrix.
"""

from __future__ import annotations

import pytest
import torch

from engine import spectra as spectra_module
from engine.spectra import (
    activation_weighted_energies, compute_feature_spectra, covariance_factor, feature_eigenvalues,
    weight_singular_values,
)

SHAPES = [(48, 20), (20, 48), (24, 24), (7, 30)]  # wider out (like gate/up), wider in (like down), square, k/v-like


def _assert_energies_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=1e-10 * expected.max().item())


def _random_covariance(d_in: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A PSD covariance of the given rank with a wide eigenvalue range, like a calibration's."""
    mixing = torch.randn(d_in, rank, generator=generator, dtype=torch.float64) * torch.logspace(1, -2, rank,
                                                                                                 dtype=torch.float64)
    return mixing @ mixing.T


def _direct_feature_eigenvalues(weight: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    w = weight.to(torch.float64)
    return torch.linalg.eigvalsh(w @ covariance @ w.T).flip(0).clamp_min(0.0)[: min(w.shape)]


@pytest.mark.parametrize("shape", SHAPES)
def test_weight_energies_equal_the_squared_svd(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    values = weight_singular_values(weight)
    direct = torch.linalg.svdvals(weight.to(torch.float64))
    assert values.dtype == torch.float64 and (values[:-1] >= values[1:]).all()
    _assert_energies_close(values.square(), direct.square())


def test_weight_energies_of_a_rank_deficient_weight_keep_the_zeros():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 16, generator=generator,
                                                                                         dtype=torch.float64)
    values = weight_singular_values(weight)
    assert values.shape == (16,)
    _assert_energies_close(values.square(), torch.linalg.svdvals(weight).square())
    assert (values[3:] <= 1e-7 * values[0]).all()  # σ of a zero energy: √(rounding), ~1e-8 × σ_max


@pytest.mark.parametrize("rank_share", [1.0, 0.25])  # random (full rank) and rank-deficient (singular) C
@pytest.mark.parametrize("shape", SHAPES)
def test_feature_eigenvalues_equal_the_eigenvalues_of_w_c_wt(shape, rank_share):
    d_out, d_in = shape
    generator = torch.Generator().manual_seed(4)
    covariance = _random_covariance(d_in, max(1, int(rank_share * d_in)), generator)
    weight = torch.randn(d_out, d_in, generator=generator)
    direct = _direct_feature_eigenvalues(weight, covariance)
    _assert_energies_close(feature_eigenvalues(weight, covariance), direct)
    _assert_energies_close(feature_eigenvalues(weight, covariance, covariance_factor(covariance)), direct)


def test_covariance_factor_reproduces_a_singular_covariance():
    covariance = _random_covariance(12, 4, torch.Generator().manual_seed(5))
    factor = covariance_factor(covariance)
    torch.testing.assert_close(factor @ factor.T, covariance, rtol=0.0, atol=1e-12 * covariance.abs().max().item())


def test_a_wrong_factor_fails_the_tolerance():
    """The comparisons above can fail: a factor of another covariance, or `V·diag(λ)` instead of `V·diag(√λ)`."""
    generator = torch.Generator().manual_seed(6)
    covariance, other = _random_covariance(20, 20, generator), _random_covariance(20, 20, generator)
    weight = torch.randn(48, 20, generator=generator)
    direct = _direct_feature_eigenvalues(weight, covariance)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    for wrong in (covariance_factor(other), eigenvectors * eigenvalues.clamp_min(0.0)[None, :]):
        with pytest.raises(AssertionError):
            _assert_energies_close(feature_eigenvalues(weight, covariance, wrong), direct)


@pytest.mark.parametrize("shape", SHAPES)
def test_activation_weighted_energies_equal_the_squared_svd_of_w_d(shape):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(*shape, generator=generator)
    norm = torch.rand(shape[1], generator=generator, dtype=torch.float64) * 5.0 + 0.01
    direct = torch.linalg.svdvals(weight.to(torch.float64) * norm[None, :]).square()
    _assert_energies_close(activation_weighted_energies(weight, norm), direct)


def test_feature_spectra_factor_each_site_once(tiny_model_dirs, store, sample_text_file, monkeypatch):
    """gate and up share the MLP input: one factor for both; q/k/v/o/down (d_out ≤ d_in) need none."""
    from engine.cache.calibration import ensure_calibration
    from engine.models.loading import load_model
    from engine.texts.windows import Windowing

    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    statistics = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 4), n_groups=2).statistics
    factored = []
    real_factor = spectra_module.covariance_factor
    monkeypatch.setattr(spectra_module, "covariance_factor", lambda c: factored.append(c) or real_factor(c))
    rows = compute_feature_spectra(loaded.linears(), statistics, "pooled")
    wider_out_sites = {(ref.layer, ref.site) for ref in loaded.linears() if ref.shape[0] > ref.shape[1]}
    assert wider_out_sites and len(factored) == len(wider_out_sites)
    refs = {(ref.layer, ref.linear_type): ref for ref in loaded.linears()}
    for row in rows:
        ref = refs[(row.layer, row.linear_type)]
        direct = _direct_feature_eigenvalues(ref.module.weight, statistics.site(row.layer, ref.site).pooled_covariance)
        _assert_energies_close(torch.tensor(row.values, dtype=torch.float64), direct)

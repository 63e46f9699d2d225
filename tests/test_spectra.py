"""Spectra: weight singular values, feature eigenvalues, energy ranks and their storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.cache import spectra as spectra_cache
from engine.cache.lookups import stored_spectra
from engine.energy import ENERGY_LEVELS, energy_curve, rank_for_energy, rank_table, summarise_by_type
from engine.models.adapters import LINEAR_TYPES
from engine.models.loading import load_model
from engine.spectra import feature_eigenvalues, weight_singular_values
from engine.records import SpectrumRow
from engine.texts.windows import Windowing
from engine.cache.calibration import ensure_calibration
from engine.cache.spectra import ensure_spectra


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_weight_singular_values_match_numpy(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    values = weight_singular_values(weight)
    assert values.dtype == torch.float64 and values.shape == (min(shape),)
    expected = np.linalg.svd(weight.double().numpy(), compute_uv=False)
    # energies σ², to 1e-10 × the largest (the Gram route's precision, see engine.spectra)
    np.testing.assert_allclose(values.numpy() ** 2, expected ** 2, rtol=0, atol=1e-10 * expected[0] ** 2)
    assert (values[:-1] >= values[1:]).all()


@pytest.mark.parametrize("d_out, d_in", [(6, 10), (10, 6)])
def test_feature_eigenvalues_are_the_spectrum_of_the_output_covariance(d_out, d_in):
    rng = np.random.default_rng(0)
    # inputs with a known, strongly anisotropic covariance C = L Lᵀ
    mixing = rng.normal(size=(d_in, d_in)) * np.linspace(3.0, 0.1, d_in)
    known_cov = mixing @ mixing.T
    x = rng.multivariate_normal(np.zeros(d_in), known_cov, size=20_000)  # [n, d_in]
    empirical_cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(empirical_cov, known_cov, atol=0.1 * np.abs(known_cov).max())
    weight = rng.normal(size=(d_out, d_in))

    values = feature_eigenvalues(torch.from_numpy(weight), torch.from_numpy(empirical_cov))
    output_cov = np.cov(x @ weight.T, rowvar=False)  # covariance of W x, measured directly
    expected = np.sort(np.linalg.eigvalsh(output_cov))[::-1][: min(d_out, d_in)]
    assert values.shape == (min(d_out, d_in),)
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-9, atol=1e-10 * expected.max())
    assert (values >= 0).all() and (values[:-1] >= values[1:]).all()
    # and against the known covariance, up to sampling error
    from_known = np.sort(np.linalg.eigvalsh(weight @ known_cov @ weight.T))[::-1][: min(d_out, d_in)]
    np.testing.assert_allclose(values.numpy()[:3], from_known[:3], rtol=0.1)


def test_rank_for_energy_on_hand_made_spectra():
    assert rank_for_energy([3.0, 1.0], 0.9, squared=True) == 1  # 9 / 10 of the energy
    assert rank_for_energy([3.0, 1.0], 0.95, squared=True) == 2
    assert rank_for_energy([3.0, 1.0], 0.75, squared=False) == 1  # 3 / 4 unsquared
    assert rank_for_energy([3.0, 1.0], 0.8, squared=False) == 2
    assert rank_for_energy([5.0, 4.0, 3.0, 2.0, 1.0], 1.0, squared=True) == 5
    assert rank_for_energy([0.5, 0.25, 0.125, 0.125], 1.0, squared=False) == 4
    assert rank_for_energy([0.5, 0.25, 0.125, 0.125], 0.75, squared=False) == 2
    assert rank_for_energy([2.0, 2.0, 2.0, 2.0], 0.5, squared=True) == 2
    np.testing.assert_allclose(np.asarray(energy_curve([3.0, 1.0], squared=True)), [0.9, 1.0])
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="Energy fraction"):
            rank_for_energy([1.0], bad, squared=True)


def _row(layer, linear_type, values, d_out=4, d_in=4):
    return SpectrumRow(layer, linear_type, d_out, d_in, values)


def test_rank_table_and_summary_on_hand_made_rows():
    weight = [_row(0, "q", [3.0, 1.0, 0.0, 0.0]), _row(1, "q", [1.0, 1.0, 1.0, 1.0]), _row(0, "down", [1.0, 0.0, 0.0, 0.0], 4, 8)]
    feature = [_row(0, "q", [9.0, 1.0, 0.0, 0.0]), _row(1, "q", [1.0, 1.0, 1.0, 1.0]), _row(0, "down", [2.0, 2.0, 0.0, 0.0], 4, 8)]
    table = rank_table(weight, feature, levels=(0.5, 0.9, 0.95))
    assert [(r["layer"], r["type"], r["full_rank"]) for r in table] == [(0, "q", 4), (1, "q", 4), (0, "down", 4)]
    assert table[0]["weight_rank"] == {"0.5": 1, "0.9": 1, "0.95": 2}
    assert table[0]["feature_rank"] == {"0.5": 1, "0.9": 1, "0.95": 2}
    assert table[1]["weight_rank"] == {"0.5": 2, "0.9": 4, "0.95": 4}
    assert table[2]["feature_rank"] == {"0.5": 1, "0.9": 2, "0.95": 2}

    summary = {row["type"]: row for row in summarise_by_type(table, 0.9)}
    assert set(summary) == {"q", "down"}
    assert summary["q"]["weight_rank_share"] == pytest.approx((1 / 4 + 4 / 4) / 2)
    assert summary["q"]["feature_rank_share"] == pytest.approx((1 / 4 + 4 / 4) / 2)
    assert summary["down"]["feature_rank_share"] == pytest.approx(2 / 4)


@pytest.fixture
def tiny_calibration(tiny_model_dirs, store, sample_text_file):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    calibration = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 4), n_groups=2)
    return loaded, calibration


def _by_key(rows):
    return {(r.layer, r.linear_type): r for r in rows}


def test_ensure_spectra_stores_one_row_per_linear(tiny_calibration, store):
    loaded, calibration = tiny_calibration
    spectra = ensure_spectra(store, loaded, calibration, "pooled")
    keys = {(ref.layer, ref.linear_type) for ref in loaded.linears()}
    assert len(keys) == 2 * len(LINEAR_TYPES)

    stored_weight = store.get_weight_spectra(loaded.fingerprint)
    stored_feature = store.get_feature_spectra(calibration.record.calibration_id, "pooled")
    assert len(stored_weight) == len(stored_feature) == len(keys)
    assert set(_by_key(stored_weight)) == set(_by_key(stored_feature)) == keys
    assert store.get_feature_spectra(calibration.record.calibration_id, "sample") == []

    refs = {(ref.layer, ref.linear_type): ref for ref in loaded.linears()}
    for key, row in _by_key(stored_weight).items():
        module = refs[key].module
        assert (row.d_out, row.d_in) == tuple(module.weight.shape)
        direct = np.linalg.svd(module.weight.detach().double().numpy(), compute_uv=False)
        np.testing.assert_allclose(np.square(row.values), direct ** 2, rtol=0, atol=1e-10 * direct[0] ** 2)
        assert _by_key(spectra.weight)[key].values == row.values
    for key, row in _by_key(stored_feature).items():
        site = calibration.statistics.site(key[0], refs[key].site)
        w = refs[key].module.weight.detach().double().numpy()
        direct = np.sort(np.linalg.eigvalsh(w @ site.pooled_covariance.numpy() @ w.T))[::-1][: min(w.shape)]
        np.testing.assert_allclose(row.values, direct, rtol=0, atol=1e-10 * direct[0])
        assert len(row.values) == min(row.d_out, row.d_in)
        assert _by_key(spectra.feature)[key].values == row.values


def test_ensure_spectra_second_call_reads_the_store(tiny_calibration, store, monkeypatch):
    loaded, calibration = tiny_calibration
    first = ensure_spectra(store, loaded, calibration, "pooled")

    def must_not_run(*args, **kwargs):
        raise AssertionError("spectra were recomputed")

    monkeypatch.setattr(spectra_cache, "compute_weight_spectra", must_not_run)
    monkeypatch.setattr(spectra_cache, "compute_feature_spectra", must_not_run)
    second = ensure_spectra(store, loaded, calibration, "pooled")
    assert _by_key(second.weight) == _by_key(first.weight)
    assert _by_key(second.feature) == _by_key(first.feature)
    assert stored_spectra(store, loaded.fingerprint, calibration.record.calibration_id, "pooled") is not None
    assert stored_spectra(store, loaded.fingerprint, calibration.record.calibration_id, "sample") is None
    with pytest.raises(AssertionError, match="recomputed"):  # another covariance is a miss
        ensure_spectra(store, loaded, calibration, "sample")


def test_sample_and_pooled_feature_spectra_differ(tiny_calibration, store):
    loaded, calibration = tiny_calibration
    pooled = _by_key(ensure_spectra(store, loaded, calibration, "pooled").feature)
    sample = _by_key(ensure_spectra(store, loaded, calibration, "sample").feature)
    assert set(pooled) == set(sample)
    assert any(not np.allclose(pooled[k].values, sample[k].values) for k in pooled)


def test_rank_table_of_a_tiny_model(tiny_calibration, store):
    loaded, calibration = tiny_calibration
    spectra = ensure_spectra(store, loaded, calibration)
    table = rank_table(spectra.weight, spectra.feature)
    assert len(table) == 2 * len(LINEAR_TYPES)
    levels = [f"{lv:g}" for lv in ENERGY_LEVELS]
    for row in table:
        assert row["full_rank"] == min(row["d_out"], row["d_in"])
        weight_ranks = [row["weight_rank"][lv] for lv in levels]
        feature_ranks = [row["feature_rank"][lv] for lv in levels]
        assert weight_ranks == sorted(weight_ranks) and feature_ranks == sorted(feature_ranks)
        assert 1 <= weight_ranks[0] and weight_ranks[-1] <= row["full_rank"]
        assert 1 <= feature_ranks[0] and feature_ranks[-1] <= row["full_rank"]
    summary = summarise_by_type(table, 0.9)
    assert sorted(row["type"] for row in summary) == sorted(LINEAR_TYPES)
    full = {row["type"]: row["full_rank"] for row in summary}
    assert full == {"q": 32, "k": 16, "v": 16, "o": 32, "gate": 32, "up": 32, "down": 32}
    for row in summary:
        assert 0 < row["weight_rank_share"] <= 1 and 0 < row["feature_rank_share"] <= 1
    # random weights spread their energy: 90% needs most of the rank; features concentrate more
    assert all(row["weight_rank_share"] > 0.5 for row in summary)


def test_stored_spectra_keep_canonical_order(tiny_calibration, store):
    """A cached answer lists the matrices in the same order as a fresh one: by layer, then q..down."""
    loaded, calibration = tiny_calibration
    first = ensure_spectra(store, loaded, calibration)
    second = ensure_spectra(store, loaded, calibration)
    canonical = [(ref.layer, ref.linear_type) for ref in loaded.linears()]
    for rows in (first.weight, first.feature, second.weight, second.feature):
        assert [(r.layer, r.linear_type) for r in rows] == canonical

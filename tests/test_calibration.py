"""Calibration statistics: streamed values against a direct computation, grouping, and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.calibration import CalibrationStatistics, collect_statistics, group_assignment
from engine.errors import CorpusError
from engine.records import CalibrationRecord
from engine.models.adapters import SITES
from engine.models.loading import load_model
from engine.paths import cache_root
from engine.texts.corpus import Corpus
from engine.texts.windows import Windowing, make_windows
from engine.cache.calibration import ensure_calibration
from tests.tiny_models import TRAINING_TEXT

SITE_LINEAR = {"attn_in": "q", "o_in": "o", "mlp_in": "gate", "down_in": "down"}
TOL = 1e-8


def _windows(loaded, n_windows: int, window_len: int) -> torch.Tensor:
    corpus = Corpus("sample", "sample", TRAINING_TEXT * 4, "fp")
    return make_windows(corpus, loaded.tokenizer, Windowing(window_len, n_windows))


@torch.no_grad()
def _captured_inputs(loaded, windows: torch.Tensor) -> dict[tuple[int, str], list[np.ndarray]]:
    """Each site's input per window, [L, d] float64, captured with our own pre-hooks."""
    captured: dict[tuple[int, str], list[np.ndarray]] = {}
    handles = []
    for layer in range(loaded.num_layers):
        for site, linear_type in SITE_LINEAR.items():
            module = loaded.model.get_submodule(loaded.adapter.linear_path(layer, linear_type))

            def hook(_module, args, key=(layer, site)):
                captured.setdefault(key, []).append(args[0][0].to(torch.float64).numpy().copy())

            handles.append(module.register_forward_pre_hook(hook))
    try:
        for index in range(windows.shape[0]):
            loaded.model(input_ids=windows[index : index + 1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _reference(per_window: list[np.ndarray], groups: list[int]) -> dict[str, np.ndarray]:
    x = np.concatenate(per_window)  # [n, d]
    n = x.shape[0]
    group_ids = sorted(set(groups))
    group_covs = [np.cov(np.concatenate([w for w, g in zip(per_window, groups) if g == gid]), rowvar=False) for gid in group_ids]
    return {
        "mean": x.mean(axis=0),
        "second_moment": x.T @ x / n,
        "covariance": np.cov(x, rowvar=False, ddof=1),
        "pooled_covariance": np.mean(group_covs, axis=0),
        "l2_norm": np.sqrt((x**2).sum(axis=0)),
        "n_tokens": n,
    }


@pytest.mark.parametrize(
    "family, n_windows, n_groups",
    [("llama", 6, 2), ("qwen2", 6, 3), ("gemma3", 6, 2), ("llama", 7, 3), ("gemma3", 5, 1)],
)
def test_streamed_statistics_match_direct_computation(family, n_windows, n_groups, tiny_model_dirs, store):
    """With float64 products the streamed, batched statistics equal a direct float64 computation to rounding."""
    loaded = load_model(str(tiny_model_dirs[family]), store)
    windows = _windows(loaded, n_windows, 16)
    stats = collect_statistics(loaded.model, loaded.adapter, windows, n_groups=n_groups, product_dtype=torch.float64)
    captured = _captured_inputs(loaded, windows)
    groups = group_assignment(n_windows, n_groups)

    assert set(stats.sites) == {(layer, site) for layer in range(loaded.num_layers) for site in SITES}
    assert stats.n_groups == n_groups
    for key, per_window in captured.items():
        assert len(per_window) == n_windows
        expected = _reference(per_window, groups)
        site = stats.site(*key)
        assert site.n_tokens == expected["n_tokens"] == n_windows * 16
        for name in ("mean", "second_moment", "covariance", "pooled_covariance", "l2_norm"):
            value = getattr(site, name)
            assert value.dtype == torch.float64
            np.testing.assert_allclose(value.numpy(), expected[name], rtol=0, atol=TOL, err_msg=f"{family} {key} {name}")
        # the pooled covariance removes between-group mean shifts, so it differs from the plain one
        if n_groups > 1:
            assert not np.allclose(expected["pooled_covariance"], expected["covariance"], atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_default_float32_products_keep_every_statistic_within_1e_6(family, tiny_model_dirs, store):
    """The engine's default (float32 product per batch, float64 sums) against float64 products, window by window."""
    loaded = load_model(str(tiny_model_dirs[family]), store)
    windows = _windows(loaded, 7, 16)
    fast = collect_statistics(loaded.model, loaded.adapter, windows, n_groups=3)
    exact = collect_statistics(loaded.model, loaded.adapter, windows, n_groups=3, tokens_per_batch=16,
                               product_dtype=torch.float64)
    worst = 0.0
    for key, site in exact.sites.items():
        for name in ("mean", "second_moment", "covariance", "pooled_covariance", "l2_norm"):
            a, b = getattr(fast.site(*key), name), getattr(site, name)
            worst = max(worst, float(torch.linalg.norm(a - b) / torch.linalg.norm(b)))
    assert 0 < worst < 1e-6  # float32 products do differ, by less than the target


def test_batching_windows_does_not_change_the_statistics(tiny_model_dirs, store):
    loaded = load_model(str(tiny_model_dirs["qwen2"]), store)
    windows = _windows(loaded, 6, 16)
    one = collect_statistics(loaded.model, loaded.adapter, windows, 3, tokens_per_batch=16, product_dtype=torch.float64)
    many = collect_statistics(loaded.model, loaded.adapter, windows, 3, tokens_per_batch=64, product_dtype=torch.float64)
    for key, site in one.sites.items():
        torch.testing.assert_close(many.site(*key).pooled_covariance, site.pooled_covariance, rtol=0, atol=1e-10)
        torch.testing.assert_close(many.site(*key).second_moment, site.second_moment, rtol=0, atol=1e-10)


def test_uneven_groups_are_weighted_per_group_not_per_token(tiny_model_dirs, store):
    """With 7 windows in 3 groups (3, 2, 2) a token-weighted pooling would give a different answer."""
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    windows = _windows(loaded, 7, 16)
    stats = collect_statistics(loaded.model, loaded.adapter, windows, n_groups=3, product_dtype=torch.float64)
    per_window = _captured_inputs(loaded, windows)[(1, "down_in")]
    groups = group_assignment(7, 3)
    covs = [np.cov(np.concatenate([w for w, g in zip(per_window, groups) if g == gid]), rowvar=False) for gid in range(3)]
    token_weighted = (3 * covs[0] + 2 * covs[1] + 2 * covs[2]) / 7
    pooled = stats.site(1, "down_in").pooled_covariance.numpy()
    np.testing.assert_allclose(pooled, np.mean(covs, axis=0), rtol=0, atol=TOL)
    assert np.abs(pooled - token_weighted).max() > 1e-6


def test_group_assignment_is_consecutive_and_balanced():
    assert group_assignment(7, 3) == [0, 0, 0, 1, 1, 2, 2]
    assert group_assignment(4, 4) == [0, 1, 2, 3]
    assert group_assignment(5, 1) == [0] * 5
    sizes = np.bincount(group_assignment(128, 32))
    assert sizes.tolist() == [4] * 32


@pytest.mark.parametrize("n_windows, n_groups", [(4, 5), (4, 0), (3, -1)])
def test_group_assignment_rejects_impossible_groups(n_windows, n_groups):
    with pytest.raises(CorpusError, match=f"{n_groups} groups"):
        group_assignment(n_windows, n_groups)


def test_collect_statistics_rejects_more_groups_than_windows(tiny_model_dirs, store):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    with pytest.raises(CorpusError, match="at least 5 calibration windows, got 4"):
        collect_statistics(loaded.model, loaded.adapter, _windows(loaded, 4, 8), n_groups=5)


def test_tensor_round_trip_keeps_every_statistic(tiny_model_dirs, store):
    loaded = load_model(str(tiny_model_dirs["qwen2"]), store)
    stats = collect_statistics(loaded.model, loaded.adapter, _windows(loaded, 4, 8), n_groups=2)
    again = CalibrationStatistics.from_tensors(stats.to_tensors(), stats.n_groups)
    assert set(again.sites) == set(stats.sites)
    for key, site in stats.sites.items():
        other = again.sites[key]
        assert other.n_tokens == site.n_tokens == 32
        for name in ("mean", "second_moment", "pooled_covariance", "l2_norm", "covariance"):
            assert torch.equal(getattr(other, name), getattr(site, name))


# -- the cache ------------------------------------------------------------------------------------


def _assert_same_statistics(a: CalibrationStatistics, b: CalibrationStatistics) -> None:
    assert set(a.sites) == set(b.sites)
    for key in a.sites:
        for name in ("mean", "second_moment", "pooled_covariance", "l2_norm"):
            assert torch.equal(getattr(a.sites[key], name), getattr(b.sites[key], name)), (key, name)
        assert a.sites[key].n_tokens == b.sites[key].n_tokens


def test_ensure_calibration_hits_the_cache_second_time(tiny_model_dirs, store, sample_text_file):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    text = str(sample_text_file)
    first = ensure_calibration(store, loaded, text, Windowing(16, 4), n_groups=2)
    second = ensure_calibration(store, loaded, text, Windowing(16, 4), n_groups=2)
    assert first.from_cache is False and second.from_cache is True
    assert second.record == first.record
    assert first.record.n_tokens == 64 and first.record.n_windows == 4 and first.record.add_bos is False
    _assert_same_statistics(first.statistics, second.statistics)
    assert [r.calibration_id for r in store.records(CalibrationRecord, loaded.fingerprint)] == [first.record.calibration_id]


@pytest.mark.parametrize(
    "windowing, n_groups",
    [(Windowing(16, 6), 2), (Windowing(12, 4), 2), (Windowing(16, 4), 4)],
    ids=["more-windows", "shorter-windows", "more-groups"],
)
def test_other_settings_miss_the_cache(windowing, n_groups, tiny_model_dirs, store, sample_text_file):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    base = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 4), n_groups=2)
    other = ensure_calibration(store, loaded, str(sample_text_file), windowing, n_groups)
    assert other.from_cache is False
    assert other.record.calibration_id != base.record.calibration_id
    assert other.record.n_tokens == windowing.window_len * windowing.n_windows
    assert len(store.records(CalibrationRecord, loaded.fingerprint)) == 2


def test_other_text_or_model_misses_the_cache(tiny_model_dirs, store, sample_text_file, tmp_path):
    llama = load_model(str(tiny_model_dirs["llama"]), store)
    base = ensure_calibration(store, llama, str(sample_text_file), Windowing(16, 4), n_groups=2)

    reversed_text = tmp_path / "other.txt"
    reversed_text.write_text(" ".join(reversed(sample_text_file.read_text().split())))
    other_text = ensure_calibration(store, llama, str(reversed_text), Windowing(16, 4), n_groups=2)
    assert other_text.from_cache is False
    assert other_text.record.text_fingerprint != base.record.text_fingerprint
    assert not torch.equal(other_text.statistics.site(0, "o_in").mean, base.statistics.site(0, "o_in").mean)

    sample_text_file.write_text(sample_text_file.read_text().replace("fox", "cat"))
    edited = ensure_calibration(store, llama, str(sample_text_file), Windowing(16, 4), n_groups=2)
    assert edited.from_cache is False

    qwen = load_model(str(tiny_model_dirs["qwen2"]), store)
    assert ensure_calibration(store, qwen, str(reversed_text), Windowing(16, 4), n_groups=2).from_cache is False


def test_deleted_array_file_is_recomputed(tiny_model_dirs, store, sample_text_file):
    loaded = load_model(str(tiny_model_dirs["gemma3"]), store)
    first = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 4), n_groups=2)
    assert first.record.add_bos is True
    entry = store.array_entry(first.record.array_id)
    path = cache_root() / entry["relpath"]
    assert path.is_file() and path.suffix == ".safetensors"
    path.unlink()

    again = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 4), n_groups=2)
    assert again.from_cache is False
    assert path.is_file()
    _assert_same_statistics(first.statistics, again.statistics)
    assert ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 4), n_groups=2).from_cache is True

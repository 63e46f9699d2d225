"""Calibration one decoder layer at a time: the same statistics as a whole-model run, bit for bit, in bounded memory."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from engine.cache.calibration import ensure_calibration
from engine.calibration import (WHOLE_MODEL_MEMORY_LIMIT, CalibrationStatistics, calibrates_by_layer,
                                collect_statistics, whole_model_memory)
from engine.cli import app
from engine.errors import RankScopeError
from engine.models.adapters import CHAINED_LAYER_MODEL_TYPES, adapter_for_model_type
from engine.models.loading import load_model
from engine.records import CalibrationRecord
from engine.texts.windows import Windowing
from tests.tiny_models import tiny_family_model

NAMES = ("mean", "second_moment", "covariance", "pooled_covariance", "l2_norm")


def _assert_same(a: CalibrationStatistics, b: CalibrationStatistics, stored_forms: bool = True) -> None:
    if stored_forms:
        assert a.to_tensors().keys() == b.to_tensors().keys()
        for name, tensor in a.to_tensors().items():
            assert torch.equal(tensor, b.to_tensors()[name]), name
    assert set(a.sites) == set(b.sites)
    for key in a.sites:
        assert a.site(*key).n_tokens == b.site(*key).n_tokens
        for name in NAMES:
            assert torch.equal(getattr(a.site(*key), name), getattr(b.site(*key), name)), (key, name)


@pytest.mark.parametrize("model_type", CHAINED_LAYER_MODEL_TYPES)
@pytest.mark.parametrize("n_windows, n_groups, per_batch", [(12, 4, 4), (11, 3, 3)], ids=["even", "uneven"])
def test_by_layer_gives_the_whole_model_statistics_bit_for_bit(model_type, n_windows, n_groups, per_batch):
    model = tiny_family_model(model_type)  # Gemma3: sliding and global layers, windows longer than the sliding window
    adapter = adapter_for_model_type(model_type)
    windows = torch.randint(0, 97, (n_windows, 24), generator=torch.Generator().manual_seed(1))
    kwargs = dict(n_groups=n_groups, tokens_per_batch=per_batch * 24)
    events = []
    whole = collect_statistics(model, adapter, windows, by_layer=False, **kwargs)
    layered = collect_statistics(model, adapter, windows, by_layer=True, progress=events.append, **kwargs)
    _assert_same(layered, whole)
    assert [(e.done, e.total, e.unit) for e in events] == [(i, 4, "layers") for i in range(5)]
    # the model is left as it was: no replayed forward, no hook
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_the_layer_by_layer_result_holds_the_stored_form_only_and_loads_back_the_same():
    model = tiny_family_model("llama")
    adapter = adapter_for_model_type("llama")
    windows = torch.randint(0, 97, (8, 24), generator=torch.Generator().manual_seed(2))
    layered = collect_statistics(model, adapter, windows, n_groups=4, by_layer=True)
    assert not isinstance(layered.sites, dict)  # sites derived on first use, from the stored form
    _assert_same(CalibrationStatistics.from_tensors(layered.to_tensors(), 4), layered, stored_forms=False)


def test_the_choice_follows_the_memory_a_whole_model_run_would_take(monkeypatch):
    model = tiny_family_model("qwen2")
    adapter = adapter_for_model_type("qwen2")
    # 4 layers x (3 sites of 32 channels + the down input of 48) x 4 float64 d x d matrices
    assert whole_model_memory(model, adapter) == 4 * (3 * 32 * 32 + 48 * 48) * 4 * 8
    assert calibrates_by_layer(model, adapter) is False
    assert calibrates_by_layer(model, adapter, by_layer=True) is True
    monkeypatch.setattr("engine.calibration.WHOLE_MODEL_MEMORY_LIMIT", whole_model_memory(model, adapter) - 1)
    assert calibrates_by_layer(model, adapter) is True
    assert WHOLE_MODEL_MEMORY_LIMIT == 4 * 2**30


def test_by_layer_is_refused_for_a_forward_that_does_not_chain_its_layers(tiny_model_dirs, store):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    loaded.model.config.model_type = "exotic"  # what a family without a proven chained forward looks like
    with pytest.raises(RankScopeError, match="model type 'exotic' is not one of llama, mistral"):
        calibrates_by_layer(loaded.model, loaded.adapter, by_layer=True)
    assert calibrates_by_layer(loaded.model, loaded.adapter) is False  # never chosen by itself


def test_calibrate_by_layer_from_the_command_line_stores_what_a_whole_model_run_reads(
        tiny_model_dirs, sample_text_file, store, monkeypatch, tmp_path):
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "cli-cache"))
    runner = CliRunner()
    args = ["calibrate", "--model", str(tiny_model_dirs["llama"]), "--text", str(sample_text_file),
            "--windows", "8", "--window-len", "16", "--groups", "4", "--by-layer", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    from engine.store import open_store
    cli_store = open_store()
    loaded = load_model(str(tiny_model_dirs["llama"]), cli_store)
    stored = ensure_calibration(cli_store, loaded, str(sample_text_file), Windowing(16, 8), 4)
    assert stored.from_cache
    fresh = ensure_calibration(store, load_model(str(tiny_model_dirs["llama"]), store), str(sample_text_file),
                               Windowing(16, 8), 4, by_layer=False)
    assert not fresh.from_cache and fresh.record.calibration_id == stored.record.calibration_id
    _assert_same(stored.statistics, fresh.statistics, stored_forms=False)
    assert cli_store.get_record(CalibrationRecord, stored.record.calibration_id) is not None


def test_ensure_calibration_by_layer_writes_the_whole_model_file_and_reads_sites_from_it(
        tiny_model_dirs, sample_text_file, store, tmp_path):
    from engine.store import open_store
    from engine.store.arrays import load_arrays

    loaded = load_model(str(tiny_model_dirs["qwen2"]), store)
    layered = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 8), 4, by_layer=True)
    other = open_store(tmp_path / "whole" / "rankscope.duckdb")
    whole = ensure_calibration(other, load_model(str(tiny_model_dirs["qwen2"]), other), str(sample_text_file),
                               Windowing(16, 8), 4, by_layer=False)
    assert layered.record.calibration_id == whole.record.calibration_id
    written, expected = load_arrays(store, layered.record.array_id), load_arrays(other, whole.record.array_id)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[name], expected[name]) for name in expected)
    assert not isinstance(layered.statistics.sites, dict)  # read from the file site by site
    _assert_same(layered.statistics, whole.statistics, stored_forms=False)
    again = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 8), 4)
    assert again.from_cache
    _assert_same(again.statistics, whole.statistics, stored_forms=False)


def test_a_large_stored_calibration_is_read_site_by_site_and_keeps_few_sites_derived(
        tiny_model_dirs, sample_text_file, store, monkeypatch):
    import engine.cache.calibration as cached_calibration
    import engine.calibration as calibration

    loaded = load_model(str(tiny_model_dirs["qwen2"]), store)
    whole = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 8), 4, by_layer=False)
    read_whole = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 8), 4)
    # a small file is read whole: its sites' stored tensors are in memory
    assert read_whole.from_cache and isinstance(next(iter(read_whole.statistics.sites._stored.values())), dict)
    monkeypatch.setattr(cached_calibration, "FILE_READ_BY_SITE_BYTES", 0)
    one_site = calibration._site_bytes(whole.statistics.site(0, "mlp_in"))
    monkeypatch.setattr(calibration, "DERIVED_SITES_MEMORY_BYTES", 2 * one_site)
    by_site = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 8), 4)
    assert by_site.from_cache
    sites = by_site.statistics.sites
    assert isinstance(next(iter(sites._stored.values())), calibration._FileTensors)  # nothing read until used
    _assert_same(by_site.statistics, whole.statistics, stored_forms=False)  # every site, derived again after eviction
    kept = sites._derived
    assert 1 <= len(kept) < len(sites) and sum(map(calibration._site_bytes, kept.values())) <= 2 * one_site
    assert list(kept)[-1] == list(sites)[-1]  # the most recently used are the ones kept


def test_replaced_forwards_give_back_a_forward_another_library_set_on_the_instance():
    from torch import nn

    from engine.models.replay import replaced_forwards

    plain, hooked = nn.Linear(2, 2), nn.Linear(2, 2)
    wrapped = hooked.forward
    hooked.forward = lambda x: wrapped(x) * 0  # as accelerate's device hooks set it
    own = hooked.forward
    with replaced_forwards([plain, hooked], lambda *_a, **_k: "replayed"):
        assert plain(torch.zeros(2)) == "replayed" and hooked(torch.zeros(2)) == "replayed"
    assert "forward" not in plain.__dict__ and hooked.forward is own
    with pytest.raises(RuntimeError):
        with replaced_forwards([plain], lambda *_a: None):
            raise RuntimeError("a failing forward")
    assert "forward" not in plain.__dict__


def test_spectra_of_a_model_calibrated_by_layer_say_no_preview_comes_and_match_a_whole_model_run(
        tiny_model_dirs, sample_text_file, store, monkeypatch, tmp_path):
    from engine.cache.spectra import ensure_all_spectra
    from engine.store import open_store

    text, windowing = str(sample_text_file), Windowing(8, 16)
    whole_store = open_store(tmp_path / "whole" / "rankscope.duckdb")
    whole = ensure_all_spectra(whole_store, load_model(str(tiny_model_dirs["llama"]), whole_store), text, windowing, 8)
    monkeypatch.setattr("engine.calibration.WHOLE_MODEL_MEMORY_LIMIT", 0)  # every model is "too large" now
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    previews = []
    layered = ensure_all_spectra(store, loaded, text, windowing, 8, preview=previews.append)
    assert len(previews) == 1 and not previews[0].has_features and previews[0].by_layer  # weights only, no snapshots
    assert previews[0].describe().startswith("calibrating layer by layer") and "16 windows" in previews[0].describe()
    assert not isinstance(layered.calibration.statistics.sites, dict)  # read from the file written by layer
    assert layered.spectra.feature == whole.spectra.feature and layered.weighted == whole.weighted

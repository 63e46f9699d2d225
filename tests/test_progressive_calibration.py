"""Progressive calibration: snapshots of the statistics while windows arrive, their spectra, and what is stored."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from engine.cache.calibration import ensure_calibration
from engine.cache.lookups import find_calibration
from engine.cache.spectra import ensure_all_spectra
from engine.calibration import collect_statistics, group_assignment, snapshot_points
from engine.cli import app
from engine.models.loading import load_model
from engine.records import CalibrationRecord
from engine.texts.corpus import Corpus
from engine.texts.windows import Windowing, make_windows
from tests.tiny_models import TRAINING_TEXT

NAMES = ("mean", "second_moment", "covariance", "pooled_covariance", "l2_norm")


def _windows(loaded, n_windows: int, window_len: int = 16) -> torch.Tensor:
    corpus = Corpus("sample", "sample", TRAINING_TEXT * 40, "fp")
    return make_windows(corpus, loaded.tokenizer, Windowing(window_len, n_windows))


def _assert_equal(a, b) -> None:
    assert set(a.sites) == set(b.sites)
    for key in a.sites:
        assert a.site(*key).n_tokens == b.site(*key).n_tokens
        for name in NAMES:
            assert torch.equal(getattr(a.site(*key), name), getattr(b.site(*key), name)), (key, name)


def test_snapshot_points_double_and_fall_on_group_and_batch_boundaries():
    assert snapshot_points(group_assignment(128, 32)) == [8, 16, 32, 64]
    assert snapshot_points(group_assignment(128, 32), (5,)) == [8]  # the next group boundary
    assert snapshot_points(group_assignment(36, 12)) == [9, 18, 33]  # groups of 3 windows
    assert snapshot_points(group_assignment(8, 4)) == []  # the final statistics are no snapshot
    assert snapshot_points(group_assignment(16, 1)) == []  # one group: no boundary before the end


@pytest.mark.parametrize("n_windows, n_groups, per_batch", [(20, 10, 3), (23, 7, 4)], ids=["even", "uneven"])
def test_snapshots_equal_a_collection_over_the_windows_so_far_and_leave_the_final_untouched(
        n_windows, n_groups, per_batch, tiny_model_dirs, store):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    windows = _windows(loaded, n_windows)
    tokens_per_batch = per_batch * windows.shape[1]
    snapshots = []
    final = collect_statistics(loaded.model, loaded.adapter, windows, n_groups, tokens_per_batch=tokens_per_batch,
                               snapshot=snapshots.append, snapshot_windows=(4, 8, 16))
    one_shot = collect_statistics(loaded.model, loaded.adapter, windows, n_groups, tokens_per_batch=tokens_per_batch,
                                  snapshot_windows=(4, 8, 16))
    _assert_equal(final, one_shot)  # bit for bit: the same batches, with or without snapshots
    assert final.to_tensors().keys() == one_shot.to_tensors().keys()
    assert all(torch.equal(t, one_shot.to_tensors()[name]) for name, t in final.to_tensors().items())

    groups = group_assignment(n_windows, n_groups)
    expected = snapshot_points(groups, (4, 8, 16))
    assert [s.windows_done for s in snapshots] == expected and expected
    for snap in snapshots:
        done = snap.windows_done
        assert snap.windows_total == n_windows and snap.statistics.stored_form is None
        assert snap.statistics.n_groups == groups[done - 1] + 1  # whole groups only
        prefix = collect_statistics(loaded.model, loaded.adapter, windows[:done], snap.statistics.n_groups,
                                    tokens_per_batch=tokens_per_batch, snapshot_windows=(4, 8, 16))
        _assert_equal(snap.statistics, prefix)


def test_only_the_final_statistics_are_stored_and_key_the_spectra(tiny_model_dirs, store, sample_text_file):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    text, windowing = str(sample_text_file), Windowing(8, 16)
    previews = []
    result = ensure_all_spectra(store, loaded, text, windowing, 8, preview=previews.append)
    assert [p.windows_done for p in previews] == [0, 8]  # weights at once, then the snapshot after 8 windows
    assert not previews[0].has_features and previews[0].spectra.weight == result.spectra.weight
    assert previews[1].describe() == "refining: 8/16 windows" and previews[1].spectra.calibration_id == ""
    assert len(previews[1].spectra.feature) == len(result.spectra.feature) == len(previews[1].weighted)
    assert previews[1].spectra.feature != result.spectra.feature  # half the windows: other values

    [record] = store.records(CalibrationRecord, loaded.fingerprint)
    assert record.n_windows == 16 and record == find_calibration(store, loaded.fingerprint, text, windowing, 8)
    assert result.spectra.calibration_id == record.calibration_id
    again = ensure_calibration(store, loaded, text, windowing, 8)
    assert again.from_cache
    plain = collect_statistics(loaded.model, loaded.adapter, make_windows_like(store, loaded, text, windowing), 8)
    _assert_equal(again.statistics, plain)

    # from the store: no previews
    previews.clear()
    assert ensure_all_spectra(store, loaded, text, windowing, 8, preview=previews.append).spectra == result.spectra
    assert previews == []


def make_windows_like(store, loaded, text, windowing):
    from engine.cache.windows import ensure_windows

    return ensure_windows(store, loaded, text, windowing)


def test_cli_spectra_prints_refining_snapshots_then_the_final_result(tiny_model_dirs, sample_text_file):
    args = ["spectra", "--model", str(tiny_model_dirs["llama"]), "--windows", "16", "--window-len", "8",
            "--groups", "8", "--text", str(sample_text_file)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "no calibration needed" in out and "refining: 8/16 windows" in out
    assert out.index("refining: 8/16 windows") < out.index("(computed;")  # the final summary comes last
    again = CliRunner().invoke(app, args)
    assert "refining" not in again.stdout and "from the store" in again.stdout
    as_json = CliRunner().invoke(app, [*args, "--json"])
    assert as_json.exit_code == 0 and as_json.stdout.lstrip().startswith("{")  # JSON only: the final result

"""LoRAP's views on a tiny model: activation-weighted spectra and Table 1, and the MLP pruning sweeps."""

from __future__ import annotations

import numpy as np
import pytest

from engine.analysis.sensitivity_summary import mlp_curve_rows, mlp_layer_ratios, mlp_layer_rows
from engine.analysis.spectra_summary import LORAP_LEVEL, lorap_table, lorap_table_rows
from engine.cache import spectra as spectra_cache
from engine.cache.calibration import ensure_calibration
from engine.cache.spectra import ensure_activation_weighted_spectra, ensure_spectra
from engine.compression.pruning import PruningSettings
from engine.compression.session import CompressionSession
from engine.compression.sweep import (
    ALL_LAYERS, MLP_LOW_RANK, MLP_PRUNE, kept_for_ratio, mlp_point_plan, mlp_sweep_id, mlp_sweep_id_for,
    sweep_by_type, sweep_id, sweep_mlp_by_layer, sweep_mlp_by_type,
)
from engine.compression.units import count_parameters
from engine.energy import rank_for_energy
from engine.errors import RankScopeError
from engine.models.loading import load_model
from engine.records import ACTIVATION_WEIGHTED, SpectrumRow
from engine.spectra import activation_weighted_energies
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing

RATIOS = (0.25, 0.5)


# -- activation-weighted spectra and LoRAP's Table 1 ----------------------------------------------------------


@pytest.fixture
def tiny_calibration(tiny_model_dirs, store, sample_text_file):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    return loaded, ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 4), n_groups=2)


def test_activation_weighted_energies_are_the_squared_singular_values_of_w_times_the_norms():
    rng = np.random.default_rng(3)
    import torch

    weight, norm = rng.normal(size=(6, 9)), rng.uniform(0.1, 5.0, size=9)
    values = activation_weighted_energies(torch.from_numpy(weight).float(), torch.from_numpy(norm))
    expected = np.linalg.svd(weight.astype(np.float32).astype(np.float64) @ np.diag(norm), compute_uv=False) ** 2
    assert values.dtype == torch.float64 and values.shape == (6,)
    np.testing.assert_allclose(values.numpy(), expected, rtol=0, atol=1e-10 * expected.max())  # Gram-route precision
    # and they are the eigenvalues of W·D²·Wᵀ: the feature spectrum of the diagonal input weighting D²
    w = weight.astype(np.float32).astype(np.float64)
    eigen = np.sort(np.linalg.eigvalsh(w @ np.diag(norm ** 2) @ w.T))[::-1]
    np.testing.assert_allclose(values.numpy(), eigen, rtol=0, atol=1e-10 * eigen.max())


def test_activation_weighted_spectra_of_a_tiny_model_match_a_direct_svd_and_are_stored(tiny_calibration, store,
                                                                                        monkeypatch):
    loaded, calibration = tiny_calibration
    rows = ensure_activation_weighted_spectra(store, loaded, calibration)
    refs = {(ref.layer, ref.linear_type): ref for ref in loaded.linears()}
    assert [(r.layer, r.linear_type) for r in rows] == list(refs)
    for row in rows:
        ref = refs[(row.layer, row.linear_type)]
        norm = calibration.statistics.site(row.layer, ref.site).l2_norm.numpy()
        direct = np.linalg.svd(ref.module.weight.detach().double().numpy() @ np.diag(norm), compute_uv=False)
        assert (row.d_out, row.d_in) == tuple(ref.module.weight.shape) and len(row.values) == min(row.d_out, row.d_in)
        np.testing.assert_allclose(row.values, direct ** 2, rtol=0, atol=1e-10 * direct[0] ** 2)
    stored = store.get_feature_spectra(calibration.record.calibration_id, ACTIVATION_WEIGHTED)
    assert [(r.layer, r.linear_type, r.values) for r in stored] == [(r.layer, r.linear_type, r.values) for r in rows]

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(spectra_cache, "compute_activation_weighted_spectra", must_not_run)
    assert ensure_activation_weighted_spectra(store, loaded, calibration) == stored  # from the store
    # the pooled feature spectra of the same calibration are untouched and computed separately
    assert store.get_feature_spectra(calibration.record.calibration_id, "pooled") == []
    ensure_spectra(store, loaded, calibration)
    assert store.get_feature_spectra(calibration.record.calibration_id, ACTIVATION_WEIGHTED) == stored


def _row(layer, linear_type, values, d_out=4, d_in=4):
    return SpectrumRow(layer, linear_type, d_out, d_in, values)


def test_lorap_table_on_hand_made_rows():
    # weights hold σ (energy σ²), weighted rows hold σ² already
    weight = [_row(0, "q", [2.0, 1.0, 1.0, 0.0]), _row(0, "down", [1.0, 1.0, 1.0, 1.0], 4, 8),
              _row(1, "q", [1.0, 0.0, 0.0, 0.0]), _row(1, "down", [1.0, 1.0, 1.0, 1.0], 4, 8)]
    weighted = [_row(0, "q", [9.0, 1.0, 0.0, 0.0]), _row(0, "down", [4.0, 4.0, 1.0, 1.0], 4, 8),
                _row(1, "q", [1.0, 0.0, 0.0, 0.0]), _row(1, "down", [1.0, 1.0, 1.0, 1.0], 4, 8)]
    rows = lorap_table_rows(weight, weighted)
    assert [(r["layer"], r["type"], r["sublayer"]) for r in rows] == [
        (0, "q", "attention"), (0, "down", "MLP"), (1, "q", "attention"), (1, "down", "MLP")]
    # layer 0 q: σ² = 4, 1, 1, 0: 80% of 6 needs two values (5/6); weighted 9, 1: 90% with one
    assert (rows[0]["weight_rank"], rows[0]["weighted_rank"]) == (2, 1)
    assert (rows[1]["weight_rank"], rows[1]["weighted_rank"]) == (4, 2)  # flat: 80% needs all four; 8/10 needs two
    table = lorap_table(weight, weighted)
    assert [(r["type"], r["sublayer"], r["layers"]) for r in table] == [("q", "attention", 2), ("down", "MLP", 2)]
    assert table[0]["weight_share"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert table[0]["weighted_share"] == pytest.approx((1 / 4 + 1 / 4) / 2)
    assert table[1]["weight_share"] == pytest.approx(1.0) and table[1]["weighted_share"] == pytest.approx(3 / 4)
    one = lorap_table(weight, weighted, layer=0)
    assert one[0]["layers"] == 1 and one[0]["weight_share"] == pytest.approx(2 / 4)
    assert lorap_table(weight, weighted, level=1.0)[1]["weighted_share"] == pytest.approx(1.0)
    with pytest.raises(RankScopeError, match="No spectra for layer 5"):
        lorap_table(weight, weighted, layer=5)
    with pytest.raises(RankScopeError, match="No activation-weighted spectrum for layer 1, type 'down'"):
        lorap_table(weight, weighted[:3])


def test_lorap_table_of_a_tiny_model(tiny_calibration, store):
    loaded, calibration = tiny_calibration
    weight = ensure_spectra(store, loaded, calibration).weight
    weighted = ensure_activation_weighted_spectra(store, loaded, calibration)
    rows = lorap_table_rows(weight, weighted)
    assert len(rows) == 2 * 7
    for row, w, aw in zip(rows, weight, weighted):
        assert row["weight_rank"] == rank_for_energy(w.values, LORAP_LEVEL, squared=True)
        assert row["weighted_rank"] == rank_for_energy(np.sqrt(aw.values), LORAP_LEVEL, squared=True)
        assert 0 < row["weight_share"] <= 1 and 0 < row["weighted_share"] <= 1
    table = lorap_table(weight, weighted)
    assert [r["type"] for r in table] == ["q", "k", "v", "o", "gate", "up", "down"]
    for entry in table:
        mine = [r for r in rows if r["type"] == entry["type"]]
        assert entry["weighted_share"] == pytest.approx(sum(r["weighted_share"] for r in mine) / 2)


# -- MLP sweeps: pruning against low rank at equal parameters ------------------------------------------------


def _session(store, model_dir, text, method="svd") -> CompressionSession:
    texts = TextSettings(str(text), Windowing(32, 16), 4, str(text), Windowing(32, 4))
    return CompressionSession.open(store, load_model(str(model_dir), store), method, texts)


@pytest.fixture
def session(store, tiny_model_dirs, sample_text_file) -> CompressionSession:
    return _session(store, tiny_model_dirs["llama"], sample_text_file)


def _key(point) -> tuple:
    return point.linear_type, point.layer, round(point.ratio, 6)


def test_mlp_sweep_by_type_measures_pruning_and_low_rank_at_equal_parameters(session, store):
    points = sweep_mlp_by_type(session, RATIOS)
    assert sorted(map(_key, points)) == sorted((form, ALL_LAYERS, r) for form in (MLP_LOW_RANK, MLP_PRUNE)
                                               for r in RATIOS)
    sid = mlp_sweep_id(session)
    assert sid != sweep_id(session)
    assert sorted(map(_key, store.sensitivity_points(sid))) == sorted(map(_key, points))
    assert store.sensitivity_points(sweep_id(session)) == []  # the rank sweep's points are elsewhere
    dense = session.shapes.decoder_linear_params
    mlps = session.shapes.mlps
    by_key = {_key(p): p for p in points}
    for ratio in RATIOS:
        pruned, low = by_key[(MLP_PRUNE, ALL_LAYERS, ratio)], by_key[(MLP_LOW_RANK, ALL_LAYERS, ratio)]
        kept = kept_for_ratio(mlps[0], ratio)
        assert kept == round((1 - ratio) * 48)
        assert pruned.decoder_params == dense - sum(m.params(None) - m.params(kept) for m in mlps)
        # equal parameters: the low-rank MLPs use at most what the pruned ones do, within one rank step per MLP
        per_rank = 3 * (32 + 48)
        assert pruned.decoder_params - len(mlps) * per_rank < low.decoder_params <= pruned.decoder_params
        for point in (pruned, low):
            assert point.kl_forward > 0 and point.kl_reverse > 0 and np.isfinite(point.perplexity)
    # a point is exactly the evaluation of its plan
    plan = mlp_point_plan(session, MLP_PRUNE, ALL_LAYERS, 0.5)
    assert plan.channels == {m.path: 24 for m in mlps} and plan.pruning == PruningSettings().to_dict()
    direct = session.evaluate(plan).metrics
    assert by_key[(MLP_PRUNE, ALL_LAYERS, 0.5)].perplexity == pytest.approx(direct["perplexity"], rel=1e-12)
    low_plan = mlp_point_plan(session, MLP_LOW_RANK, ALL_LAYERS, 0.5)
    assert low_plan.channels is None
    rank = (3 * 32 * 24) // (3 * (32 + 48))
    assert {low_plan.ranks[p] for m in mlps for p in m.paths} == {rank}
    assert by_key[(MLP_LOW_RANK, ALL_LAYERS, 0.5)].decoder_params == count_parameters(
        session.shapes, "svd", low_plan.ranks).decoder_compressed
    assert session.evaluate(low_plan).metrics["kl_forward"] == pytest.approx(
        by_key[(MLP_LOW_RANK, ALL_LAYERS, 0.5)].kl_forward, rel=1e-12)


def test_pruning_nothing_is_the_original_model(session):
    [point] = sweep_mlp_by_type(session, [0.005], [MLP_PRUNE])  # keeps round(0.995 · 48) = 48 of 48 channels
    assert point.decoder_params == session.shapes.decoder_linear_params
    assert point.perplexity == pytest.approx(session.reference.perplexity, rel=1e-6)
    assert point.kl_forward == pytest.approx(0.0, abs=1e-6) and point.kl_reverse == pytest.approx(0.0, abs=1e-6)
    [layer_point] = sweep_mlp_by_layer(session, 0.005, layers=[1])
    assert layer_point.kl_forward == pytest.approx(0.0, abs=1e-6)


class Interrupted(Exception):
    """Stands in for Ctrl-C in the middle of a sweep."""


def test_an_interrupted_mlp_sweep_resumes_without_recomputing(session, store, monkeypatch):
    def stop_after_two(event):
        if event.stage.startswith("MLP sweep") and event.done == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        sweep_mlp_by_type(session, RATIOS, progress=stop_after_two)
    assert len(store.sensitivity_points(mlp_sweep_id(session))) == 2
    calls, evaluate = [], session.evaluate

    def counting(plan, *args, **kwargs):
        calls.append(plan)
        return evaluate(plan, *args, **kwargs)

    monkeypatch.setattr(session, "evaluate", counting)
    events = []
    assert len(sweep_mlp_by_type(session, RATIOS, progress=events.append)) == 4
    assert len(calls) == 2 and events[-1].done == events[-1].total == 4
    assert len(sweep_mlp_by_type(session, RATIOS)) == 4 and len(calls) == 2  # all stored: no work
    # another pruning setting is another sweep
    other = PruningSettings(aggregation="l1")
    assert mlp_sweep_id(session, other) != mlp_sweep_id(session)
    assert len(sweep_mlp_by_type(session, [0.5], [MLP_PRUNE], pruning=other)) == 1 and len(calls) == 3


def test_mlp_sweep_by_layer_reuses_the_prefix_with_the_numbers_of_full_evaluations(session, store):
    points = sweep_mlp_by_layer(session, 0.5)
    assert [_key(p) for p in points] == [(MLP_PRUNE, 0, 0.5), (MLP_PRUNE, 1, 0.5)]
    mlp = session.shapes.mlps[0]
    for point in points:
        assert point.decoder_params == session.shapes.decoder_linear_params - (mlp.params(None) - mlp.params(24))
        direct = session.evaluate(mlp_point_plan(session, MLP_PRUNE, point.layer, 0.5)).metrics
        assert (point.perplexity, point.kl_forward, point.kl_reverse) == (
            direct["perplexity"], direct["kl_forward"], direct["kl_reverse"])  # bit for bit
    everywhere = sweep_mlp_by_type(session, [0.5], [MLP_PRUNE])[0]
    assert everywhere.kl_forward > max(p.kl_forward for p in points)
    low = sweep_mlp_by_layer(session, 0.5, layers=[0], form=MLP_LOW_RANK)
    assert [_key(p) for p in low] == [(MLP_LOW_RANK, 0, 0.5)]
    stored = store.sensitivity_points(mlp_sweep_id(session))
    assert mlp_layer_ratios(stored) == [0.5] and mlp_layer_ratios(stored, MLP_LOW_RANK) == [0.5]
    assert [row["layer"] for row in mlp_layer_rows(stored, 0.5)] == [0, 1]
    assert [row["kl_forward"] for row in mlp_layer_rows(stored, 0.5)] == [p.kl_forward for p in points]
    curves = mlp_curve_rows(stored, "svd")
    assert [(row["form"], row["ratio"]) for row in curves] == [("pruned channels (LoRAP)", 0.5)]


def test_joint_methods_factorise_the_shared_pair_at_the_same_parameter_count(store, tiny_model_dirs,
                                                                            sample_text_file):
    session = _session(store, tiny_model_dirs["llama"], sample_text_file, method="joint-svd")
    plan = mlp_point_plan(session, MLP_LOW_RANK, ALL_LAYERS, 0.5)
    per_rank = (32 + 2 * 48) + (48 + 32)  # gate+up share A (32 -> 96), down (48 -> 32)
    rank = (3 * 32 * 24) // per_rank
    assert {plan.ranks[p] for m in session.shapes.mlps for p in m.paths} == {rank}
    [point] = sweep_mlp_by_type(session, [0.5], [MLP_LOW_RANK])
    assert point.decoder_params == count_parameters(session.shapes, "joint-svd", plan.ranks).decoder_compressed


def test_the_page_finds_the_sweep_from_settings_alone(store, tiny_model_dirs, sample_text_file):
    for method in ("svd", "feature-pca"):
        session = _session(store, tiny_model_dirs["llama"], sample_text_file, method=method)
        assert mlp_sweep_id_for(session.loaded.fingerprint, method, session.texts) == mlp_sweep_id(session)
        other = PruningSettings(retention=0.0)
        assert mlp_sweep_id_for(session.loaded.fingerprint, method, session.texts, other) == mlp_sweep_id(session, other)


@pytest.mark.parametrize("call,words", [
    (lambda s: sweep_mlp_by_type(s, [0.5], ["mlp"]), "Unknown MLP compression"),
    (lambda s: sweep_mlp_by_type(s, [0.0]), "between 0 and 1"),
    (lambda s: sweep_mlp_by_type(s, [1.0]), "between 0 and 1"),
    (lambda s: sweep_mlp_by_layer(s, 1.2), "between 0 and 1"),
    (lambda s: sweep_mlp_by_layer(s, 0.5, layers=[2]), "no gated MLP"),
    (lambda s: sweep_mlp_by_layer(s, 0.5, form="gate"), "Unknown MLP compression"),
], ids=["form", "ratio-0", "ratio-1", "layer-ratio", "layer-missing", "layer-form"])
def test_bad_mlp_sweep_requests_raise(session, store, call, words):
    with pytest.raises(RankScopeError, match=words):
        call(session)
    assert store.sensitivity_points(mlp_sweep_id(session)) == []


def test_rank_sweeps_are_unchanged_by_the_mlp_sweeps(session, store):
    sweep_mlp_by_type(session, [0.5], [MLP_PRUNE])
    points = sweep_by_type(session, [0.5], ["gate"])
    assert [_key(p) for p in points] == [("gate", ALL_LAYERS, 0.5)]
    assert [_key(p) for p in store.sensitivity_points(sweep_id(session))] == [("gate", ALL_LAYERS, 0.5)]


def test_rankscope_spectra_prints_lorap_table_1(tiny_model_dirs, sample_text_file, store):
    import json

    from typer.testing import CliRunner

    from engine.cli import app

    args = ["spectra", "--model", str(tiny_model_dirs["llama"]), "--windows", "4", "--window-len", "16", "--groups",
            "2", "--text", str(sample_text_file)]
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    lorap = data["lorap_table"]
    assert lorap["energy"] == 0.8 and [row["type"] for row in lorap["by_type"]] == ["q", "k", "v", "o", "gate", "up",
                                                                                   "down"]
    assert len(lorap["matrices"]) == 2 * 7 and data["from_cache"] is False
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    weighted = store.get_feature_spectra(data["calibration_id"], ACTIVATION_WEIGHTED)
    assert lorap["by_type"] == lorap_table(store.get_weight_spectra(loaded.fingerprint), weighted)
    text = runner.invoke(app, args)
    assert text.exit_code == 0 and "from the store" in text.stdout
    [line] = [line for line in text.stdout.splitlines() if line.startswith("LoRAP Table 1")]
    assert "weights | activation-weighted" in line and line.count("|") == 8  # the header's and one per type

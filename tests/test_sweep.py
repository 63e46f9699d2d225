"""Sensitivity sweeps on a tiny model: stored points, resuming after an interruption, errors."""

from __future__ import annotations

import pytest

from engine.compression.session import CompressionSession
from engine.texts.settings import TextSettings
from engine.compression.sweep import ALL_LAYERS, sweep_by_layer, sweep_by_type, sweep_id, unit_labels
from engine.compression.units import count_parameters
from engine.errors import RankScopeError
from engine.models.loading import load_model
from engine.store import open_store
from engine.texts.windows import Windowing
from tests.tiny_models import tiny_family_model

RATIOS = (0.3, 0.6)
SVD_LABELS = ["q", "k", "v", "o", "gate", "up", "down"]


def _session(store, model_dir, text, method="svd") -> CompressionSession:
    texts = TextSettings(str(text), Windowing(32, 16), 4, str(text), Windowing(32, 4))
    return CompressionSession.open(store, load_model(str(model_dir), store), method, texts)


@pytest.fixture
def session(store, tiny_model_dirs, sample_text_file) -> CompressionSession:
    return _session(store, tiny_model_dirs["llama"], sample_text_file)


def _key(point) -> tuple:
    return point.linear_type, point.layer, round(point.ratio, 6)


def _values(point) -> tuple:
    return point.decoder_params, point.perplexity, point.kl_forward, point.kl_reverse


class Interrupted(Exception):
    """Stands in for Ctrl-C in the middle of a sweep."""


def test_sweep_by_type_stores_one_point_per_type_and_ratio(session, store):
    points = sweep_by_type(session, RATIOS)
    expected = {(label, ALL_LAYERS, ratio) for label in SVD_LABELS for ratio in RATIOS}
    assert unit_labels(session) == SVD_LABELS
    assert len(points) == len(expected) and {_key(p) for p in points} == expected
    stored = store.sensitivity_points(sweep_id(session))
    assert sorted(map(_key, stored)) == sorted(map(_key, points))
    original = session.original_quality()["perplexity"]
    for point in points:
        ranks = {p: u.rank_for_ratio(point.ratio) for u in session.shapes.units("svd")
                 if u.types[0] == point.linear_type for p in u.paths}
        assert len(ranks) == session.shapes.num_layers
        assert point.decoder_params == count_parameters(session.shapes, "svd", ranks).decoder_compressed
        assert point.decoder_params < session.shapes.decoder_linear_params
        assert point.kl_forward > 0 and point.kl_reverse > 0
        assert point.perplexity != pytest.approx(original, rel=1e-6)
    gate = next(p for p in points if _key(p) == ("gate", ALL_LAYERS, 0.6))
    direct = session.evaluate_ranks({p: u.rank_for_ratio(0.6) for u in session.shapes.units("svd")
                                     if u.types == ("gate",) for p in u.paths})
    assert gate.perplexity == pytest.approx(direct.perplexity, rel=1e-9)
    assert gate.kl_reverse == pytest.approx(direct.kl_reverse, rel=1e-9)


def test_an_interrupted_sweep_resumes_without_recomputing(session, store, monkeypatch, tmp_path,
                                                         tiny_model_dirs, sample_text_file):
    types = ["q", "o", "down"]

    def stop_after_three(event):
        if event.stage.startswith("sweep") and event.done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        sweep_by_type(session, RATIOS, types, progress=stop_after_three)
    assert len(store.sensitivity_points(sweep_id(session))) == 3

    calls, evaluate = [], session.evaluate_ranks

    def counting(ranks, *args, **kwargs):
        calls.append(ranks)
        return evaluate(ranks, *args, **kwargs)

    monkeypatch.setattr(session, "evaluate_ranks", counting)
    events = []
    resumed = sweep_by_type(session, RATIOS, types, progress=events.append)
    assert len(calls) == len(types) * len(RATIOS) - 3
    assert events[-1].done == events[-1].total == 6
    assert len(sweep_by_type(session, RATIOS, types)) == 6 and len(calls) == 3  # all stored now: no work

    # the same sweep, uninterrupted, in a fresh cache
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "fresh"))
    fresh_store = open_store()
    assert fresh_store is not store
    fresh = sweep_by_type(_session(fresh_store, tiny_model_dirs["llama"], sample_text_file), RATIOS, types)
    assert [_key(p) for p in fresh] == [_key(p) for p in resumed]
    for mine, theirs in zip(resumed, fresh):
        assert _values(mine) == pytest.approx(_values(theirs), rel=1e-9)


def test_a_sweep_that_fails_midway_keeps_the_finished_points(session, store, monkeypatch):
    evaluate, calls = session.evaluate_ranks, []

    def fail_on_fourth(ranks, *args, **kwargs):
        calls.append(ranks)
        if len(calls) == 4:
            raise RuntimeError("out of memory")
        return evaluate(ranks, *args, **kwargs)

    monkeypatch.setattr(session, "evaluate_ranks", fail_on_fourth)
    with pytest.raises(RuntimeError):
        sweep_by_type(session, (0.2, 0.4, 0.6), ["up", "k"])
    assert sorted(map(_key, store.sensitivity_points(sweep_id(session)))) == sorted(
        [("up", ALL_LAYERS, 0.2), ("up", ALL_LAYERS, 0.4), ("up", ALL_LAYERS, 0.6)])


def test_sweep_by_layer_stores_one_point_per_layer(session, store):
    points = sweep_by_layer(session, "gate", 0.5)
    assert [(p.linear_type, p.layer, p.ratio) for p in points] == [("gate", 0, 0.5), ("gate", 1, 0.5)]
    gate_units = [u for u in session.shapes.units("svd") if u.types == ("gate",)]
    saved = gate_units[0].dense_params - gate_units[0].params(gate_units[0].rank_for_ratio(0.5))
    for point in points:
        assert point.decoder_params == session.shapes.decoder_linear_params - saved
    assert points[0].perplexity != pytest.approx(points[1].perplexity, rel=1e-9)
    by_type = sweep_by_type(session, [0.5], ["gate"])[0]
    assert by_type.kl_forward > max(p.kl_forward for p in points)  # both layers hurt more than either alone
    assert len(store.sensitivity_points(sweep_id(session))) == 3
    assert [p.layer for p in sweep_by_layer(session, "gate", 0.5, layers=[1])] == [1]


@pytest.mark.parametrize("call,words", [
    (lambda s: sweep_by_type(s, [0.5], ["qk"]), "Unknown type"),
    (lambda s: sweep_by_type(s, [0.5], ["q+k"]), "Unknown type"),
    (lambda s: sweep_by_type(s, [0.0]), "between 0 and 1"),
    (lambda s: sweep_by_type(s, [1.0]), "between 0 and 1"),
    (lambda s: sweep_by_type(s, [0.5, 1.5]), "between 0 and 1"),
    (lambda s: sweep_by_layer(s, "gate", -0.1), "between 0 and 1"),
    (lambda s: sweep_by_layer(s, "attn", 0.5), "Unknown type"),
    (lambda s: sweep_by_layer(s, "q", 0.5, layers=[2]), "do not exist"),
], ids=["qk", "joint-label-for-svd", "ratio-0", "ratio-1", "ratio-1.5", "layer-ratio-negative", "layer-unknown-type",
        "layer-missing"])
def test_bad_sweep_requests_raise(session, store, call, words):
    with pytest.raises(RankScopeError, match=words):
        call(session)
    assert store.sensitivity_points(sweep_id(session)) == []


def test_joint_svd_sweeps_the_shared_pairs(store, tiny_model_dirs, sample_text_file):
    session = _session(store, tiny_model_dirs["llama"], sample_text_file, method="joint-svd")
    assert unit_labels(session) == ["q+k", "v", "o", "gate+up", "down"]
    points = sweep_by_type(session, [0.4], ["q+k", "gate+up"])
    assert [p.linear_type for p in points] == ["gate+up", "q+k"]
    hidden = session.loaded.config.hidden_size
    for point in points:
        units = [u for u in session.shapes.units("joint-svd") if "+".join(u.types) == point.linear_type]
        assert len(units) == 2 and all(len(u.paths) == 2 for u in units)
        rank = units[0].rank_for_ratio(0.4)
        # both members of each pair compressed, with one shared A of rank x hidden
        assert point.decoder_params == (session.shapes.decoder_linear_params
                                        - 2 * (units[0].dense_params - rank * (hidden + units[0].d_out)))
    with pytest.raises(RankScopeError, match="types: q\\+k, v, o, gate\\+up, down"):
        sweep_by_type(session, [0.4], ["q"])
    svd = _session(store, tiny_model_dirs["llama"], sample_text_file)
    assert sweep_id(svd) != sweep_id(session)
    assert store.sensitivity_points(sweep_id(svd)) == []


# -- per-layer points reuse the original layers below the compressed one ------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_the_replayed_prefix_reproduces_the_forward_bit_for_bit(model_type):
    import torch

    from engine.compression.layer_prefix import PREFIX_MODEL_TYPES, LayerPrefixCache
    from engine.models.adapters import adapter_for_model_type
    from engine.models.loading import LoadedModel

    assert model_type in PREFIX_MODEL_TYPES
    model = tiny_family_model(model_type)
    loaded = LoadedModel("tiny", "fp", None, model, None, adapter_for_model_type(model_type))
    windows = torch.randint(0, 97, (3, 24))  # longer than the sliding window
    with torch.no_grad():
        full = [model(input_ids=windows[i : i + 1], use_cache=False).logits for i in range(3)]
    cache = LayerPrefixCache(loaded, windows)
    calls = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, j=j: calls.append(j))
             for j, layer in enumerate(model.model.layers)]
    for layer in (0, 1, 2, 3, 1):
        cache.advance_to(layer)
        assert cache.layer == layer and len(cache.states) == 3
        assert cache.nbytes == 3 * 24 * 32 * 4
        calls.clear()
        with cache.replaying(), torch.no_grad():
            for i in (2, 0, 1):
                assert torch.equal(model(input_ids=windows[i : i + 1], use_cache=False).logits, full[i])
        assert calls == list(range(layer, 4)) * 3  # the layers below were not run
    with torch.no_grad():  # and the model is whole again afterwards
        assert torch.equal(model(input_ids=windows[:1], use_cache=False).logits, full[0])
    for hook in hooks:
        hook.remove()
    with cache.replaying(), torch.no_grad(), pytest.raises(RankScopeError, match="no states for a window"):
        model(input_ids=torch.randint(0, 97, (1, 24)), use_cache=False)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_by_layer_points_reuse_the_prefix_with_the_numbers_of_full_evaluations(store, tiny_model_dirs,
                                                                              sample_text_file, family):
    session = _session(store, tiny_model_dirs[family], sample_text_file)
    layer0_runs = []
    session.loaded.model.model.layers[0].mlp.register_forward_hook(lambda *_: layer0_runs.append(1))
    points = [p for t in ("q", "down") for p in sweep_by_layer(session, t, 0.5)]
    assert [(p.linear_type, p.layer) for p in points] == [("q", 0), ("q", 1), ("down", 0), ("down", 1)]
    n_windows = session.windows.shape[0]
    # per type: the point at layer 0 (full), one original pass to cache layer 1's inputs, none at layer 1
    assert len(layer0_runs) == 2 * 2 * n_windows
    for point in points:
        direct = session.evaluate_ranks(_ranks(session, point))  # the full evaluation
        assert (point.perplexity, point.kl_forward, point.kl_reverse) == (
            direct.perplexity, direct.kl_forward, direct.kl_reverse)  # bit for bit


def _ranks(session, point) -> dict:
    return {p: u.rank_for_ratio(point.ratio) for u in session.shapes.units(session.method)
            if "+".join(u.types) == point.linear_type and u.layer == point.layer for p in u.paths}


def test_by_layer_sweeps_visit_layers_upwards_and_resume(session, store, monkeypatch):
    import engine.compression.sweep as sweep

    advanced = []
    real = sweep.LayerPrefixCache.advance_to
    monkeypatch.setattr(sweep.LayerPrefixCache, "advance_to",
                        lambda self, layer: (advanced.append(layer), real(self, layer))[1])
    assert [p.layer for p in sweep_by_layer(session, "o", 0.4, layers=[1])] == [1]
    assert [p.layer for p in sweep_by_layer(session, "o", 0.4, layers=[1, 0])] == [0, 1]  # only layer 0 measured
    assert advanced == [1, 0]
    advanced.clear()
    assert [p.layer for p in sweep_by_layer(session, "v", 0.4, layers=[1, 0])] == [0, 1]
    assert advanced == [0, 1]  # sorted upwards
    assert len(store.sensitivity_points(sweep_id(session))) == 4


def test_models_without_a_proven_partial_forward_are_evaluated_in_full(session, monkeypatch):
    import engine.compression.sweep as sweep

    class Refused:
        def __init__(self, *args):
            raise AssertionError("the prefix cache was used")

    monkeypatch.setattr(sweep, "LayerPrefixCache", Refused)
    monkeypatch.setattr(session.loaded.model.config, "model_type", "gemma3")  # multimodal Gemma3: not proven
    points = sweep_by_layer(session, "up", 0.5)
    assert [p.layer for p in points] == [0, 1]
    monkeypatch.setattr(session.loaded.model.config, "model_type", "llama")
    assert len(sweep_by_layer(session, "gate", 0.5, reuse_prefix=False)) == 2  # asked for full evaluations


def test_the_prefix_refuses_a_compressed_layer_below_it(session):
    from engine.compression.layer_prefix import LayerPrefixCache

    cache = LayerPrefixCache(session.loaded, session.windows)
    cache.advance_to(1)
    with cache.replaying(), pytest.raises(RankScopeError, match="compressed below layer 1"):
        session.evaluate_ranks({p: u.rank_for_ratio(0.5) for u in session.shapes.units("svd")
                                if u.types == ("q",) and u.layer == 0 for p in u.paths})
    from engine.compression.lowrank import compressed_paths

    assert compressed_paths(session.loaded.model) == []

"""Rank-allocation search studies on a tiny model: resuming, budgets, baselines, subsets, errors, CLI.

A study runs feature-pca on the tiny llama (two layers, 32-wide) with windows of 32 tokens: four
evaluation windows, then eight candidate windows after them for the validation subset. Studies
are kept to a few trials; most use only random initial points, so no Gaussian process is fitted.
The tiny model's matrices allow only ranks 8, 16 or dense, so one rank step costs at most
8·(32 + 48) = 640 parameters.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine.cli import app
from engine.compression.grouping import MAX_RATIO, BudgetError, Grouping, budget_target
from engine.compression.plan import PlanError, RankPlan
from engine.compression.session import CompressionSession
from engine.texts.settings import TextSettings
from engine.compression.sweep import ALL_LAYERS, sweep_by_type
from engine.compression.units import RANK_STEP, ModelShapes, count_parameters
from engine.errors import RankScopeError
from engine.models.loading import load_model
from engine.search.baselines import greedy_ratios, lord_ratios, uniform_ratios
from engine.search.records import SELECTABLE_BASELINES, SELECTION, InMemoryStudyStorage, StudyState, TrialKind
from engine.search.runner import StudyRunner, create_study
from engine.search.settings import StudySettings
from engine.search.subset import choose_subset, objective
from engine.search.summary import best_trial, ratios_from_ranks, study_summary, warm_start_from_plan
from engine.store import open_store
from engine.records import SensitivityPoint
from engine.search.duckdb_storage import DuckDBStudyStorage
from engine.texts.corpus import load_corpus
from engine.texts.windows import Windowing, make_windows
from tests.tiny_models import TRAINING_TEXT

METHOD = "feature-pca"
EVAL_WINDOWS = 4
TOKENS = EVAL_WINDOWS * 31  # 31 predictions per window of 32
MAX_STEP = RANK_STEP * (32 + 48)  # the costliest one-step change among the tiny llama's matrices
GROUPS_5X1 = ["qk", "o", "gate", "up", "down"]
V_PATHS = ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


class Killed(Exception):
    """Stands in for the process dying in the middle of a study."""


def killed_after(searched_trials: int):
    """An `on_trial` callback that kills the study once it has stored that many search trials."""
    searched = []

    def on_trial(trial):
        if trial.kind is TrialKind.SEARCH:
            searched.append(trial)
            if len(searched) == searched_trials:
                raise Killed("process killed")

    return on_trial


@pytest.fixture
def long_text(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text(TRAINING_TEXT * 8)  # ~900 tokens: 4 evaluation + 8 candidate windows fit many times over
    return path


def _open_session(store, model_dir, text) -> CompressionSession:
    texts = TextSettings(str(text), Windowing(32, 16), 4, str(text), Windowing(32, EVAL_WINDOWS))
    return CompressionSession.open(store, load_model(str(model_dir), store), METHOD, texts)


@pytest.fixture
def session(store, tiny_model_dirs, long_text) -> CompressionSession:
    return _open_session(store, tiny_model_dirs["llama"], long_text)


def _settings(session, **changes) -> StudySettings:
    """Small studies: random points only unless `n_initial_points` is lowered."""
    values = dict(model=str(session.loaded.path), method=METHOD, budget=0.3, n_trials=3, n_initial_points=8,
                  subset_candidates=8, subset_size=4, subset_probe_plans=3, seed=0)
    return StudySettings(**{**values, **changes})


def _run(storage, session, settings, name, **runner_options):
    record = create_study(storage, session, settings, name=name)
    assert record.study_id == name and record.state is StudyState.RUNNING
    return StudyRunner(storage, session, name, **runner_options).run()


def _assert_meets_budget(session, trials, budget) -> None:
    """decoder_params equals the ranks' count, and lies within one rank step below the target."""
    target = budget_target(session.shapes, budget)
    assert target == round(session.shapes.decoder_linear_params * (1 - budget))
    assert max(RANK_STEP * (u.d_in + u.d_out) for u in session.shapes.units(METHOD)) == MAX_STEP
    other = session.shapes.total_params - session.shapes.decoder_linear_params
    for trial in trials:
        counts = count_parameters(session.shapes, METHOD, trial.ranks)
        assert trial.decoder_params == counts.decoder_compressed, trial.label
        assert target - MAX_STEP <= trial.decoder_params <= target, (trial.label, trial.decoder_params, target)
        assert trial.total_params == other + trial.decoder_params


def _same_trial(a, b) -> None:
    assert (a.number, a.kind, a.label) == (b.number, b.kind, b.label)
    assert a.values.keys() == b.values.keys() and a.projected.keys() == b.projected.keys()
    for group in a.values:
        assert a.values[group] == pytest.approx(b.values[group], abs=1e-9), (a.label, group)
        assert a.projected[group] == pytest.approx(b.projected[group], abs=1e-9), (a.label, group)
    assert a.ranks == b.ranks, a.label
    for name in ("objective", "perplexity", "kl_forward", "kl_reverse"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-9), (a.label, name)
    assert (a.decoder_params, a.total_params) == (b.decoder_params, b.total_params)


# -- pure pieces -------------------------------------------------------------------------------------------

def test_objective_is_log_perplexity_plus_beta_kl():
    assert objective(math.e ** 2, 0.5, 2.0) == pytest.approx(3.0, abs=1e-12)
    assert objective(321.5, 0.25, 0.0) == math.log(321.5)
    assert objective(1.0, 0.125, 4.0) == 0.5


def test_sensitive_subset_keeps_the_windows_whose_perplexity_varies_most():
    # per-window NLL for three probe plans, six windows
    nll = np.array([
        [2.0, 0.0, 5.0, 3.0, 1.0, 6.0],
        [2.0, 1.0, 5.5, 3.1, 1.0, 6.0],
        [2.0, 0.5, 5.2, 3.0, 1.0, 6.3],
    ])
    probes = [{"plan": i} for i in range(3)]
    seen = []

    def evaluate_windows(ranks):
        seen.append(ranks)
        return list(nll[ranks["plan"]])

    chosen = choose_subset("sensitive", 2, 6, probes, evaluate_windows, seed=0)
    assert seen == probes  # every probe plan evaluated once, in order
    variance = np.exp(nll).var(axis=0)
    assert chosen["variance"] == pytest.approx(list(variance), rel=1e-12)
    assert chosen["variance"][0] == pytest.approx(0.0, abs=1e-20)  # constant windows: no information
    assert chosen["variance"][4] == pytest.approx(0.0, abs=1e-20)
    assert np.var(nll, axis=0).argmax() == 1
    # windows 5 and 2 vary most in perplexity; window 1 varies most in NLL, but its perplexity barely moves
    assert chosen["windows"] == [2, 5]
    assert chosen["kind"] == "sensitive" and "3 random feasible plans" in chosen["reason"]
    assert chosen["probe_perplexity_mean"] == pytest.approx(list(np.exp(nll).mean(axis=0)), rel=1e-12)
    assert choose_subset("sensitive", 4, 6, probes, evaluate_windows, seed=0)["windows"] == [1, 2, 3, 5]


def test_random_subset_is_distinct_windows_fixed_by_the_seed():
    def never(ranks):
        raise AssertionError("a random subset evaluates nothing")

    picks = [choose_subset("random", 4, 8, [], never, seed=seed)["windows"] for seed in range(6)]
    for windows in picks:
        assert len(set(windows)) == 4 and windows == sorted(windows) and all(0 <= w < 8 for w in windows)
    assert choose_subset("random", 4, 8, [], never, seed=3)["windows"] == picks[3]
    assert len({tuple(w) for w in picks}) > 1  # the seed matters
    everything = choose_subset("all", 4, 8, [], never, seed=0)
    assert everything["windows"] == list(range(8)) and everything["kind"] == "all"


def test_greedy_compresses_the_least_sensitive_types_first(tiny_model_dirs, store):
    shapes = ModelShapes.of(load_model(str(tiny_model_dirs["llama"]), store))
    grouping = Grouping("5x1")
    points = []
    for linear_type in ("q", "k", "v", "o", "gate", "up", "down"):
        slope = 0.01 if linear_type in ("gate", "up", "down") else 1.0  # attention costs 100x more
        for ratio in (0.2, 0.4, 0.6):
            points.append(SensitivityPoint("sw", linear_type, ALL_LAYERS, ratio, 0, 100.0 * math.exp(slope * ratio),
                                           0.0, 0.0, 0.0))
    ratios = greedy_ratios(shapes, METHOD, grouping, 0.3, points, 100.0)
    assert set(ratios) == set(GROUPS_5X1)
    assert ratios["qk"] == ratios["o"] == 0.0  # the MLP alone can remove 30%
    assert all(ratios[g] in (0.4, 0.6) for g in ("gate", "up", "down"))
    groups = grouping.groups(shapes, METHOD)
    removed = sum(ratios[g] * sum(u.dense_params for u in units) for g, units in groups.items())
    assert 0.3 * shapes.decoder_linear_params <= removed < 0.3 * shapes.decoder_linear_params + 0.2 * 48 * 32 * 2
    assert greedy_ratios(shapes, METHOD, grouping, 0.3, [], 100.0) is None
    only_mlp = [p for p in points if p.linear_type in ("gate", "up", "down")]
    assert greedy_ratios(shapes, METHOD, grouping, 0.3, only_mlp, 100.0) is None  # qk and o have no curve
    assert greedy_ratios(shapes, METHOD, grouping, 0.3, [p for p in points if p.layer != ALL_LAYERS], 100.0) is None


def test_lord_and_uniform_ratios():
    groups = ["qk", "v", "o", "gate", "up", "down"]
    assert uniform_ratios(groups, 0.2) == {g: 0.2 for g in groups}
    lord = lord_ratios(groups + ["qk@0-0", "v@1-1"], 0.2)
    assert lord["v"] == lord["v@1-1"] == 0.0
    assert lord["qk"] == lord["qk@0-0"] == pytest.approx(0.3)
    assert lord["o"] == lord["gate"] == lord["up"] == lord["down"] == 0.2


def test_settings_round_trip():
    settings = StudySettings(model="m", grouping="5x2", search_v=True, budget=0.25, beta=0.5, kl="forward",
                             warm_start={"qk": 0.1}, texts=TextSettings.of(window_len=32))
    assert StudySettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert settings.length_scale("qk@0-0") == 1.0 and settings.length_scale("down@1-1") == 0.8
    with pytest.raises(RankScopeError, match="Unknown study setting"):
        StudySettings.from_dict({**settings.to_dict(), "trials": 3})
    with pytest.raises(RankScopeError, match="version 4"):
        StudySettings.from_dict({**settings.to_dict(), "version": 4})
    with pytest.raises(RankScopeError, match="must be TextSettings, got dict"):
        StudySettings(texts={"window_len": 32})


def test_settings_written_by_release_0_1_0_still_load():
    """Version 1 wrote `texts` as a flat dict with one window length (or {} for the defaults)."""
    flat = {"calibration_text": "war-and-peace", "calibration_windows": 16, "evaluation_text": "notes.txt",
            "evaluation_windows": 4, "window_len": 64, "groups": 8}
    settings = StudySettings.from_dict({**StudySettings().to_dict(), "version": 1, "texts": flat})
    assert settings.texts == TextSettings("war-and-peace", Windowing(64, 16), 8, "notes.txt", Windowing(64, 4))
    assert settings.version == 3 and settings.to_dict()["texts"]["calibration"]["n_groups"] == 8
    older = {k: v for k, v in StudySettings().to_dict().items() if k != "strategy"}
    assert StudySettings.from_dict({**older, "version": 2}).strategy == "bo"  # resumed with the loop it ran
    assert StudySettings.from_dict({**StudySettings().to_dict(), "version": 1, "texts": {}}).texts == TextSettings()


@pytest.mark.parametrize("changes,words", [
    ({"grouping": "7x2"}, "Unknown grouping '7x2'"),
    ({"grouping": "foo"}, "Unknown grouping 'foo'"),
    ({"grouping": "5x0"}, "Unknown grouping '5x0'"),
    ({"kl": "sideways"}, "must be one of reverse, forward, got 'sideways'"),
    ({"beta": -0.5}, "beta must be 0 or more, got -0.5"),
    ({"subset_size": 9, "subset_candidates": 8}, "between 1 and the number of candidate windows (8), got 9"),
    ({"subset_size": 0}, "got 0"),
    ({"subset": "weird"}, "sensitive, random, all"),
    ({"budget": 1.0}, "between 0 and 1"),
    ({"budget": 0.0}, "between 0 and 1"),
    ({"method": "pca"}, "Unknown method 'pca'"),
    ({"n_trials": 0}, "at least one trial"),
    ({"max_ratio": 0.995}, "max_ratio must be in (0, 0.99]"),
], ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_settings_refuse_bad_values(changes, words):
    with pytest.raises(RankScopeError) as info:
        StudySettings(**changes)
    assert words in str(info.value)


# -- studies on the tiny model -----------------------------------------------------------------------------

def test_killed_study_resumes_to_the_same_trials_and_result(session, store, tiny_model_dirs, long_text):
    settings = _settings(session, n_trials=5, n_initial_points=2)  # trials 2-4 come from the Gaussian process
    whole = InMemoryStudyStorage()
    _run(whole, session, settings, "whole")
    expected = whole.trials("whole")
    assert [t.label for t in expected] == ["uniform", "lord", "trial 0", "trial 1", "trial 2", "trial 3", "trial 4"]

    killed = DuckDBStudyStorage(store)
    with pytest.raises(Killed):
        _run(killed, session, settings, "killed", on_trial=killed_after(3))
    record = killed.get_study("killed")
    assert record.state is StudyState.FAILED and record.message == "Killed: process killed"
    stored = killed.trials("killed")
    assert len(stored) == 5 and killed.results("killed") == {}
    for a, b in zip(expected, stored):
        _same_trial(a, b)
    store.close()  # a new process: reopen the store and the session from the cache

    store = open_store()
    resumed_storage = DuckDBStudyStorage(store)
    new = []
    again = StudyRunner(resumed_storage, _open_session(store, tiny_model_dirs["llama"], long_text), "killed",
                        on_trial=new.append).run()
    assert again.state is StudyState.FINISHED and again.message is None
    assert [t.number for t in new] == [5, 6]  # nothing stored was evaluated again
    resumed = resumed_storage.trials("killed")
    assert len(resumed) == len(expected) == 7
    for a, b in zip(expected, resumed):
        _same_trial(a, b)
    assert again.validation == whole.get_study("whole").validation
    assert best_trial(resumed_storage, "killed").number == best_trial(whole, "whole").number
    full, full_expected = resumed_storage.results("killed"), whole.results("whole")
    assert set(full) == set(full_expected) == {"best", "uniform", "lord", SELECTION}
    selection, selection_expected = full.pop(SELECTION), full_expected.pop(SELECTION)
    assert [c["number"] for c in selection["candidates"]] == [c["number"] for c in selection_expected["candidates"]]
    for a, b in zip(selection["candidates"], selection_expected["candidates"]):
        assert a["objective"] == pytest.approx(b["objective"], abs=1e-9)
    for label, result in full_expected.items():
        assert full[label]["trial"] == result["trial"] and full[label]["tokens"] == result["tokens"] == TOKENS
        for name in ("perplexity", "kl_forward", "kl_reverse"):
            assert full[label][name] == pytest.approx(result[name], abs=1e-9), (label, name)
    _assert_meets_budget(session, resumed, 0.3)


def test_stopped_study_resumes_and_a_finished_one_stays_finished(session):
    storage = InMemoryStudyStorage()
    stop = threading.Event()

    def stop_after_two(trial):
        if trial.kind is TrialKind.SEARCH and trial.label == "trial 1":
            stop.set()

    settings = _settings(session, n_trials=4)
    record = _run(storage, session, settings, "s", on_trial=stop_after_two, stop_event=stop)
    assert record.state is StudyState.STOPPED and record.message == "stopped after 2 trials"
    assert [t.label for t in storage.trials("s")] == ["uniform", "lord", "trial 0", "trial 1"]
    assert storage.results("s") == {}  # no re-measurement before the study finishes
    assert study_summary(storage, "s")["trials_done"] == 2

    assert StudyRunner(storage, session, "s").run().state is StudyState.FINISHED
    trials = storage.trials("s")
    assert [t.number for t in trials] == list(range(6))
    uninterrupted = InMemoryStudyStorage()
    _run(uninterrupted, session, settings, "u")
    for a, b in zip(uninterrupted.trials("u"), trials):
        _same_trial(a, b)

    calls = []
    session_evaluate = session.evaluate_ranks
    session.evaluate_ranks = lambda *a, **k: calls.append(1) or session_evaluate(*a, **k)
    assert StudyRunner(storage, session, "s").run().state is StudyState.FINISHED
    assert storage.trials("s") == trials and calls == []  # a finished study evaluates nothing more


def test_every_evaluated_plan_meets_the_budget(session):
    storage = InMemoryStudyStorage()
    settings = _settings(session, grouping="5x2", search_v=True, budget=0.4, n_trials=6, subset="all")
    _run(storage, session, settings, "budget")
    trials = storage.trials("budget")
    assert len(trials) == 8
    _assert_meets_budget(session, trials, 0.4)
    search = [t for t in trials if t.kind is TrialKind.SEARCH]
    assert set(search[0].values) == {f"{g}@{i}-{i}" for g in ("qk", "v", "o", "gate", "up", "down") for i in (0, 1)}
    assert all(0.0 <= v <= settings.max_ratio for t in search for v in t.values.values())
    assert len({tuple(sorted(t.values.items())) for t in search}) == 6  # six different asked points
    for trial in search:  # projection keeps the asked ratios' proportions (one common scale)
        scales = {round(trial.projected[g] / trial.values[g], 9) for g in trial.values
                  if trial.values[g] > 0 and trial.projected[g] < MAX_RATIO}
        assert len(scales) == 1, trial.label


def test_baselines_uniform_and_lord_then_greedy_once_a_sweep_exists(session):
    storage = InMemoryStudyStorage()
    budget = 0.25  # on the tiny model, a budget at which the uniform plan compresses v
    # the plain loop (`bo`): baselines are not told and there is no global allocation
    _run(storage, session, _settings(session, budget=budget, n_trials=1, subset="all", strategy="bo"), "plain")
    baselines = {t.label: t for t in storage.trials("plain") if t.kind is TrialKind.BASELINE}
    assert list(baselines) == ["uniform", "lord"]
    uniform, lord = baselines["uniform"], baselines["lord"]
    # uniform: every decoder linear, v included, as `rankscope compress --uniform` does
    expected = session.uniform_plan(budget).ranks
    assert {p: uniform.ranks.get(p) for p in expected} == expected
    assert all(uniform.ranks.get(p) == 8 for p in V_PATHS)
    assert uniform.values == {g: budget for g in ("qk", "v", "o", "gate", "up", "down")}
    # LoRD: v dense, q/k at 1.5x the others' ratio
    assert all(lord.ranks.get(p) is None for p in V_PATHS)
    assert lord.values == {"qk": pytest.approx(0.375), "o": 0.25, "gate": 0.25, "up": 0.25, "down": 0.25}
    assert lord.projected["qk"] == pytest.approx(1.5 * lord.projected["o"], rel=1e-9)
    assert lord.projected["o"] == lord.projected["gate"] == lord.projected["down"]
    _assert_meets_budget(session, baselines.values(), budget)
    assert set(storage.results("plain")) == {"best", "uniform", "lord"}

    sweep_by_type(session, (0.2, 0.4, 0.6))
    _run(storage, session, _settings(session, budget=budget, n_trials=1, subset="all", strategy="bo"), "with-sweep")
    baselines = {t.label: t for t in storage.trials("with-sweep") if t.kind is TrialKind.BASELINE}
    assert list(baselines) == ["uniform", "lord", "greedy"]
    greedy = baselines["greedy"]
    assert set(greedy.values) == set(GROUPS_5X1) and set(greedy.values.values()) <= {0.0, 0.2, 0.4, 0.6}
    assert all(greedy.ranks.get(p) is None for p in V_PATHS)
    _assert_meets_budget(session, [greedy], budget)
    assert storage.results("with-sweep")["greedy"]["trial"] == greedy.number
    # baselines are not told to the optimiser: the searched trial matches the study without greedy
    _same_trial(storage.trials("plain")[2], replace(storage.trials("with-sweep")[3], number=2))


def test_validation_subset_is_stored_and_follows_the_evaluation_windows(session, long_text):
    calls = []
    evaluate = session.evaluate_ranks

    def recording(ranks, progress=None, window_indices=None, windows=None, reference=None):
        calls.append((dict(ranks), window_indices, windows))
        return evaluate(ranks, progress, window_indices, windows, reference)

    session.evaluate_ranks = recording
    storage = InMemoryStudyStorage()
    record = _run(storage, session, _settings(session, n_trials=2, select_top=1), "subset")  # no final selection
    validation = record.validation
    assert validation["kind"] == "sensitive" and len(validation["windows"]) == 4
    assert len(set(validation["windows"])) == 4 and all(0 <= w < 8 for w in validation["windows"])
    assert validation["candidate_windows"] == {"text": str(long_text), "window_len": 32, "n_windows": 8,
                                               "start_window": EVAL_WINDOWS}
    variance = validation["variance"]
    assert len(variance) == 8
    assert min(variance[w] for w in validation["windows"]) >= max(
        (v for i, v in enumerate(variance) if i not in validation["windows"]), default=0.0)
    assert study_summary(storage, "subset")["validation"]["windows"] == validation["windows"]

    corpus = load_corpus(str(long_text))
    everything = make_windows(corpus, session.loaded.tokenizer, Windowing(32, EVAL_WINDOWS + 8))
    assert torch.equal(session.windows, everything[:EVAL_WINDOWS])
    candidates = everything[EVAL_WINDOWS:]
    probes = [c for c in calls if c[2] is not None and c[1] is None]
    scored = [c for c in calls if c[1] is not None]
    full = [c for c in calls if c[2] is None]
    assert len(probes) == 3 and len(scored) == 4 and len(full) == 3  # 2 baselines + 2 trials; best + baselines
    for ranks, indices, windows in probes + scored:
        assert torch.equal(windows, candidates)  # the search never scores on the evaluation windows
    assert all(indices == validation["windows"] for _, indices, _ in scored)
    target = budget_target(session.shapes, 0.3)
    for ranks, _, _ in probes:  # random feasible plans
        params = count_parameters(session.shapes, METHOD, ranks).decoder_compressed
        assert target - MAX_STEP <= params <= target

    trials = storage.trials("subset")
    subset_quality = evaluate(trials[2].ranks, windows=candidates, window_indices=validation["windows"],
                              reference=_candidate_reference(session, long_text, candidates))
    assert trials[2].perplexity == pytest.approx(subset_quality.perplexity, rel=1e-9)
    best = best_trial(storage, "subset")
    result = storage.results("subset")["best"]
    assert result["trial"] == best.number and result["tokens"] == TOKENS
    assert result["perplexity"] == pytest.approx(evaluate(best.ranks).perplexity, rel=1e-9)
    assert result["perplexity"] != pytest.approx(best.perplexity, rel=1e-6)  # other text, other number


def _candidate_reference(session, text, candidates):
    from engine.cache.reference import ensure_reference

    windowing = Windowing(32, 8, start_window=EVAL_WINDOWS)
    return ensure_reference(session.store, session.loaded, str(text), windowing)[1]


def test_random_subset_study_evaluates_no_probe_plans(session):
    calls = []
    evaluate = session.evaluate_ranks
    session.evaluate_ranks = lambda ranks, *a, **k: calls.append(k.get("window_indices")) or evaluate(ranks, *a, **k)
    storage = InMemoryStudyStorage()
    record = _run(storage, session, _settings(session, n_trials=1, subset="random", seed=5), "random")
    expected = choose_subset("random", 4, 8, [], None, seed=5)
    assert record.validation["kind"] == "random" and record.validation["windows"] == expected["windows"]
    assert record.validation["candidate_windows"]["start_window"] == EVAL_WINDOWS
    assert calls[:3] == [expected["windows"]] * 3  # straight to the baselines and the trial


def test_impossible_budget_says_what_is_feasible(session):
    storage = InMemoryStudyStorage()
    # v dense, everything else at rank 8: 2 x (512 + 384 + 512 + 3 x 640) + 2 x 512 = 7,680 of 15,360 kept
    with pytest.raises(BudgetError) as info:
        create_study(storage, session, _settings(session, budget=0.97), name="greedy")
    assert "most it can remove is 50.0%" in str(info.value) and "v dense" in str(info.value)
    with pytest.raises(BudgetError, match="most it can remove is 51.7%"):  # v at rank 8 too: 2 x 384 kept
        create_study(storage, session, _settings(session, budget=0.6, search_v=True), name="greedy-v")
    assert storage.list_studies() == []
    assert create_study(storage, session, _settings(session, budget=0.5), name="edge").study_id == "edge"


def test_groupings_the_model_cannot_have_are_refused(session):
    storage = InMemoryStudyStorage()
    with pytest.raises(RankScopeError, match="5x3 needs at least 3 layers; the model has 2"):
        create_study(storage, session, _settings(session, grouping="5x3"), name="g")
    with pytest.raises(RankScopeError, match="Unknown grouping 'foo'"):
        _settings(session, grouping="foo")
    record = create_study(storage, session, _settings(session), name="mine")
    storage.create_study(replace(record, study_id="other", model_fingerprint="0" * 64))
    with pytest.raises(RankScopeError, match="'other' was made for another model"):
        StudyRunner(storage, session, "other")
    with pytest.raises(RankScopeError, match="No study with id 'nope'"):
        StudyRunner(storage, session, "nope")
    with pytest.raises(RankScopeError, match="session is for method feature-pca, the settings ask for svd"):
        create_study(storage, session, _settings(session, method="svd"), name="svd")


def test_warm_start_from_a_plan_for_another_model_is_refused(session, store, tiny_model_dirs):
    qwen = ModelShapes.of(load_model(str(tiny_model_dirs["qwen2"]), store))
    plan = RankPlan.build(qwen, METHOD, {"model.layers.0.mlp.up_proj": 8})
    with pytest.raises(PlanError) as info:
        warm_start_from_plan(plan, session.shapes, METHOD, Grouping("5x1"))
    message = str(info.value)
    assert f"made for model '{qwen.model_id}'" in message and str(tiny_model_dirs["qwen2"]) in message
    assert f"not for '{session.shapes.model_id}'" in message

    own = session.plan_from_ratios(Grouping("5x1"), {"qk": 0.1, "o": 0.2, "gate": 0.3, "up": 0.3, "down": 0.5})
    ratios = warm_start_from_plan(own, session.shapes, METHOD, Grouping("5x1"))
    assert set(ratios) == set(GROUPS_5X1)
    assert ratios == ratios_from_ranks(session.shapes, METHOD, Grouping("5x1"), own.ranks)
    assert ratios["down"] > ratios["gate"] > 0.0


@pytest.mark.parametrize("warm,words", [
    ({"qk": 0.2, "attn": 0.3}, "does not have: attn"),
    ({"v": 0.2}, "does not have: v"),  # v is kept dense unless searched
    ({"qk@0-0": 0.2}, "does not have: qk@0-0"),
])
def test_warm_start_with_unknown_groups_is_refused(session, warm, words):
    storage = InMemoryStudyStorage()
    with pytest.raises(RankScopeError) as info:
        create_study(storage, session, _settings(session, warm_start=warm), name="warm")
    assert words in str(info.value) and "groups are qk, o, gate, up, down" in str(info.value)
    assert storage.get_study("warm") is None


def test_warm_start_is_the_first_trial_told_to_the_plain_optimiser(session, monkeypatch):
    import skopt

    told = []
    tell = skopt.Optimizer.tell

    def recording_tell(self, x, y, *args, **kwargs):
        told.append((list(x), y))
        return tell(self, x, y, *args, **kwargs)

    monkeypatch.setattr(skopt.Optimizer, "tell", recording_tell)
    storage = InMemoryStudyStorage()
    warm = {"gate": 0.5, "up": 0.5, "down": 0.5}
    _run(storage, session, _settings(session, n_trials=3, warm_start=warm, strategy="bo"), "warm")
    trials = storage.trials("warm")
    assert [(t.kind, t.label) for t in trials] == [
        (TrialKind.BASELINE, "uniform"), (TrialKind.BASELINE, "lord"), (TrialKind.WARM_START, "warm start"),
        (TrialKind.SEARCH, "trial 1"), (TrialKind.SEARCH, "trial 2")]
    start = trials[2]
    assert start.values == {"qk": 0.0, "o": 0.0, "gate": 0.5, "up": 0.5, "down": 0.5}
    attention = [p for p in start.ranks if "self_attn" in p]
    assert attention and all(start.ranks[p] is None for p in attention)  # ratio 0 keeps a group dense
    assert all(start.ranks[p] is not None for p in start.ranks if "mlp" in p)
    _assert_meets_budget(session, trials, 0.3)
    searched = trials[2:]
    assert len(told) == 3  # baselines are not told
    for (x, y), trial in zip(told, searched):
        assert x == pytest.approx([trial.values[g] for g in GROUPS_5X1], abs=1e-12) and y == trial.objective
    assert told[0][0] == [0.0, 0.0, 0.5, 0.5, 0.5]
    assert study_summary(storage, "warm")["trials_done"] == 3


def test_objective_uses_beta_and_the_chosen_kl(session):
    storage = InMemoryStudyStorage()
    cases = {"default": {}, "beta0": {"beta": 0.0}, "forward": {"kl": "forward", "beta": 1000.0}}
    for name, changes in cases.items():
        _run(storage, session, _settings(session, n_trials=1, subset="all", **changes), name)
    for trial in storage.trials("default"):
        assert trial.objective == pytest.approx(math.log(trial.perplexity) + trial.kl_reverse, abs=1e-12)
        assert trial.kl_forward > 0 and trial.kl_reverse > 0 and trial.kl_forward != trial.kl_reverse
    for trial in storage.trials("beta0"):
        assert trial.objective == math.log(trial.perplexity)
    for trial in storage.trials("forward"):
        assert trial.objective == pytest.approx(math.log(trial.perplexity) + 1000 * trial.kl_forward, abs=1e-12)
        assert abs(trial.objective - math.log(trial.perplexity) - 1000 * trial.kl_reverse) > 1e-9
    # the same plans were measured in each study: only the objective differs
    for a, b in zip(storage.trials("default"), storage.trials("beta0")):
        assert a.perplexity == b.perplexity and a.objective > b.objective


# -- the CLI ---------------------------------------------------------------------------------------------

@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def options(tiny_model_dirs, long_text) -> list[str]:
    text = str(long_text)
    return ["--model", str(tiny_model_dirs["llama"]), "--calibration-text", text, "--calibration-windows", "16",
            "--groups", "4", "--eval-text", text, "--eval-windows", str(EVAL_WINDOWS), "--window-len", "32"]


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _user_error(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Error:" in result.stderr and words in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_cli_search_start_status_best_export_and_resume(runner, options, tmp_path, tiny_model_dirs):
    small = ["--subset-candidates", "8", "--subset-size", "4", "--probe-plans", "2", "--budget", "0.3"]
    out = _json(runner.invoke(app, ["search", "start", *options, *small, "--trials", "5", "--initial-points", "3",
                                    "--name", "cli", "--json"]))
    assert out["study_id"] == "cli" and out["state"] == "finished"
    assert out["trials_done"] == out["trials_planned"] == 5
    assert out["settings"]["texts"]["evaluation"]["n_windows"] == EVAL_WINDOWS
    assert [b["label"] for b in out["baselines"]] == ["uniform", "lord"]
    assert set(out["full_text"]) == {"best", "uniform", "lord"}
    assert out["full_text"]["best"]["trial"] == out["best"]["number"]
    assert all(r["tokens"] == TOKENS and r["perplexity"] > 1 for r in out["full_text"].values())
    assert out["validation"]["kind"] == "sensitive" and len(out["validation"]["windows"]) == 4
    storage = DuckDBStudyStorage(open_store())
    trials = storage.trials("cli")
    assert len(trials) == 7
    # the best 4 distinct trials by validation objective and the informed baselines (LoRD here), on all 8 windows
    finalists = out["selection"]["candidates"]
    searched = [t for t in trials if t.kind is not TrialKind.BASELINE]
    distinct = {json.dumps(t.ranks, sort_keys=True) for t in searched}
    lord = next(t for t in trials if t.label == "lord")
    assert [c["number"] for c in finalists][-1] == lord.number and "uniform" not in SELECTABLE_BASELINES
    assert len(finalists) == min(4, len(distinct)) + 1 and out["selection"]["windows"] == 8
    assert min(t.objective for t in searched) == finalists[0]["validation_objective"]
    assert out["best"]["number"] == min(finalists, key=lambda c: c["objective"])["number"]

    listed = _json(runner.invoke(app, ["search", "status", "--json"]))
    assert [s["study_id"] for s in listed] == ["cli"] and listed[0]["state"] == "finished"
    one = _json(runner.invoke(app, ["search", "status", "--study", "cli", "--json"]))
    assert one["best"] == out["best"] and one["full_text"] == out["full_text"]
    best = _json(runner.invoke(app, ["search", "best", "--study", "cli", "--json"]))
    assert best == {"study_id": "cli", "best": out["best"], "full_text": out["full_text"]["best"]}
    text = runner.invoke(app, ["search", "status"])
    assert text.exit_code == 0 and "cli: finished, 5/5 trials" in text.stdout

    plan_file = tmp_path / "best.json"
    result = runner.invoke(app, ["search", "export-plan", "--study", "cli", "--out", str(plan_file)])
    assert result.exit_code == 0, result.output
    plan = RankPlan.load(plan_file)
    chosen = next(t for t in trials if t.number == out["best"]["number"])
    assert plan.ranks == {p: chosen.ranks.get(p) for p in plan.ranks} and set(chosen.ranks) <= set(plan.ranks)
    assert plan.parameters["decoder_linear"]["compressed"] == chosen.decoder_params
    assert plan.metrics["perplexity"] == out["full_text"]["best"]["perplexity"]
    assert plan.provenance["study_id"] == "cli" and plan.provenance["seed"] == 0
    assert plan.grouping["values"] == chosen.projected and plan.grouping["budget"] == 0.3
    assert plan.evaluation["n_windows"] == EVAL_WINDOWS

    import engine.cli.search as search_cli

    with pytest.MonkeyPatch.context() as patch:  # a finished study returns at once: no model, no replay
        patch.setattr(search_cli, "_session_for", lambda settings: pytest.fail("opened a session to resume"))
        again = _json(runner.invoke(app, ["search", "resume", "--study", "cli", "--json"]))
    assert again["state"] == "finished" and again["best"] == out["best"] and again["full_text"] == out["full_text"]
    assert again["resume"] is None
    assert storage.trials("cli") == trials

    # a plan as a warm start: the transferred plan is the study's first told trial
    warm = _json(runner.invoke(app, ["search", "start", *options, *small, "--trials", "2", "--initial-points", "3",
                                     "--warm-start", str(plan_file), "--name", "warm", "--json"]))
    first = storage.trials("warm")[2]
    assert first.kind is TrialKind.WARM_START and warm["trials_done"] == 2
    expected = ratios_from_ranks(ModelShapes.of(load_model(str(tiny_model_dirs["llama"]), open_store())), METHOD,
                                 Grouping("5x1"), plan.ranks)
    assert first.values == pytest.approx(expected, abs=1e-12)

    _user_error(runner.invoke(app, ["search", "start", *options, *small, "--budget", "0.97"]),
                "most it can remove is 50.0%")
    _user_error(runner.invoke(app, ["search", "start", *options, "--grouping", "7x2"]), "Unknown grouping '7x2'")
    _user_error(runner.invoke(app, ["search", "start", *options, *small, "--name", "cli"]), "'cli' already exists")
    qwen = [*options]
    qwen[qwen.index("--model") + 1] = str(tiny_model_dirs["qwen2"])
    _user_error(runner.invoke(app, ["search", "start", *qwen, *small, "--warm-start", str(plan_file)]),
                "This plan was made for model")
    assert sorted(r.study_id for r in storage.list_studies()) == ["cli", "warm"]


@pytest.mark.parametrize("command", [["status", "--study", "nope"], ["best", "--study", "nope"],
                                     ["resume", "--study", "nope"],
                                     ["export-plan", "--study", "nope", "--out", "p.json"]],
                         ids=["status", "best", "resume", "export-plan"])
def test_cli_unknown_study_is_a_readable_error(runner, command):
    _user_error(runner.invoke(app, ["search", *command]), "No study with id 'nope'")


def test_a_study_with_the_same_subset_settings_reuses_the_chosen_windows(session, monkeypatch):
    """beta does not change which windows are sensitive, so a second study skips the probe plans."""
    from engine.search import runner as runner_module

    storage = InMemoryStudyStorage()
    first = create_study(storage, session, _settings(session), name="first")
    StudyRunner(storage, session, first.study_id).run()
    calls = []
    monkeypatch.setattr(runner_module, "choose_subset", lambda *a, **k: calls.append(1) or {})
    second = create_study(storage, session, _settings(session, beta=0.0), name="second")
    StudyRunner(storage, session, second.study_id).run()
    assert calls == []
    reused = storage.get_study("second").validation
    assert reused["reused_from"] == "first"
    assert reused["windows"] == storage.get_study("first").validation["windows"]


def test_cli_status_shows_a_killed_study_as_interrupted_with_the_resume_command(runner, store):
    from engine.search.records import StudyRecord, this_process

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage = DuckDBStudyStorage(store)
    settings = StudySettings(model="m", n_trials=3).to_dict()
    storage.create_study(StudyRecord("killed", "killed", "ab" * 32, settings, StudyState.RUNNING))
    storage.set_state("killed", StudyState.RUNNING, owner={**this_process(), "pid": dead.pid})
    listed = runner.invoke(app, ["search", "status"])
    assert listed.exit_code == 0, listed.output
    assert "killed: interrupted, 0/3 trials, no trials yet - resume with: rankscope search resume --study killed" \
        in listed.stdout
    one = _json(runner.invoke(app, ["search", "status", "--study", "killed", "--json"]))
    assert one["state"] == "interrupted" and one["resume"] == "rankscope search resume --study killed"


def test_cli_status_reads_the_study_files_while_another_process_holds_the_database(runner, store, isolated_cache):
    from engine.search.records import StudyRecord

    storage = DuckDBStudyStorage(store)
    storage.create_study(StudyRecord("busy", "busy", "ab" * 32, StudySettings(model="m", n_trials=4).to_dict(),
                                     StudyState.STOPPED))
    store.close()
    holder = subprocess.Popen(  # another process (a running study, the app) holds the database
        [sys.executable, "-c", "import duckdb, sys, time; held = duckdb.connect(sys.argv[1]); print('held', flush=True); "
         "time.sleep(60)", str(isolated_cache / "rankscope.duckdb")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = runner.invoke(app, ["search", "status"])
        assert result.exit_code == 0, result.output
        assert "in use by another process: reading the study files" in result.stderr
        assert "busy: stopped, 0/4 trials" in result.stdout
    finally:
        holder.kill()
        holder.wait()

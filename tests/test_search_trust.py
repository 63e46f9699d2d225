"""The `trust` search strategy: priors told to the GP, the trust region, curve coordinates, the global allocation.

Same tiny llama and windows as tests/test_search.py (its fixtures and helpers are reused).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.compression.grouping import MAX_RATIO, Grouping, budget_target
from engine.compression.sweep import sweep_by_type
from engine.compression.units import RANK_STEP, count_parameters
from engine.records import SensitivityPoint
from engine.search import proposals
from engine.search.baselines import global_allocation, layer_shares
from engine.analysis.search_summary import selection_rows
from engine.errors import RankScopeError
from engine.search.records import SELECTABLE_BASELINES, SELECTION, InMemoryStudyStorage, TrialKind
from engine.search.runner import StudyRunner, create_study, factor_energies
from engine.search.settings import StudySettings
from engine.search.summary import best_trial, study_summary, trial_plan
from tests.test_search import (  # noqa: F401  (fixtures)
    GROUPS_5X1, METHOD, MAX_STEP, Killed, _assert_meets_budget, killed_after, _run, _same_trial, _settings, long_text, session,
)


# -- curve coordinates -------------------------------------------------------------------------------------
def test_curve_grouping_interpolates_knots_over_depth(session):
    shapes = session.shapes
    curve = Grouping.parse("curve2")
    assert curve.kind == "curve" and curve.label == "curve2"
    assert set(curve.groups(shapes, METHOD)) == set(Grouping.parse("per-layer").groups(shapes, METHOD))
    dims = curve.search_dims(shapes, METHOD)
    assert dims == [f"{t}~{k}" for t in ("q", "k", "o", "gate", "up", "down") for k in (0, 1)]
    # two layers, two knots: each layer is one knot
    values = {d: 0.05 * (i + 1) for i, d in enumerate(dims)}
    expanded = curve.expand(shapes, METHOD, values)
    assert expanded["q@0"] == pytest.approx(values["q~0"]) and expanded["down@1"] == pytest.approx(values["down~1"])
    assert curve.fit(shapes, METHOD, expanded) == pytest.approx(values)
    # the linear budget model: a coordinate's weight is the dense parameters it scales
    groups = curve.groups(shapes, METHOD)
    assert sum(curve.dim_params(shapes, METHOD).values()) == pytest.approx(
        sum(u.dense_params for units in groups.values() for u in units))


def test_curve_knots_weigh_layers_linearly():
    curve = Grouping("curve", 3)
    assert curve.knot_weights(0, 30) == [1.0, 0.0, 0.0]
    assert curve.knot_weights(29, 30) == pytest.approx([0.0, 0.0, 1.0])
    middle = curve.knot_weights(7, 30)
    assert sum(middle) == pytest.approx(1.0) and middle[2] == 0.0 and 0 < middle[1] < middle[0]
    for bad in ("curve1", "curve", "curvex"):
        with pytest.raises(Exception, match="grouping|knots"):
            Grouping.parse(bad)


def test_curve_study_searches_knots_and_meets_the_budget(session):
    storage = InMemoryStudyStorage()
    _run(storage, session, _settings(session, grouping="curve2", n_trials=3, n_initial_points=2), "curve")
    trials = storage.trials("curve")
    searched = [t for t in trials if t.kind is not TrialKind.BASELINE]
    dims = Grouping.parse("curve2").search_dims(session.shapes, METHOD)
    for trial in searched:
        assert list(trial.values) == dims and "q@0" in trial.projected
    _assert_meets_budget(session, trials, 0.3)
    chosen, plan = trial_plan(storage, "curve", lambda _settings: session)
    assert plan.ranks == {p: chosen.ranks.get(p) for p in plan.ranks}


# -- the global allocation -------------------------------------------------------------------------------
def _points(losses: dict[str, float]) -> list[SensitivityPoint]:
    """Per-type points at 0.2/0.4/0.6 whose log-perplexity rises by `losses[type]` per 0.2 of ratio."""
    return [SensitivityPoint("s", t, -1, r, 0, 10.0 * math.exp(slope * r / 0.2), 0.0, 0.0, 0.0)
            for t, slope in losses.items() for r in (0.2, 0.4, 0.6)]


def test_global_allocation_spends_the_budget_where_the_measured_loss_is_small(session):
    shapes, energies = session.shapes, factor_energies(session.factorization)
    losses = {"q": 0.01, "k": 0.01, "v": 5.0, "o": 0.02, "gate": 0.05, "up": 0.05, "down": 3.0}
    ranks = global_allocation(shapes, METHOD, 0.25, _points(losses), 10.0, energies)
    target = budget_target(shapes, 0.25)
    compressed = count_parameters(shapes, METHOD, ranks).decoder_compressed
    assert target - MAX_STEP <= compressed <= target
    # the costly types stay dense, the cheap ones carry the budget
    assert all(ranks[p] is None for p in ranks if p.endswith(("v_proj", "down_proj")))
    assert any(ranks[p] is not None for p in ranks if p.endswith(("q_proj", "k_proj")))
    # nothing measured: no allocation; a swept range that cannot reach the budget: none either
    assert global_allocation(shapes, METHOD, 0.25, [], 10.0, energies) is None
    assert global_allocation(shapes, METHOD, 0.6, _points(losses), 10.0, energies) is None


def _layer_points(linear_type: str, losses: dict[int, float], ratio: float = 0.4) -> list[SensitivityPoint]:
    """Per-layer points of one type at one ratio: layer -> its log-perplexity rise."""
    return [SensitivityPoint("s", linear_type, layer, ratio, 0, 10.0 * math.exp(loss), 0.0, 0.0, 0.0)
            for layer, loss in losses.items()]


def test_layer_shares_need_every_layer_and_ignore_gains():
    points = [*_layer_points("up", {0: 0.3, 1: 0.1}), *_layer_points("up", {0: 0.2, 1: -0.05}, ratio=0.6),
              *_layer_points("gate", {0: 0.5}), *_layer_points("down", {0: -0.1, 1: -0.2})]
    shares = layer_shares(points, 10.0, {"up": {0, 1}, "gate": {0, 1}, "down": {0, 1}})
    # up: 0.75/0.25 at 0.4, 1/0 at 0.6 (a gain counts as no loss), averaged
    assert shares["up"] == pytest.approx({0: 0.875, 1: 0.125})
    assert "gate" not in shares  # layer 1 not measured: cannot share the type out
    assert "down" not in shares  # no layer loses anything: nothing to share


def test_global_allocation_follows_measured_layer_sensitivity(session):
    shapes, energies = session.shapes, factor_energies(session.factorization)
    losses = {"q": 0.05, "k": 0.05, "v": 5.0, "o": 0.05, "gate": 0.05, "up": 0.05, "down": 3.0}
    by_energy = global_allocation(shapes, METHOD, 0.25, _points(losses), 10.0, energies)
    # layer 0's MLP measured far more sensitive than layer 1's: layer 1 carries more of the MLP's share
    layered = [*_points(losses), *_layer_points("gate", {0: 0.4, 1: 0.001}), *_layer_points("up", {0: 0.4, 1: 0.001})]
    ranks = global_allocation(shapes, METHOD, 0.25, layered, 10.0, energies)
    target = budget_target(shapes, 0.25)
    assert target - MAX_STEP <= count_parameters(shapes, METHOD, ranks).decoder_compressed <= target
    assert ranks != by_energy

    def rank(layer: int, name: str) -> float:  # dense counts as the largest rank
        found = [r for p, r in ranks.items() if f".{layer}.mlp.{name}" in p]
        return math.inf if found[0] is None else found[0]

    for name in ("gate_proj", "up_proj"):
        assert rank(1, name) <= rank(0, name)
    assert any(rank(1, name) < rank(0, name) for name in ("gate_proj", "up_proj"))


def test_factor_energies_are_squared_singular_values_for_svd(session):
    import torch

    from engine.methods.base import Factorization, Factors

    u, s, vh = torch.linalg.svd(torch.randn(6, 4, dtype=torch.float64), full_matrices=False)
    factors = Factorization("svd", {"w": Factors(B=u.float(), A=(torch.diag(s) @ vh).float())})
    assert factor_energies(factors)["w"] == pytest.approx((s ** 2).numpy(), rel=1e-5)


# -- proposals ---------------------------------------------------------------------------------------------
def _told(objectives, kinds):
    return [proposals.Told((0.1 * i, 0.2), y, k) for i, (y, k) in enumerate(zip(objectives, kinds))]


def test_phases_and_trust_radius():
    assert proposals.phase_of(_told([1.0], ["prior"]), 2) == proposals.RANDOM
    history = _told([1.0, 1.0, 1.0], ["prior", "random", "random"])
    kinds = []
    for _ in range(6):
        kind = proposals.phase_of(history, 2)
        kinds.append(kind)
        history.append(proposals.Told((0.0, 0.0), 2.0, kind))
    assert kinds == ["local", "local", "global", "local", "local", "global"]
    # two improvements in a row double the radius; three misses halve it; below the minimum it starts again
    start = _told([3.0], ["random"])
    assert proposals.trust_radius(start) == proposals.INITIAL_RADIUS
    grown = start + _told([2.0, 1.0], ["local", "local"])
    assert proposals.trust_radius(grown) == 2 * proposals.INITIAL_RADIUS
    shrunk = start + _told([4.0, 4.0, 4.0], ["local", "global", "local"])
    assert proposals.trust_radius(shrunk) == proposals.INITIAL_RADIUS / 2
    many = start + _told([4.0] * 3 * 4, ["local"] * 12)  # 0.2 -> 0.1 -> 0.05 -> 0.025 -> 0.0125 < min: again 0.2
    assert proposals.trust_radius(many) == proposals.INITIAL_RADIUS


def test_local_proposal_stays_near_the_incumbent_on_the_budget_plane():
    rng = np.random.default_rng(0)
    weights = np.array([1.0, 2.0, 1.0])
    points = rng.uniform(0, 1, (12, 3))
    points = proposals.onto_budget_plane(points, weights, 1.2, 1.0)
    assert points @ weights == pytest.approx(np.full(12, 1.2), abs=0.05)  # clipping: near the plane
    history = [proposals.Told(tuple(p), float(np.sum((p - 0.3) ** 2)), "random") for p in points]
    first = proposals.propose(history, proposals.LOCAL, weights, [1.0] * 3, 0, 20)
    again = proposals.propose(history, proposals.LOCAL, weights, [1.0] * 3, 0, 20)
    assert np.array_equal(first, again)  # a pure function of history, seed and index
    incumbent = np.array(min(history, key=lambda t: t.objective).coordinates)
    assert first @ weights == pytest.approx(1.2, abs=0.05)
    assert np.abs(first - incumbent).max() <= 2 * proposals.INITIAL_RADIUS + 0.2  # near, up to the plane's pull


# -- a trust study -----------------------------------------------------------------------------------------
def test_trust_study_tells_lord_greedy_and_the_global_allocation_before_searching(session, monkeypatch):
    sweep_by_type(session, (0.2, 0.4, 0.6))
    seen = []
    fit = proposals.fit_gp

    def recording_fit(history, *args):
        seen.append([(t.proposal, t.objective) for t in history])
        return fit(history, *args)

    monkeypatch.setattr(proposals, "fit_gp", recording_fit)
    storage = InMemoryStudyStorage()
    warm = {"qk": 0.2, "o": 0.2, "gate": 0.3, "up": 0.3, "down": 0.3}
    _run(storage, session, _settings(session, n_trials=4, n_initial_points=1, warm_start=warm), "trust")
    trials = storage.trials("trust")
    assert [(t.kind, t.label) for t in trials] == [
        (TrialKind.BASELINE, "uniform"), (TrialKind.BASELINE, "lord"), (TrialKind.BASELINE, "greedy"),
        (TrialKind.BASELINE, "global"), (TrialKind.WARM_START, "warm start"), (TrialKind.PRIOR, "global (prior)"),
        (TrialKind.SEARCH, "trial 2"), (TrialKind.SEARCH, "trial 3")]
    by_label = {t.label: t for t in trials}
    assert [t.extra["proposal"] for t in trials[6:]] == ["random", "local"]
    _assert_meets_budget(session, trials, 0.3)
    # the GP fitted for the one model-phase trial knew lord and greedy (as measured), the warm start, the
    # global prior and the random trial, and nothing of uniform (its plan compresses v, which the study cannot)
    assert len(seen) == 1
    assert seen[0] == [("prior", by_label["lord"].objective), ("prior", by_label["greedy"].objective),
                       ("prior", by_label["warm start"].objective), ("prior", by_label["global (prior)"].objective),
                       ("random", by_label["trial 2"].objective)]
    # the global baseline's own plan is finer than 5x1; its prior is the 5x1 point nearest to it
    assert by_label["global"].ranks != by_label["global (prior)"].ranks
    assert by_label["global (prior)"].values == pytest.approx(by_label["global"].values)
    assert set(study_summary(storage, "trust")["full_text"]) == {"best", "uniform", "lord", "greedy", "global"}


def test_killed_trust_study_resumes_to_the_same_trials(session):
    sweep_by_type(session, (0.2, 0.4, 0.6))
    settings = _settings(session, n_trials=5, n_initial_points=1)
    whole = InMemoryStudyStorage()
    _run(whole, session, settings, "whole")
    killed = InMemoryStudyStorage()
    with pytest.raises(Killed):
        _run(killed, session, settings, "killed", on_trial=killed_after(2))
    StudyRunner(killed, session, "killed").run()
    expected, resumed = whole.trials("whole"), killed.trials("killed")
    assert [t.label for t in resumed] == [t.label for t in expected]
    assert sum(t.extra.get("proposal") == "local" for t in resumed) >= 2  # the model phase was resumed
    for a, b in zip(expected, resumed):
        _same_trial(a, b)


def test_remeasure_reuses_a_plan_another_study_measured(session, monkeypatch):
    storage = InMemoryStudyStorage()
    _run(storage, session, _settings(session, n_trials=1), "first")
    calls = []
    evaluate = session.evaluate_ranks

    def counting(ranks, *args, **kwargs):
        if kwargs.get("windows") is None:  # a full-window measurement
            calls.append(dict(ranks))
        return evaluate(ranks, *args, **kwargs)

    monkeypatch.setattr(session, "evaluate_ranks", counting)
    _run(storage, session, _settings(session, n_trials=1, seed=1), "second")
    first, second = storage.results("first"), storage.results("second")
    # uniform and LoRD are the same plans in both studies: measured once, by the first
    for label in ("uniform", "lord"):
        assert {k: second[label][k] for k in ("perplexity", "kl_forward", "kl_reverse")} == \
            {k: first[label][k] for k in ("perplexity", "kl_forward", "kl_reverse")}
    uniform_ranks = next(t.ranks for t in storage.trials("second") if t.label == "uniform")
    assert all(c != uniform_ranks for c in calls)
    assert len(calls) <= 1  # only the best plan, when it is new


# -- the final selection -----------------------------------------------------------------------------------
def test_final_selection_measures_the_best_plans_on_every_candidate_window_and_chooses_there(session):
    storage = InMemoryStudyStorage()
    settings = _settings(session, n_trials=6, n_initial_points=3, subset_size=2, select_top=3)
    assert settings.to_dict()["select_top"] == 3
    _run(storage, session, settings, "selected")
    results = storage.results("selected")
    selection = results[SELECTION]
    trials = sorted(storage.trials("selected"), key=lambda t: (t.objective, t.number))
    searched = [t for t in trials if t.kind is not TrialKind.BASELINE]
    informed = [t for t in trials if t.kind is TrialKind.BASELINE and t.label in SELECTABLE_BASELINES]
    assert informed and "uniform" not in {t.label for t in informed}  # the priors compete, the naive reference not
    distinct = []
    for trial in searched:
        if all(trial.ranks != other.ranks for other in distinct):
            distinct.append(trial)
    finalists = distinct[:3] + [t for t in informed if all(t.ranks != other.ranks for other in distinct[:3])]
    assert [c["number"] for c in selection["candidates"]] == [t.number for t in finalists]
    windows, reference = StudyRunner(storage, session, "selected").validation_reference()
    assert selection["windows"] == len(windows) == 8
    by_number = {t.number: t for t in trials}
    for candidate in selection["candidates"]:  # each finalist measured again, independently, on all 8 windows
        trial = by_number[candidate["number"]]
        assert candidate["validation_objective"] == trial.objective
        again = session.evaluate_ranks(trial.ranks, windows=windows, reference=reference)
        assert candidate["perplexity"] == pytest.approx(again.perplexity, rel=1e-6)
        assert candidate["objective"] == pytest.approx(math.log(again.perplexity) + again.kl_reverse, rel=1e-6)
    chosen = min(selection["candidates"], key=lambda c: c["objective"])["number"]
    assert best_trial(storage, "selected").number == chosen == results["best"]["trial"]
    summary = study_summary(storage, "selected")
    assert SELECTION not in summary["full_text"] and summary["selection"] == selection
    assert summary["best"]["number"] == chosen
    rows = selection_rows(selection)
    assert rows[0]["trial"] == chosen and len(rows) == len(finalists)


def test_a_baseline_the_selection_chooses_is_the_best_plan_and_is_measured_once(session, monkeypatch):
    storage = InMemoryStudyStorage()
    measured = []
    original_measure = StudyRunner._measure

    def counting(self, ranks, channels=None, **kwargs):
        if "windows" not in kwargs:  # the full evaluation windows
            measured.append(sorted(ranks.items(), key=lambda kv: kv[0]))
        return original_measure(self, ranks, channels, **kwargs)

    def lord_wins(self, windows, reference, subset):  # a selection whose best on every candidate window is LoRD
        lord = next(t for t in self.storage.trials(self.record.study_id) if t.label == "lord")
        other = next(t for t in self.storage.trials(self.record.study_id) if t.kind is not TrialKind.BASELINE)
        self.storage.put_result(self.record.study_id, SELECTION, {"windows": len(windows), "candidates": [
            {"number": other.number, "validation_objective": other.objective, "objective": 2.0},
            {"number": lord.number, "validation_objective": lord.objective, "objective": 1.0}]})

    monkeypatch.setattr(StudyRunner, "_measure", counting)
    monkeypatch.setattr(StudyRunner, "_select", lord_wins)
    _run(storage, session, _settings(session, n_trials=3, n_initial_points=2, subset_size=2, select_top=2), "prior")
    lord = next(t for t in storage.trials("prior") if t.label == "lord")
    assert best_trial(storage, "prior").number == lord.number
    results = storage.results("prior")
    assert results["best"]["trial"] == results["lord"]["trial"] == lord.number
    assert results["best"]["perplexity"] == results["lord"]["perplexity"]
    lord_plan = sorted(lord.ranks.items(), key=lambda kv: kv[0])
    assert measured.count(lord_plan) == 1  # the same plan under two labels: one full-text evaluation
    summary = study_summary(storage, "prior")
    assert summary["best"]["label"] == "lord" and summary["trials_done"] == 3


def test_without_a_final_selection_the_best_is_the_lowest_validation_objective_and_old_settings_read_so(session):
    storage = InMemoryStudyStorage()
    settings = _settings(session, n_trials=4, n_initial_points=2, select_top=1)
    assert "select_top" not in settings.to_dict()  # a study without selection keeps the settings dict it always had
    _run(storage, session, settings, "plain")
    assert SELECTION not in storage.results("plain")
    searched = [t for t in storage.trials("plain") if t.kind is not TrialKind.BASELINE]
    assert best_trial(storage, "plain").number == min(searched, key=lambda t: t.objective).number
    old = {k: v for k, v in _settings(session).to_dict().items() if k != "select_top"}
    assert StudySettings.from_dict(old).select_top == 1
    with pytest.raises(RankScopeError, match="select_top"):
        _settings(session, select_top=0)

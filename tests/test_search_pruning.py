"""Search studies that allocate attention ranks and per-block MLP pruning together (issue #13, "Allocation").

The tiny llama (two layers, 32-wide, 48 MLP channels) with the windows of tests/test_search.py: a study with
`mlp="prune"` searches qk, o and one `mlp-prune` group per layer block, projects each point onto the budget
counting pruned MLPs, stores kept channels with each trial, and has LoRAP's allocation as a baseline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.cli import app
from engine.compression.grouping import (
    BudgetError, Grouping, budget_target, channels_from_values, kept_for_value, project_mixed_to_budget,
    project_to_budget, pruning_groups,
)
from engine.compression.lorap import lorap_allocation
from engine.compression.plan import SCHEMA_V2, RankPlan
from engine.compression.units import RANK_STEP, count_parameters
from engine.errors import RankScopeError
from engine.search.duckdb_storage import DuckDBStudyStorage
from engine.search.mirror import StudyMirror
from engine.search.records import SELECTION, InMemoryStudyStorage, StudyState, TrialKind
from engine.search.runner import StudyRunner, study_groups
from engine.search.settings import StudySettings
from engine.search.summary import study_summary, trial_plan
from engine.store import open_store
from tests.app_testing import workbench  # noqa: F401 (a fixture)
from tests.test_search import (  # noqa: F401  (fixtures)
    MAX_STEP, METHOD, TOKENS, Killed, _json, killed_after, _open_session, _run, _same_trial, _settings, long_text, options, runner,
    session,
)

D_MODEL, D_FF = 32, 48
CHANNEL = 3 * D_MODEL  # parameters of one MLP channel (gate row, up row, down column)
MLPS = ["model.layers.0.mlp", "model.layers.1.mlp"]


def _prune_settings(session, **changes) -> StudySettings:
    return _settings(session, mlp="prune", **changes)


def _assert_trial_meets_budget(session, trial, budget, tolerance=MAX_STEP) -> None:
    target = budget_target(session.shapes, budget)
    counts = count_parameters(session.shapes, METHOD, trial.ranks, trial.channels)
    assert trial.decoder_params == counts.decoder_compressed, trial.label
    assert target - tolerance <= trial.decoder_params <= target, (trial.label, trial.decoder_params, target)
    assert trial.total_params == counts.total_compressed
    for mlp in session.shapes.mlps:  # a pruned MLP keeps gate, up and down dense
        if (trial.channels or {}).get(mlp.path) is not None:
            assert all(trial.ranks[p] is None for p in mlp.paths), trial.label


# -- pure pieces -------------------------------------------------------------------------------------------

def test_pruning_groups_replace_gate_up_down_with_one_group_per_block(session):
    shapes = session.shapes
    rank, prune = pruning_groups(shapes, METHOD, Grouping.parse("5x1"))
    assert list(rank) == ["qk", "o"] and list(prune) == ["mlp-prune"]
    assert [m.path for m in prune["mlp-prune"]] == MLPS
    rank, prune = pruning_groups(shapes, METHOD, Grouping.parse("5x2", search_v=True))
    assert list(rank) == ["qk@0-0", "v@0-0", "o@0-0", "qk@1-1", "v@1-1", "o@1-1"]
    assert list(prune) == ["mlp-prune@0-0", "mlp-prune@1-1"]
    per_layer = pruning_groups(shapes, METHOD, Grouping.parse("per-layer"))[1]
    assert list(per_layer) == ["mlp-prune@0", "mlp-prune@1"]
    assert study_groups(_prune_settings(session, grouping="5x2"), shapes, METHOD) == \
        ["qk@0-0", "o@0-0", "qk@1-1", "o@1-1", "mlp-prune@0-0", "mlp-prune@1-1"]
    assert kept_for_value(48, 0.0) is None and kept_for_value(48, 0.25) == 36 and kept_for_value(48, 0.99) == 1
    assert kept_for_value(48, 0.001) is None  # rounds to every channel: not pruned
    assert channels_from_values(per_layer, {"mlp-prune@0": 0.5}) == {MLPS[0]: 24, MLPS[1]: None}


@pytest.mark.parametrize("grouping", ["5x1", "5x2", "per-layer"])
@pytest.mark.parametrize("budget", [0.1, 0.3, 0.5])
def test_mixed_projection_meets_the_budget_within_one_step(session, grouping, budget):
    shapes = session.shapes
    target = budget_target(shapes, budget)
    names = study_groups(_prune_settings(session, grouping=grouping), shapes, METHOD)
    rng = np.random.default_rng(0)
    for _ in range(12):
        values = {g: float(rng.uniform(0.0, 0.9)) for g in names}
        ranks, channels, projected = project_mixed_to_budget(shapes, METHOD, Grouping.parse(grouping), values, target)
        params = count_parameters(shapes, METHOD, ranks, channels).decoder_compressed
        assert target - MAX_STEP <= params <= target, (values, params, target)
        assert set(projected) == set(names)
        for mlp in shapes.mlps:
            assert all(ranks[p] is None for p in mlp.paths)
            assert channels[mlp.path] is None or 1 <= channels[mlp.path] < D_FF
        if any(k is not None and k + 1 < D_FF for k in channels.values()):
            assert target - params < max(CHANNEL, RANK_STEP * (32 + 32))  # one channel or one attention rank step


def test_mixed_projection_keeps_unasked_groups_and_refuses_the_impossible(session):
    shapes, grouping = session.shapes, Grouping.parse("5x1")
    target = budget_target(shapes, 0.3)
    ranks, channels, projected = project_mixed_to_budget(shapes, METHOD, grouping, {"mlp-prune": 0.5}, target)
    assert projected["qk"] == projected["o"] == 0.0 and all(k is not None for k in channels.values())
    assert all(r is None for r in ranks.values())  # attention stays dense: the MLPs alone meet the budget
    with pytest.raises(BudgetError, match="infeasible"):
        project_mixed_to_budget(shapes, METHOD, grouping, {"qk": 0.5}, budget_target(shapes, 0.95))
    with pytest.raises(BudgetError, match="Unknown group"):
        project_mixed_to_budget(shapes, METHOD, grouping, {"gate": 0.5}, target)


def test_settings_with_pruning_round_trip_and_without_it_are_unchanged():
    plain = StudySettings(model="m")
    assert "mlp" not in plain.to_dict() and "pruning" not in plain.to_dict()  # the dict every earlier study had
    assert StudySettings.from_dict(plain.to_dict()) == plain
    pruned = StudySettings(model="m", grouping="5x2", mlp="prune")
    assert pruned.pruning == {"aggregation": "l2", "retention": 0.01} and pruned.to_dict()["mlp"] == "prune"
    assert StudySettings.from_dict(json.loads(json.dumps(pruned.to_dict()))) == pruned
    assert pruned.length_scale("mlp-prune@0-0") == 0.8
    assert StudySettings(mlp="prune", pruning={"aggregation": "l1", "retention": 0.0}).pruning["aggregation"] == "l1"
    with pytest.raises(RankScopeError, match="low-rank, prune"):
        StudySettings(mlp="sparse")
    with pytest.raises(RankScopeError, match="only to a study that prunes"):
        StudySettings(pruning={"aggregation": "l2"})
    with pytest.raises(RankScopeError, match="aggregation"):
        StudySettings(mlp="prune", pruning={"aggregation": "median"})


# -- studies -------------------------------------------------------------------------------------------------

def test_pruning_study_stores_channels_meets_the_budget_and_has_lorap(session, store):
    storage = DuckDBStudyStorage(store)
    record = _run(storage, session, _prune_settings(session, n_trials=3), "prune")
    assert record.state is StudyState.FINISHED
    trials = storage.trials("prune")
    # LoRAP's allocation is also told to the search as a prior trial at its nearest point of the study's groups
    assert [t.label for t in trials] == ["uniform", "lorap", "lorap (prior)", "trial 1", "trial 2"]
    assert trials[2].kind is TrialKind.PRIOR
    assert trials[2].values == pytest.approx({g: trials[1].values[g] for g in trials[2].values})
    for trial in trials[:1] + trials[2:]:
        _assert_trial_meets_budget(session, trial, 0.3)
        assert set(trial.values) == set(trial.projected) == {"qk", "o", "mlp-prune"}
        assert set(trial.channels) == set(MLPS) and all(k is not None for k in trial.channels.values())
    lorap = trials[1]
    ranks, channels = lorap_allocation(session.shapes, 0.3)
    assert lorap.kind is TrialKind.BASELINE and lorap.ranks == ranks and lorap.channels == channels
    _assert_trial_meets_budget(session, lorap, 0.3, tolerance=len(MLPS) * CHANNEL)
    assert lorap.values["mlp-prune"] == pytest.approx(1 - sum(channels.values()) / (2 * D_FF))
    # kept channels survive the database, its JSON mirror, and the summary names the skipped baselines
    assert [t.channels for t in StudyMirror(storage.mirror).trials("prune")] == [t.channels for t in trials]
    summary = study_summary(storage, "prune")
    assert [b["label"] for b in summary["baselines"]] == ["uniform", "lorap"]
    assert set(summary["skipped_baselines"]) == {"lord", "greedy"}
    assert set(summary["full_text"]) == {"best", "uniform", "lorap"}
    assert all(r["tokens"] == TOKENS for r in summary["full_text"].values())
    # channels change the measurement: the same ranks without pruning measure differently
    best = min(trials[2:], key=lambda t: t.objective)
    assert summary["full_text"]["best"]["trial"] == best.number
    dense_mlp = session.evaluate_ranks(best.ranks).perplexity
    assert dense_mlp != pytest.approx(summary["full_text"]["best"]["perplexity"], abs=1e-9)

    # the best trial as a v2 plan that session.evaluate reproduces
    chosen, plan = trial_plan(storage, "prune", lambda _settings: session)
    assert chosen.number == best.number
    assert plan.to_dict()["schema"] == SCHEMA_V2 and plan.channels == best.channels
    assert plan.pruning == {"aggregation": "l2", "retention": 0.01} and plan.grouping["mlp"] == "prune"
    assert plan.parameters["decoder_linear"]["compressed"] == best.decoder_params
    again = session.evaluate(RankPlan.from_json(plan.to_json()))
    for name in ("perplexity", "kl_forward", "kl_reverse"):
        assert again.metrics[name] == pytest.approx(plan.metrics[name], rel=1e-6, abs=1e-9), name


def test_killed_pruning_study_resumes_to_the_same_trials(session, store, tiny_model_dirs, long_text):
    settings = _prune_settings(session, grouping="5x2", n_trials=4, n_initial_points=2)
    whole = InMemoryStudyStorage()
    _run(whole, session, settings, "whole")
    expected = whole.trials("whole")
    assert [t.label for t in expected] == ["uniform", "lorap", "lorap (prior)", "trial 1", "trial 2", "trial 3"]

    killed = DuckDBStudyStorage(store)
    with pytest.raises(Killed):
        _run(killed, session, settings, "killed", on_trial=killed_after(2))
    assert len(killed.trials("killed")) == 5
    store.close()
    store = open_store()
    resumed_storage = DuckDBStudyStorage(store)
    again = StudyRunner(resumed_storage, _open_session(store, tiny_model_dirs["llama"], long_text), "killed").run()
    assert again.state is StudyState.FINISHED
    resumed = resumed_storage.trials("killed")
    assert len(resumed) == len(expected)
    for a, b in zip(expected, resumed):
        _same_trial(a, b)
        assert a.channels == b.channels, a.label
    assert set(resumed_storage.results("killed")) == {"best", "uniform", "lorap", SELECTION}


def test_a_study_without_pruning_is_unchanged(session, store):
    settings = _settings(session, n_trials=2)
    assert "mlp" not in settings.to_dict()
    storage = DuckDBStudyStorage(store)
    _run(storage, session, settings, "plain")
    trials = storage.trials("plain")
    assert [t.label for t in trials] == ["uniform", "lord", "trial 0", "trial 1"]
    assert all(t.channels is None for t in trials)
    assert "skipped_baselines" not in study_summary(storage, "plain")
    target = budget_target(session.shapes, 0.3)
    for trial in trials[2:]:  # the projection is the one it always was
        assert (trial.ranks, trial.projected) == project_to_budget(session.shapes, METHOD, Grouping.parse("5x1"),
                                                                   trial.values, target)
    _, plan = trial_plan(storage, "plain", lambda _settings: session)
    assert plan.to_dict()["schema"] == "rankscope.plan/v1" and plan.channels is None and "mlp" not in plan.grouping
    # rows written before the channels column read as None
    store.execute("UPDATE trials SET channels_json = NULL WHERE study_id = 'plain'")
    assert [t.channels for t in storage.trials("plain")] == [None] * 4


def test_cli_search_start_with_mlp_prune_exports_a_v2_plan(runner, options, tmp_path):
    small = ["--subset-candidates", "8", "--subset-size", "4", "--probe-plans", "2", "--budget", "0.3"]
    out = _json(runner.invoke(app, ["search", "start", *options, *small, "--trials", "2", "--initial-points", "2",
                                    "--mlp", "prune", "--name", "cli-prune", "--json"]))
    assert out["state"] == "finished" and out["settings"]["mlp"] == "prune"
    assert [b["label"] for b in out["baselines"]] == ["uniform", "lorap"]
    assert set(out["skipped_baselines"]) == {"lord", "greedy"}
    plan_file = tmp_path / "best.json"
    result = runner.invoke(app, ["search", "export-plan", "--study", "cli-prune", "--out", str(plan_file)])
    assert result.exit_code == 0, result.output
    plan = RankPlan.load(plan_file)
    assert plan.to_dict()["schema"] == SCHEMA_V2 and set(plan.channels) == set(MLPS)
    assert plan.metrics["perplexity"] == out["full_text"]["best"]["perplexity"]
    text = runner.invoke(app, ["search", "status", "--study", "cli-prune"])
    assert text.exit_code == 0 and "MLPs pruned" in text.stdout and "baseline lord skipped" in text.stdout


def test_search_page_starts_a_pruning_study(workbench):  # noqa: F811 (a fixture)
    from tests.app_testing import assert_clean, open_app, run_until
    from tests.test_app_search import _start_tiny_study, _study_finished

    at = open_app("search")
    assert at.radio(key="search_mlp").value == "low-rank"
    at.radio(key="search_mlp").set_value("prune")
    _start_tiny_study(at, "tiny-prune", trials=2)
    run_until(at, _study_finished)
    assert_clean(at)
    storage = DuckDBStudyStorage(open_store())
    assert StudySettings.from_dict(storage.get_study("tiny-prune").settings).mlp == "prune"
    trials = storage.trials("tiny-prune")
    assert [t.label for t in trials if t.kind is TrialKind.BASELINE] == ["uniform", "lorap"]
    assert all(t.channels for t in trials)
    assert any("MLPs pruned" in m.value for m in at.markdown)
    at.button(key="use_best_plan").click().run()
    run_until(at, lambda a: bool(a.success))
    assert_clean(at)
    saved = RankPlan.from_dict(at.session_state["alloc_saved_plans"]["tiny-prune-best"])
    assert saved.channels and saved.to_dict()["schema"] == SCHEMA_V2

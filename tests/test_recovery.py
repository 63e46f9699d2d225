"""Recovery after compression on tiny models: the folding maths, runs (stored, resumed exactly), recovered
plans through evaluate and export, the `rankscope recover` command, and the bad input the issue names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from engine.cli import app
from engine.compression.lowrank import LowRankLinear, compress_, restore_
from engine.compression.plan import PlanError, RankPlan
from engine.compression.recovered import (
    ScaledBasisLinear, SubspaceLinear, apply_recovery_, attach_, fold_, prune_to_ranks_, vectors_of,
)
from engine.compression.session import CompressionSession
from engine.errors import RankScopeError
from engine.export import export_compressed
from engine.models.loading import load_model
from engine.recovery.settings import RecoverySettings
from engine.recovery.training import RecoveryInterrupted, checkpoint_path, checkpoint_state, recover, run_id_for
from engine.records import RecoveryRecord
from engine.store import open_store
from engine.store.arrays import load_arrays
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing
from tests.tiny_models import TRAINING_TEXT

FAST = dict(steps=6, batch_windows=2, training_windows=12, validation_windows=2, eval_every=3, checkpoint_every=2,
            learning_rate=0.05)


@pytest.fixture(scope="module")
def long_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recovery-text") / "text.txt"
    path.write_text(TRAINING_TEXT * 60)
    return path


def _session(store, model_dir: Path, text: Path, method: str = "feature-pca") -> CompressionSession:
    texts = TextSettings(str(text), Windowing(32, 8), 4, str(text), Windowing(32, 4))
    return CompressionSession.open(store, load_model(str(model_dir), store), method, texts)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb(wrappers, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in wrappers.values():
            for p in w.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=generator))


# -- the maths ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["feature-pca", "joint-svd"])
@pytest.mark.parametrize("kind", ["subspace", "basis"])
def test_training_starts_at_the_compressed_model_and_folding_keeps_the_trained_function(
        store, tiny_model_dirs, long_text, method, kind):
    session = _session(store, tiny_model_dirs["llama"], long_text, method)
    model, ids = session.loaded.model, session.windows[:2]
    plan = session.uniform_plan(0.3)
    compress_(model, plan.ranks, session.factorization)
    try:
        compressed = _logits(model, ids)
        wrappers = attach_(model, kind, subset=3)
        assert torch.allclose(_logits(model, ids), compressed, atol=1e-6)  # Λ_b = 0 / s = 1: nothing changed yet
        _perturb(wrappers)
        if kind == "basis":
            prune_to_ranks_(wrappers, {p: max(1, w.base.rank - 2) for p, w in wrappers.items()})
        trained = _logits(model, ids)
        assert not torch.allclose(trained, compressed, atol=1e-3)
        ranks = fold_(model, wrappers)
        assert torch.allclose(_logits(model, ids), trained, atol=1e-4)
        assert all(isinstance(model.get_submodule(p), LowRankLinear) for p in ranks)
        if method == "joint-svd":  # q and k still share one A after folding (counted and stored once)
            pairs = [p for p in ranks if p.endswith("q_proj") and p.replace("q_proj", "k_proj") in ranks]
            assert pairs
            for q_path in pairs:
                assert model.get_submodule(q_path).A is model.get_submodule(q_path.replace("q_proj", "k_proj")).A
    finally:
        restore_(model)


def test_subspace_update_is_bolacos_equation_nine(store, tiny_model_dirs, long_text):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    model = session.loaded.model
    plan = session.uniform_plan(0.3)
    compress_(model, plan.ranks, session.factorization)
    try:
        path = "model.layers.1.mlp.down_proj"
        wrapper = attach_(model, "subspace", subset=2)[path]
        assert isinstance(wrapper, SubspaceLinear) and wrapper.subset == 2
        with torch.no_grad():
            wrapper.lambda_b.uniform_(-1, 1)
            wrapper.lambda_d.uniform_(-1, 1)
        A, B = wrapper.base.A, wrapper.base.B
        expected = B @ A + torch.diag(wrapper.lambda_b) @ B[:, :2] @ torch.diag(wrapper.lambda_d) @ A[:2]
        x = torch.randn(5, A.shape[1])
        bias = 0 if wrapper.base.bias is None else wrapper.base.bias  # feature-pca folds the mean into a bias
        assert torch.allclose(wrapper(x), x @ expected.T + bias, atol=1e-5)
        assert torch.allclose(wrapper.folded_B() @ A, expected, atol=1e-5)
    finally:
        restore_(model)


def test_basis_pruning_keeps_the_largest_relearned_singular_values(store, tiny_model_dirs, long_text):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    model = session.loaded.model
    compress_(model, session.uniform_plan(0.3).ranks, session.factorization)
    try:
        wrappers = attach_(model, "basis")
        path, w = next(iter(wrappers.items()))
        assert isinstance(w, ScaledBasisLinear)
        with torch.no_grad():
            w.scales.copy_(torch.linspace(0.1, 2.0, w.base.rank).flip(0))
        importance = w.importance()
        prune_to_ranks_({path: w}, {path: 2})
        assert w.kept_rank == 2
        assert set(torch.nonzero(w.kept).flatten().tolist()) == set(torch.topk(importance, 2).indices.tolist())
        with pytest.raises(RankScopeError, match="cannot grow"):
            prune_to_ranks_({path: w}, {path: 3})
    finally:
        restore_(model)


# -- runs ---------------------------------------------------------------------------------------------------------

def test_a_run_trains_stores_and_its_recovered_plan_evaluates_to_the_same_numbers(store, tiny_model_dirs, long_text):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    plan = session.evaluate(session.uniform_plan(0.3))
    before_json = plan.to_json()
    steps = []
    outcome = recover(store, session.loaded, plan, RecoverySettings("subspace", **FAST), on_step=steps.append)
    assert [s.step for s in steps] == list(range(1, 7))
    assert [s.validation_perplexity is not None for s in steps] == [False, False, True, False, False, True]
    assert outcome.result["before"]["perplexity"] == pytest.approx(plan.metrics["perplexity"], rel=1e-6)
    assert outcome.result["after"]["perplexity"] != outcome.result["before"]["perplexity"]
    recovered = outcome.plan
    assert recovered.ranks == plan.ranks and recovered.parameters == plan.parameters
    assert recovered.recovery["kind"] == "subspace" and recovered.recovery["base_ranks"] == plan.ranks
    assert recovered.recovery["settings"]["training_text"] == str(long_text)
    assert recovered.recovery["settings"]["start_window"] == 8  # after the calibration windows of the same text
    assert plan.to_json() == before_json  # the plan it started from is not changed
    # applying the stored plan folds the stored vectors: the same numbers as the run measured
    again = session.evaluate(RankPlan.from_json(recovered.to_json()))
    assert again.metrics["perplexity"] == pytest.approx(outcome.result["after"]["perplexity"], rel=1e-9)
    assert again.metrics["kl_reverse"] == pytest.approx(outcome.result["after"]["kl_reverse"], rel=1e-9)
    record = store.get_record(RecoveryRecord, outcome.record.run_id)
    assert record.steps == 6 and record.tokens == 6 * 2 * 32 and record.peak_rss_bytes > 0
    assert not checkpoint_path(store, record.run_id).exists()
    # asked again: from the store, not trained again
    cached = recover(store, session.loaded, plan, RecoverySettings("subspace", **FAST), on_step=steps.append)
    assert cached.from_cache and len(steps) == 6 and cached.plan.recovery == recovered.recovery


def test_a_stopped_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, tiny_model_dirs, long_text):
    settings = RecoverySettings("basis", prune_to=0.4, prune_rounds=2, **FAST)

    def opened(cache: Path):
        store = open_store(cache / "rankscope.duckdb")
        session = _session(store, tiny_model_dirs["llama"], long_text)
        return store, session, session.uniform_plan(0.3)

    store_a, session_a, plan_a = opened(tmp_path / "a")
    whole = recover(store_a, session_a.loaded, plan_a, settings)
    store_b, session_b, plan_b = opened(tmp_path / "b")
    seen: list = []
    with pytest.raises(RecoveryInterrupted, match="stopped after step 3 of 6"):
        recover(store_b, session_b.loaded, plan_b, settings, on_step=seen.append,
                should_stop=lambda: seen[-1].step == 3)
    assert checkpoint_path(store_b, whole.record.run_id).is_file()
    state = checkpoint_state(store_b, whole.record.run_id)
    assert state["step"] == 3 and [h["step"] for h in state["history"]] == [1, 2, 3]
    assert store_b.get_record(RecoveryRecord, whole.record.run_id) is None
    resumed = recover(store_b, session_b.loaded, plan_b, settings)
    assert resumed.resumed_from == 3 and not resumed.from_cache
    a, b = load_arrays(store_a, whole.record.run_id), load_arrays(store_b, resumed.record.run_id)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.plan.ranks == whole.plan.ranks
    assert resumed.plan.parameters["decoder_linear"]["reduction"] >= 0.4
    assert resumed.result["after"] == whole.result["after"]


def test_a_pruned_basis_recovery_exports_and_reloads_with_its_lower_ranks(store, tiny_model_dirs, long_text, tmp_path):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    plan = session.uniform_plan(0.3)
    outcome = recover(store, session.loaded, plan, RecoverySettings("basis", prune_to=0.45, prune_rounds=2, **FAST))
    recovered = outcome.plan
    assert recovered.parameters["decoder_linear"]["reduction"] >= 0.45
    assert all(r <= plan.ranks[p] for p, r in recovered.ranks.items() if r is not None)
    assert any(r < plan.ranks[p] for p, r in recovered.ranks.items() if r is not None)
    report = export_compressed(session, recovered, tmp_path / "export", timing_runs=1, max_new_tokens=4)
    assert report.passed, [c for c in report.checks if not c.passed]
    assert report.quality["compressed"]["perplexity"] == pytest.approx(outcome.result["after"]["perplexity"], rel=1e-6)
    written = json.loads((tmp_path / "export" / "rank_plan.json").read_text())
    assert written["recovery"]["run_id"] == outcome.record.run_id


# -- bad input ------------------------------------------------------------------------------------------------------

def test_settings_that_do_not_change_the_training_name_the_same_run(store, tiny_model_dirs, long_text):
    plan = _session(store, tiny_model_dirs["llama"], long_text).uniform_plan(0.3)
    key = lambda **given: run_id_for(plan, RecoverySettings(**given).resolved(plan.calibration, plan.evaluation))  # noqa: E731
    assert key() == key(learning_rate=2e-3) == key(prune_rounds=7) != key(learning_rate=1e-3)
    assert key(kind="basis") == key(kind="basis", subset=5) != key()
    assert key(training_text=str(long_text)) == key(start_window=8) == key() != key(start_window=9)


@pytest.mark.parametrize("given, words", [
    (dict(steps=0), "step budget must be a whole number of at least 1"),
    (dict(kind="lora"), "Recoveries: subspace, basis"),
    (dict(prune_to=0.3), "belongs to the basis recovery"),
    (dict(kind="basis", prune_to=1.5), "between 0 and 1"),
    (dict(learning_rate=-1.0), "between 0 and 1"),
])
def test_bad_settings_are_refused_with_what_is_allowed(given, words):
    with pytest.raises(RankScopeError, match=words):
        RecoverySettings(**given)


def test_a_short_text_another_models_plan_and_an_unreachable_prune_are_refused(store, tiny_model_dirs, long_text, tmp_path):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    plan = session.uniform_plan(0.3)
    short = tmp_path / "short.txt"
    short.write_text("Too short for one window.")
    with pytest.raises(RankScopeError, match="training text cannot give this run its windows"):
        recover(store, session.loaded, plan, RecoverySettings(training_text=str(short), **FAST))
    with pytest.raises(RankScopeError, match="out of reach"):
        recover(store, session.loaded, plan, RecoverySettings("basis", prune_to=0.99, prune_rounds=2, **FAST))
    with pytest.raises(RankScopeError, match="does not prune"):
        recover(store, session.loaded, plan, RecoverySettings("basis", prune_to=0.1, prune_rounds=2, **FAST))
    other = _session(store, tiny_model_dirs["qwen2"], long_text)
    with pytest.raises(PlanError, match="made for model"):
        recover(store, other.loaded, plan, RecoverySettings(**FAST))
    assert store.records(RecoveryRecord) == []


def test_recovered_plans_refuse_stacking_missing_vectors_and_inconsistent_sections(store, tiny_model_dirs, long_text):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    plan = session.uniform_plan(0.3)
    recovered = recover(store, session.loaded, plan, RecoverySettings(**FAST)).plan
    with pytest.raises(PlanError, match="already the result of recovery run"):
        recover(store, session.loaded, recovered, RecoverySettings(**FAST))
    data = recovered.to_dict()
    path = next(p for p, r in plan.ranks.items() if r is not None)
    lowered = {**data, "recovery": {**data["recovery"], "base_ranks": {**plan.ranks, path: plan.ranks[path] - 1}}}
    with pytest.raises(PlanError, match="recovery keeps or lowers a rank"):
        RankPlan.from_dict(lowered)
    with pytest.raises(PlanError, match="allowed keys"):
        RankPlan.from_dict({**data, "recovery": {**data["recovery"], "vectors": []}})
    store.forget_array(recovered.recovery["run_id"])
    with pytest.raises(PlanError, match="trained vectors are not in this cache"):
        session.evaluate(recovered)
    assert not session.loaded.model.get_submodule(path).__class__.__name__.startswith("LowRank")  # restored


def test_stored_vectors_for_another_plan_are_refused(store, tiny_model_dirs, long_text):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    model = session.loaded.model
    compress_(model, session.uniform_plan(0.3).ranks, session.factorization)
    try:
        wrappers = attach_(model, "subspace", subset=2)
        vectors = vectors_of(wrappers)
    finally:
        restore_(model)
    compress_(model, session.uniform_plan(0.5).ranks, session.factorization)
    try:
        with pytest.raises(RankScopeError, match="trained for another plan"):
            apply_recovery_(model, "subspace", {k: v[:1] for k, v in vectors.items()}, subset=2)
    finally:
        restore_(model)


# -- the command ----------------------------------------------------------------------------------------------------

def test_rankscope_recover_writes_a_recovered_plan_and_never_the_plan_it_started_from(tiny_model_dirs, long_text, tmp_path):
    runner = CliRunner()
    text = str(long_text)
    options = ["--model", str(tiny_model_dirs["llama"]), "--calibration-text", text, "--calibration-windows", "8",
               "--groups", "4", "--eval-text", text, "--eval-windows", "4", "--window-len", "32"]
    plan_file = tmp_path / "plan.json"
    assert runner.invoke(app, ["compress", *options, "--uniform", "0.3", "--save-plan", str(plan_file)]).exit_code == 0
    original_bytes = plan_file.read_bytes()
    fast = ["--steps", "4", "--batch", "2", "--training-windows", "8", "--validation-windows", "2", "--eval-every", "2",
            "--lr", "0.05"]

    result = runner.invoke(app, ["recover", "--plan", str(plan_file), *fast, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    written = tmp_path / "plan-subspace.json"
    assert out["plan"] == str(written) and not out["from_cache"]
    assert out["after"]["perplexity"] != out["before"]["perplexity"] and out["steps"] == 4
    assert plan_file.read_bytes() == original_bytes
    assert RankPlan.load(written).recovery["run_id"] == out["run_id"]
    again = runner.invoke(app, ["recover", "--plan", str(plan_file), *fast])
    assert again.exit_code == 0 and "finished before" in again.stdout
    evaluated = runner.invoke(app, ["evaluate", "--plan", str(written), "--json"])
    assert json.loads(evaluated.stdout)["perplexity"] == pytest.approx(out["after"]["perplexity"], rel=1e-9)

    for args, words in ((["--steps", "0"], "step budget"), (["--out", str(plan_file)], "is the plan this run starts from"),
                        (["--kind", "subspace", "--prune-to", "0.4"], "belongs to the basis recovery")):
        bad = runner.invoke(app, ["recover", "--plan", str(plan_file), *fast, *args])
        assert bad.exit_code == 2 and words in bad.stderr and "Traceback" not in bad.output, bad.output
    assert plan_file.read_bytes() == original_bytes

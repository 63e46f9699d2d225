"""LoRAP on tiny models: channel scores and kept channels (§3.3, Eq. 1, 10, 11), pruned MLPs in place, mixed
plans (`rankscope.plan/v2`) and their parameter counts, LoRAP's attention split, the CLI, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from engine.cli import app
from engine.compression.lorap import lorap_allocation, lorap_plan, parse_split
from engine.compression.lowrank import restore_
from engine.compression.plan import SCHEMA, SCHEMA_V2, PlanError, RankPlan
from engine.compression.pruning import PruningError, PruningSettings, channel_scores, kept_channels, prune_mlps_
from engine.compression.session import CompressionSession
from engine.compression.units import count_parameters
from engine.errors import RankScopeError
from engine.models.loading import load_model
from engine.recovery.settings import RecoverySettings
from engine.recovery.training import recover
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing
from tests.tiny_models import TRAINING_TEXT


@pytest.fixture(scope="module")
def long_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lorap-text") / "text.txt"
    path.write_text(TRAINING_TEXT * 60)
    return path


def _session(store, model_dir: Path, text: Path, method: str = "awsvd") -> CompressionSession:
    texts = TextSettings(str(text), Windowing(32, 8), 4, str(text), Windowing(32, 4))
    return CompressionSession.open(store, load_model(str(model_dir), store), method, texts)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- the maths ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["l2", "l1", "max"])
def test_channel_scores_follow_loraps_equations(aggregation):
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(4, 6, generator=g)
    x_mlp, x_down = torch.rand(4, generator=g) + 0.1, torch.rand(6, generator=g) + 0.1
    agg = {"l2": lambda v: sum(t * t for t in v) ** 0.5, "l1": sum, "max": max}[aggregation]
    expected = []
    for i in range(6):  # Φ(gate_i) + Φ(up_i) + Φ(down_:,i), with I(W_ij) = |W_ij| ‖X_j‖₂
        phi_gate = agg([abs(float(gate[i, j])) * float(x_mlp[j]) for j in range(4)])
        phi_up = agg([abs(float(up[i, j])) * float(x_mlp[j]) for j in range(4)])
        phi_down = agg([abs(float(down[k, i])) * float(x_down[i]) for k in range(4)])
        expected.append(phi_gate + phi_up + phi_down)
    got = channel_scores(gate, up, down, x_mlp, x_down, aggregation)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


def test_kept_channels_keep_the_top_and_retain_the_least_important():
    order = torch.tensor([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])  # channel ids, most important first
    assert kept_channels(order, 5, 0.0).tolist() == sorted([7, 2, 9, 0, 4])
    assert kept_channels(order, 5, 0.2).tolist() == sorted([7, 2, 9, 6, 5])  # top 3 + the 2 least important
    assert kept_channels(order, 1, 0.3).tolist() == [5]  # retention never exceeds the kept count
    assert kept_channels(order, 10, 0.1).tolist() == list(range(10))
    for bad in (0, 11, 2.5, True):
        with pytest.raises(PruningError, match="keeps from 1 to 10 channels"):
            kept_channels(order, bad, 0.01)


@pytest.mark.parametrize("given, words", [
    (dict(aggregation="mean"), "Aggregations: l2, l1, max"),
    (dict(retention=0.6), "between 0 and 50%"),
    (dict(retention=-0.01), "between 0 and 50%"),
])
def test_bad_pruning_settings_name_what_is_allowed(given, words):
    with pytest.raises(PruningError, match=words):
        PruningSettings(**given)


def test_a_pruned_mlp_computes_what_the_dense_mlp_does_with_those_channels_zeroed(store, tiny_model_dirs, long_text):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    model, ids = session.loaded.model, session.windows[:2]
    mlp = session.shapes.mlps[1]
    kept = torch.tensor([0, 3, 5, 6, 10])
    gate, up, down = (model.get_submodule(p) for p in mlp.paths)
    saved = [m.weight.detach().clone() for m in (gate, up, down)]
    dropped = torch.tensor([i for i in range(mlp.d_ff) if i not in kept.tolist()])
    with torch.no_grad():  # the same function, by zeroing the pruned channels of the dense matrices
        gate.weight[dropped] = 0
        up.weight[dropped] = 0
        down.weight[:, dropped] = 0
    zeroed = _logits(model, ids)
    with torch.no_grad():
        for module, weight in zip((gate, up, down), saved):
            module.weight.copy_(weight)
    original = _logits(model, ids)
    prune_mlps_(model, {mlp.path: (*mlp.paths, kept)})
    try:
        assert model.get_submodule(mlp.gate).weight.shape == (5, mlp.d_model)
        assert model.get_submodule(mlp.down).weight.shape == (mlp.d_model, 5)
        assert torch.allclose(_logits(model, ids), zeroed, atol=1e-5)
    finally:
        restore_(model)
    assert torch.equal(_logits(model, ids), original)


# -- plans ----------------------------------------------------------------------------------------------------------

def test_a_mixed_plan_is_v2_counts_both_kinds_and_measures_what_it_applies(store, tiny_model_dirs, long_text, tmp_path):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    shapes = session.shapes
    plan = lorap_plan(session, 0.3)
    assert plan.schema == SCHEMA_V2 and plan.pruning == {"aggregation": "l2", "retention": 0.01}
    assert set(plan.channels) == {m.path for m in shapes.mlps}
    for mlp in shapes.mlps:
        assert all(plan.ranks[p] is None for p in mlp.paths)
    decoder = plan.parameters["decoder_linear"]
    by_hand = sum(m.params(plan.channels[m.path]) for m in shapes.mlps) + sum(
        s.d_in * s.d_out if plan.ranks[s.path] is None else plan.ranks[s.path] * (s.d_in + s.d_out)
        for s in shapes.linears if s.linear_type in ("q", "k", "v", "o"))
    assert decoder["compressed"] == by_hand
    per_layer_step = 3 * shapes.mlps[0].d_model  # one channel: LoRAP lands each layer within it
    assert 0.3 <= decoder["reduction"] <= 0.3 + len(shapes.mlps) * per_layer_step / decoder["dense"]
    evaluated = session.evaluate(plan)
    assert evaluated.metrics["kl_reverse"] > 0
    assert all(type(session.loaded.model.get_submodule(p)).__name__ == "Linear" for m in shapes.mlps for p in m.paths)
    assert session.loaded.model.get_submodule(shapes.mlps[0].gate).weight.shape[0] == shapes.mlps[0].d_ff  # restored
    again = RankPlan.load(evaluated.save(tmp_path / "mixed.json"))
    assert again == evaluated.for_model(shapes) and again.schema == SCHEMA_V2
    # a plan without channels stays a v1 document
    assert session.uniform_plan(0.3).schema == SCHEMA


def test_retention_and_aggregation_change_which_channels_are_kept(store, tiny_model_dirs, long_text):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    ranks, channels = lorap_allocation(session.shapes, 0.3)
    kept = {r: session.kept_channels(channels, {"retention": r}) for r in (0.0, 0.05)}
    path = next(iter(channels))
    assert len(kept[0.0][path][3]) == len(kept[0.05][path][3]) == channels[path]
    assert not torch.equal(kept[0.0][path][3], kept[0.05][path][3])
    results = {a: session.evaluate(session.plan(ranks, channels=channels, pruning={"aggregation": a})).metrics["perplexity"]
               for a in ("l2", "max")}
    assert results["l2"] != results["max"]


def test_mixed_plans_refuse_what_is_not_allowed(store, tiny_model_dirs, long_text):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    plan = lorap_plan(session, 0.3)
    data = plan.to_dict()
    mlp = session.shapes.mlps[0]
    cases = [
        ({**data, "channels": {**plan.channels, mlp.path: 0}}, "keeps from 1 to"),
        ({**data, "channels": {**plan.channels, mlp.path: mlp.d_ff + 1}}, "keeps from 1 to"),
        ({**data, "ranks": {**plan.ranks, mlp.gate: 8}}, "both prunes"),
        ({**data, "channels": {"model.layers.99.mlp": 4}}, "MLP\\(s\\) the model does not have"),
        ({**data, "pruning": {"aggregation": "l2", "retention": 0.7}}, "between 0 and 50%"),
        ({**data, "schema": SCHEMA}, "'rankscope.plan/v1' plan does not"),
    ]
    for document, words in cases:
        with pytest.raises(RankScopeError, match=words):
            RankPlan.from_dict(document).for_model(session.shapes)


def test_lorap_keeps_v_and_o_dense_when_their_share_exceeds_them_and_gives_q_k_the_rest(store, tiny_model_dirs, long_text):
    shapes = _session(store, tiny_model_dirs["llama"], long_text).shapes
    ranks, _ = lorap_allocation(shapes, 0.1, split=(1, 50))  # v+o's share is nearly all of attention's budget
    layer = [s for s in shapes.linears if s.layer == 0]
    by_type = {s.linear_type: ranks[s.path] for s in layer}
    assert by_type["v"] is None and by_type["o"] is None
    balanced, _ = lorap_allocation(shapes, 0.1, split=(1, 1))
    assert (by_type["q"] or 10**9) >= (balanced[layer[0].path] or 0)  # q got the surplus
    with pytest.raises(RankScopeError, match="two positive numbers such as 1:3"):
        parse_split("1-3")
    with pytest.raises(RankScopeError, match="between 0 and 1"):
        lorap_allocation(shapes, 1.2)


def test_pruning_and_low_rank_mlp_use_equal_parameters(store, tiny_model_dirs, long_text):
    shapes = _session(store, tiny_model_dirs["llama"], long_text).shapes
    ranks, channels = lorap_allocation(shapes, 0.3, mlp="prune")
    pruned = count_parameters(shapes, "awsvd", ranks, channels)
    ranks, _ = lorap_allocation(shapes, 0.3, mlp="low-rank")
    factored = count_parameters(shapes, "awsvd", ranks)
    step = sum(3 * (m.d_model + m.d_ff) for m in shapes.mlps)  # one rank of gate, up and down in every layer
    assert abs(pruned.decoder_compressed - factored.decoder_compressed) <= step


def test_a_mixed_plan_recovers_its_low_rank_part(store, tiny_model_dirs, long_text):
    session = _session(store, tiny_model_dirs["llama"], long_text)
    plan = lorap_plan(session, 0.3)
    outcome = recover(store, session.loaded, plan, RecoverySettings(steps=2, batch_windows=2, training_windows=4,
                                                                    validation_windows=1, learning_rate=0.05))
    assert outcome.plan.channels == plan.channels and outcome.plan.schema == SCHEMA_V2
    again = session.evaluate(outcome.plan)
    assert again.metrics["perplexity"] == pytest.approx(outcome.result["after"]["perplexity"], rel=1e-9)


# -- the command ----------------------------------------------------------------------------------------------------

def test_rankscope_compress_lorap_writes_a_v2_plan_that_evaluates_and_exports(tiny_model_dirs, long_text, tmp_path):
    runner = CliRunner()
    text = str(long_text)
    options = ["--model", str(tiny_model_dirs["llama"]), "--calibration-text", text, "--calibration-windows", "8",
               "--groups", "4", "--eval-text", text, "--eval-windows", "4", "--window-len", "32"]
    plan_file = tmp_path / "lorap.json"
    result = runner.invoke(app, ["compress", *options, "--lorap", "0.3", "--save-plan", str(plan_file), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["method"] == "awsvd" and out["parameters"]["decoder_linear"]["reduction"] >= 0.3
    saved = json.loads(plan_file.read_text())
    assert saved["schema"] == SCHEMA_V2 and saved["pruning"]["retention"] == 0.01
    evaluated = runner.invoke(app, ["evaluate", "--plan", str(plan_file), "--json"])
    assert json.loads(evaluated.stdout)["perplexity"] == pytest.approx(out["compressed"]["perplexity"], rel=1e-9)
    exported = runner.invoke(app, ["export", "--plan", str(plan_file), "--out", str(tmp_path / "out"), *options,
                                   "--new-tokens", "4", "--timing-runs", "1", "--json"])
    assert exported.exit_code == 0, exported.output
    report = json.loads(exported.stdout)
    assert report["passed"] and report["pruning"]["mlps"] == {
        path: {"layer": i, "kept": kept, "channels": 48} for i, (path, kept) in enumerate(saved["channels"].items())}
    assert report["parameters"]["reloaded"] == saved["parameters"]["total"]["compressed"]
    from engine.export import load_compressed
    from engine.export.format import count_module_parameters

    model, _, reloaded = load_compressed(tmp_path / "out")
    assert reloaded.channels == saved["channels"]
    assert count_module_parameters(model) == saved["parameters"]["total"]["compressed"]
    dense = runner.invoke(app, ["export", "--plan", str(plan_file), "--out", str(tmp_path / "dense"), "--dense", *options])
    assert dense.exit_code == 2 and "without --dense" in dense.stderr and "intermediate_size" in dense.stderr
    assert not (tmp_path / "dense").exists()
    for args, words in ((["--lorap", "0.3", "--retention", "0.9"], "between 0 and 50%"),
                        (["--lorap", "0.3", "--split", "3"], "two positive numbers"),
                        (["--lorap", "0.3", "--aggregation", "mean"], "Aggregations: l2, l1, max"),
                        (["--lorap", "0.3", "--uniform", "0.2"], "exactly one of")):
        bad = runner.invoke(app, ["compress", *options, *args])
        assert bad.exit_code == 2 and words in bad.stderr and "Traceback" not in bad.output, bad.output

"""Rank arithmetic, rank plan JSON and its validation, groupings, and exact budget projection."""

from __future__ import annotations

import json

import pytest

from engine.compression.grouping import (
    BudgetError,
    Grouping,
    budget_target,
    project_to_budget,
    ranks_from_ratios,
)
from engine.compression.plan import SCHEMA, PlanError, RankPlan
from engine.compression.units import RANK_STEP, LinearShape, ModelShapes, RankUnit, count_parameters
from engine.errors import RankScopeError

SMOL_TYPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
              "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}  # (d_out, d_in)


def _smollm2_shapes() -> ModelShapes:
    """The decoder linears of SmolLM2-135M (30 layers, hidden 576, kv 192, intermediate 1536)."""
    linears = tuple(
        LinearShape(f"model.layers.{layer}.{name}", layer, name, d_out, d_in)
        for layer in range(30) for name, (d_out, d_in) in SMOL_TYPES.items()
    )
    decoder = sum(s.d_in * s.d_out for s in linears)
    return ModelShapes("smollm2-synthetic", "f" * 64, "llama", 30, linears, decoder + 49152 * 576 + 61 * 576)


SMOL = _smollm2_shapes()


def _tiny_shapes(family: str, tiny_model_dirs, tmp_path_factory) -> ModelShapes:
    from engine.models.loading import load_model
    from engine.store import open_store

    root = tmp_path_factory.mktemp("plan-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKSCOPE_CACHE", str(root))
        return ModelShapes.of(load_model(str(tiny_model_dirs[family]), open_store(root / "rankscope.duckdb")))


@pytest.fixture(scope="module")
def tiny_shapes(tiny_model_dirs, tmp_path_factory) -> ModelShapes:
    return _tiny_shapes("llama", tiny_model_dirs, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_qwen_shapes(tiny_model_dirs, tmp_path_factory) -> ModelShapes:
    """The tiny qwen2: the tiny llama's decoder-linear paths and shapes, but untied embeddings (more parameters)."""
    return _tiny_shapes("qwen2", tiny_model_dirs, tmp_path_factory)


# -- ratio -> rank ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d_out,d_in", [(576, 576), (192, 576), (1536, 576), (576, 1536), (768, 576), (48, 32)])
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.37, 0.5, 0.8, 0.95])
def test_rank_for_ratio_follows_the_formula(d_out, d_in, ratio):
    unit = RankUnit(("m",), 0, ("q",), d_in, d_out)
    rank = unit.rank_for_ratio(ratio)
    exact = (1 - ratio) * d_in * d_out / (d_in + d_out)
    if rank is None:  # only when the nearest multiple of 8 (at least 8) would not be smaller than dense
        nearest = max(RANK_STEP, round(exact / RANK_STEP) * RANK_STEP)
        assert nearest * (d_in + d_out) >= d_in * d_out
        return
    assert rank % RANK_STEP == 0 and rank >= RANK_STEP
    assert rank <= min(d_in, d_out)
    assert rank == RANK_STEP or abs(rank - exact) <= RANK_STEP / 2
    assert unit.params(rank) < unit.dense_params


def test_rank_for_ratio_examples_and_dense_cases():
    square = RankUnit(("m",), 0, ("q",), 576, 576)
    assert square.rank_for_ratio(0.5) == 144  # 0.5 * 576 * 576 / 1152
    assert RankUnit(("m",), 0, ("k",), 576, 192).rank_for_ratio(0.3) == 104  # 100.8 -> 104
    assert square.rank_for_ratio(0.99) == 8  # never below one step
    assert square.rank_for_ratio(0.0) is None
    assert RankUnit(("m",), 0, ("q",), 16, 16).rank_for_ratio(0.5) is None  # rank 8 costs 256 = dense
    assert RankUnit(("m",), 0, ("q",), 32, 32).rank_for_ratio(0.01) is None  # 15.8 -> 16: 1024 = dense
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            square.rank_for_ratio(bad)


def test_joint_units_pair_q_with_k_and_gate_with_up():
    units = SMOL.units("joint-svd")
    assert len(units) == 30 * 5
    qk = next(u for u in units if u.types == ("q", "k") and u.layer == 3)
    assert qk.paths == ("model.layers.3.q", "model.layers.3.k") and (qk.d_out, qk.d_in) == (768, 576)
    gate_up = next(u for u in units if u.types == ("gate", "up") and u.layer == 0)
    assert (gate_up.d_out, gate_up.d_in, gate_up.max_rank) == (3072, 576, 576)
    assert len(SMOL.units("svd")) == 30 * 7


# -- plan JSON ------------------------------------------------------------------------------------------------

def _plan(shapes: ModelShapes = SMOL, method: str = "svd", rank: int = 64, **kwargs) -> RankPlan:
    ranks = {s.path: (rank if s.linear_type in ("q", "k", "gate", "up") else None) for s in shapes.linears}
    return RankPlan.build(shapes, method, ranks, **kwargs)


def test_plan_json_round_trip(tmp_path):
    plan = _plan(
        grouping={**Grouping.parse("5x2").to_dict(), "values": {"qk@0-14": 0.25}, "budget": None},
        calibration={"text": "war-and-peace", "text_fingerprint": "abc", "window_len": 512, "n_windows": 128,
                     "n_groups": 32},
        evaluation={"text": "sherlock-holmes", "text_fingerprint": "def", "window_len": 512, "n_windows": 16},
        seed=7, study_id="study-1",
    ).with_metrics({"perplexity": 31.25, "kl_forward": 0.125, "kl_reverse": 0.0625, "tokens": 8176})
    assert plan.schema == SCHEMA == "rankscope.plan/v1"
    assert RankPlan.from_json(plan.to_json()) == plan
    assert RankPlan.load(plan.save(tmp_path / "sub" / "plan.json")) == plan
    data = json.loads(plan.to_json())
    assert data["ranks"]["model.layers.0.q"] == 64 and data["ranks"]["model.layers.0.v"] is None
    assert set(data["metrics"]["definitions"]) == {"perplexity", "kl_forward", "kl_reverse"}
    assert data["provenance"]["seed"] == 7 and data["provenance"]["study_id"] == "study-1"


def test_plan_parameter_counts_are_exact():
    plan = _plan()
    dec = plan.parameters["decoder_linear"]
    per_layer = 64 * (1152 + 768 + 2112 + 2112) + 192 * 576 + 576 * 576 + 576 * 1536
    assert dec["compressed"] == 30 * per_layer
    assert dec["dense"] == SMOL.decoder_linear_params
    assert plan.parameters["total"]["compressed"] == SMOL.total_params - dec["dense"] + dec["compressed"]


def _document(**changes) -> str:
    data = json.loads(_plan().to_json())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize("text,words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (_document(schema="rankscope.plan/v3"), "Unsupported plan schema .rankscope.plan/v3.: this RankScope reads .rankscope.plan/v1. and .rankscope.plan/v2."),
    (_document(schema="rankscope.plan/v2"), "plan prunes MLP channels .a non-empty .channels. object."),
    (json.dumps({k: v for k, v in json.loads(_document()).items() if k != "ranks"}), "'ranks' is missing"),
    (_document(model={"id": "x"}), "fingerprint"),
    (_document(ranks={"model.layers.0.q": 8.5}), "integer or null"),
    (_document(ranks={"model.layers.0.q": "8"}), "integer or null"),
    (_document(ranks={"model.layers.0.q": True}), "integer or null"),
    (_document(colour="blue"), "Unknown plan field"),
])
def test_malformed_plan_documents_are_rejected(text, words):
    with pytest.raises(PlanError, match=words):
        RankPlan.from_json(text)


@pytest.mark.parametrize("method,ranks,words", [
    ("svd", {"model.layers.0.self_attn.q_proj": 8}, r"does not have.*model\.layers\.0\.self_attn\.q_proj"),
    ("svd", {"model.layers.30.q": 8}, "does not have"),
    ("svd", {"model.layers.0.k": 200}, r"min\(d_in, d_out\) = 192"),
    ("svd", {"model.layers.0.q": 0}, "not allowed"),
    ("svd", {"model.layers.0.q": -8}, "not allowed"),
    ("joint-svd", {"model.layers.0.q": 64, "model.layers.0.k": 32}, "same rank"),
    ("joint-svd", {"model.layers.2.gate": 32}, "same rank"),
    ("joint-svd", {"model.layers.0.q": 584, "model.layers.0.k": 584}, r"= 576 for (the|this) 768x576 stack"),
])
def test_plans_that_do_not_fit_the_model_are_rejected(method, ranks, words):
    document = json.loads(_plan(method=method).to_json())
    document["ranks"].update(ranks)
    plan = RankPlan.from_json(json.dumps(document))  # the form is fine; the fit is not
    with pytest.raises(PlanError, match=words):
        plan.validate_for(SMOL)
    with pytest.raises(PlanError, match=words):
        RankPlan.build(SMOL, method, document["ranks"])


def test_joint_svd_ranks_may_exceed_one_members_output_size():
    # k is 192 x 576 but shares A with q: the q‖k stack allows up to rank 576
    plan = RankPlan.build(SMOL, "joint-svd", {"model.layers.0.q": 304, "model.layers.0.k": 304})
    assert plan.ranks["model.layers.0.k"] == 304
    assert plan.parameters["decoder_linear"]["compressed"] == SMOL.decoder_linear_params - 768 * 576 + 304 * 1344


def test_a_plan_for_another_model_is_rejected(tiny_shapes, tmp_path):
    plan = _plan()
    with pytest.raises(PlanError, match="made for model 'smollm2-synthetic'"):
        plan.validate_for(tiny_shapes)
    tiny_plan = _plan(tiny_shapes, rank=8)
    assert tiny_plan.model["fingerprint"] == tiny_shapes.fingerprint
    with pytest.raises(PlanError, match="made for model"):
        RankPlan.load(tiny_plan.save(tmp_path / "tiny.json")).validate_for(SMOL)
    with pytest.raises(PlanError, match="Could not read plan file"):
        RankPlan.load(tmp_path / "missing.json")


def _twenty_percent_plan(shapes: ModelShapes) -> RankPlan:
    """A plan removing about 20% of the decoder-linear parameters (projected onto that budget)."""
    grouping = Grouping("5x1", search_v=True)
    ratios = {name: 0.2 for name in grouping.groups(shapes, "svd")}
    ranks, _ = project_to_budget(shapes, "svd", grouping, ratios, budget_target(shapes, 0.2))
    return RankPlan.build(shapes, "svd", ranks)


def test_a_checked_plan_is_the_plan_with_every_module_listed(tiny_shapes):
    plan = _twenty_percent_plan(tiny_shapes)
    assert plan.for_model(tiny_shapes) == plan == plan.validate_for(tiny_shapes)
    path = tiny_shapes.linears[0].path
    partial = RankPlan.from_dict({**plan.to_dict(), "ranks": {p: r for p, r in plan.ranks.items() if p != path}})
    assert path not in partial.ranks and partial.for_model(tiny_shapes).ranks[path] is None  # missing = dense


def test_forged_parameters_are_refused_with_the_counts_the_ranks_give(tiny_shapes, tmp_path):
    plan = _twenty_percent_plan(tiny_shapes)
    true = plan.parameters
    assert 0.15 < true["decoder_linear"]["reduction"] <= 0.2
    forged = json.loads(plan.to_json())
    dense = true["decoder_linear"]["dense"]
    forged["parameters"]["decoder_linear"].update(compressed=dense // 10, reduction=0.9)
    forged["parameters"]["total"]["reduction"] = 0.9
    path = tmp_path / "forged.json"
    path.write_text(json.dumps(forged))
    loaded = RankPlan.load(path)  # the form is fine
    for check in (loaded.validate_for, loaded.for_model):
        with pytest.raises(PlanError, match="'parameters' do not match its ranks") as refused:
            check(tiny_shapes)
        message = str(refused.value)
        assert f"({true['decoder_linear']['reduction']:.2%} removed)" in message  # the recomputed ~20%
        assert "(90.00% removed)" in message  # and what the document claimed
        assert json.dumps(true, separators=(",", ":")) in message  # the right section, to paste
    from engine.analysis.allocation import plan_summary

    with pytest.raises(PlanError, match="do not match its ranks"):
        plan_summary("forged", loaded, tiny_shapes)
    assert plan_summary("honest", plan, tiny_shapes)["decoder_reduction"] == true["decoder_linear"]["reduction"]
    without = {k: v for k, v in forged.items() if k != "parameters"}
    with pytest.raises(PlanError, match="has no 'parameters' section"):
        RankPlan.from_dict(without).for_model(tiny_shapes)
    with pytest.raises(PlanError, match="'parameters' section is malformed"):
        RankPlan.from_dict({**forged, "parameters": {"total": 3}}).for_model(tiny_shapes)
    with pytest.raises(PlanError, match="'parameters' is not an object"):
        RankPlan.from_dict({**forged, "parameters": [1]})


@pytest.mark.parametrize("ranks,words", [({}, "its 'ranks' are empty"), (None, "all 14 ranks are null")],
                         ids=["empty", "all-null"])
def test_a_plan_that_compresses_nothing_is_refused(tiny_shapes, ranks, words):
    plan = _twenty_percent_plan(tiny_shapes)
    document = plan.to_dict()
    document["ranks"] = {p: None for p in plan.ranks} if ranks is None else ranks
    # a plan that says it removes 20% but keeps everything dense: refused when read, before any model is known
    with pytest.raises(PlanError, match=f"must compress at least one linear.*{words}"):
        RankPlan.from_json(json.dumps(document))
    with pytest.raises(PlanError, match="must compress at least one linear"):
        RankPlan(**document).for_model(tiny_shapes)
    with pytest.raises(PlanError, match="must compress at least one linear"):
        RankPlan.build(tiny_shapes, "svd", document["ranks"])


def test_a_forged_fingerprint_does_not_lend_another_models_counts(tiny_shapes, tiny_qwen_shapes):
    plan = _twenty_percent_plan(tiny_shapes)  # llama: tied embeddings
    assert [(s.path, s.d_out, s.d_in) for s in tiny_shapes.linears] == [
        (s.path, s.d_out, s.d_in) for s in tiny_qwen_shapes.linears]  # the ranks fit the qwen2 model too
    assert tiny_qwen_shapes.total_params != tiny_shapes.total_params
    forged = {**plan.to_dict(), "model": {**plan.model, "fingerprint": tiny_qwen_shapes.fingerprint}}
    with pytest.raises(PlanError, match="model type 'llama' with 2 layers.*is a 'qwen2'"):
        RankPlan.from_dict(forged).validate_for(tiny_qwen_shapes)
    forged["model"]["model_type"] = "qwen2"  # forged consistently: the llama's counts still give it away
    with pytest.raises(PlanError, match="'parameters' do not match its ranks") as refused:
        RankPlan.from_dict(forged).validate_for(tiny_qwen_shapes)
    without = {**forged, "model": {k: v for k, v in forged["model"].items() if k != "num_layers"}}
    with pytest.raises(PlanError, match="lacks 'num_layers'.*num_layers 2"):
        RankPlan.from_dict(without).validate_for(tiny_qwen_shapes)
    honest = RankPlan.build(tiny_qwen_shapes, "svd", plan.ranks)
    assert f"{honest.parameters['total']['compressed']:,} of {tiny_qwen_shapes.total_params:,}" in str(refused.value)


# -- groupings ------------------------------------------------------------------------------------------------

def test_grouping_parse_and_errors():
    assert Grouping.parse("5x1") == Grouping("5x1")
    assert Grouping.parse("5x4") == Grouping("5xG", 4) and Grouping.parse("5x4").label == "5x4"
    assert Grouping.parse("per-layer", search_v=True) == Grouping("per-layer", search_v=True)
    for text in ("7x3", "5x0", "5x", "6x1", "layers"):
        with pytest.raises(RankScopeError, match=f"Unknown grouping '{text}'.*5x1"):
            Grouping.parse(text)
    with pytest.raises(RankScopeError, match="Unknown grouping 'bogus'. Groupings: 5x1, 5xG, per-layer, curve, custom"):
        Grouping("bogus")
    with pytest.raises(RankScopeError, match="5x31 needs at least 31 layers"):
        Grouping.parse("5x31").groups(SMOL, "svd")
    assert Grouping.from_dict(Grouping.parse("5x3", search_v=True).to_dict()) == Grouping("5xG", 3, True)
    assert Grouping.parse("curve3") == Grouping("curve", 3) and Grouping.parse("curve3").label == "curve3"
    with pytest.raises(RankScopeError, match="curve31 needs at least 31 layers"):
        Grouping.parse("curve31").groups(SMOL, "svd")


def test_group_names_and_members():
    five = Grouping.parse("5x1").groups(SMOL, "svd")
    assert list(five) == ["qk", "o", "gate", "up", "down"]
    assert len(five["qk"]) == 60 and {u.types[0] for u in five["qk"]} == {"q", "k"}
    joint = Grouping.parse("5x1").groups(SMOL, "joint-svd")  # gate and up share A, hence one group
    assert len(joint) == 4 and [len(units) for units in joint.values()] == [30] * 4
    assert sorted(u.types for units in joint.values() for u in units[:1]) == [
        ("down",), ("gate", "up"), ("o",), ("q", "k")]
    two = Grouping.parse("5x2", search_v=True).groups(SMOL, "svd")
    assert list(two) == [f"{n}@{b}" for b in ("0-14", "15-29") for n in ("qk", "v", "o", "gate", "up", "down")]
    assert {u.layer for u in two["o@15-29"]} == set(range(15, 30))
    per_layer = Grouping.parse("per-layer").groups(SMOL, "joint-svd")
    assert len(per_layer) == 30 * 4 and "q+k@7" in per_layer and "v@7" not in per_layer


# -- budgets --------------------------------------------------------------------------------------------------

def _step(shapes: ModelShapes, method: str) -> int:
    return max(RANK_STEP * (u.d_in + u.d_out) for u in shapes.units(method))


def _ratios(grouping: Grouping, shapes: ModelShapes, method: str) -> dict[str, float]:
    names = list(grouping.groups(shapes, method))
    return {name: 0.2 + 0.5 * (i % 5) / 4 for i, name in enumerate(names)}  # uneven ratios, 0.2 .. 0.7


@pytest.mark.parametrize("method", ["svd", "joint-svd"])
@pytest.mark.parametrize("grouping", ["5x1", "5x2", "per-layer"])
def test_projection_meets_the_budget_within_one_step_on_smollm2_shapes(method, grouping):
    _check_projection(SMOL, method, Grouping.parse(grouping), (0.1, 0.25, 0.4, 0.6))


@pytest.mark.parametrize("method", ["svd", "joint-svd"])
@pytest.mark.parametrize("grouping", ["5x1", "5x2", "per-layer"])
def test_projection_meets_the_budget_within_one_step_on_a_tiny_model(tiny_shapes, method, grouping):
    _check_projection(tiny_shapes, method, Grouping.parse(grouping, search_v=True), (0.1, 0.2, 0.3))


def _check_projection(shapes, method, grouping, budgets):
    step = _step(shapes, method)
    ratios = _ratios(grouping, shapes, method)
    for budget in budgets:
        target = budget_target(shapes, budget)
        ranks, used = project_to_budget(shapes, method, grouping, ratios, target)
        achieved = count_parameters(shapes, method, ranks).decoder_compressed
        assert target - step <= achieved <= target, (budget, target, achieved)
        assert set(used) == set(ratios) and all(0 < v <= 0.99 for v in used.values())
        RankPlan.build(shapes, method, ranks)  # every projected plan is a valid plan
        for unit in shapes.units(method):
            assert len({ranks.get(p) for p in unit.paths}) == 1
            rank = ranks.get(unit.paths[0])
            assert rank is None or (rank % RANK_STEP == 0 and not unit.keeps_dense(rank))


def test_projection_keeps_relative_ratios():
    grouping = Grouping.parse("5x1")
    ranks, used = project_to_budget(SMOL, "svd", grouping, {"qk": 0.2, "o": 0.2, "gate": 0.4, "up": 0.4, "down": 0.4},
                                    budget_target(SMOL, 0.3))
    assert used["gate"] == pytest.approx(2 * used["qk"]) and used["o"] == pytest.approx(used["qk"])
    assert 0.2 < used["gate"] < 0.6
    assert ranks["model.layers.0.q"] > ranks["model.layers.0.gate"] * 1152 / 2112  # qk kept more of its rank


def test_an_impossible_budget_says_what_is_feasible():
    grouping = Grouping.parse("5x1")
    units = SMOL.units("svd")
    cheapest = sum(u.params(RANK_STEP) if u.types[0] != "v" else u.dense_params for u in units)
    feasible = 1 - cheapest / SMOL.decoder_linear_params
    with pytest.raises(BudgetError, match=f"the most it can remove is {feasible:.1%}") as info:
        project_to_budget(SMOL, "svd", grouping, _ratios(grouping, SMOL, "svd"), budget_target(SMOL, 0.95))
    assert "95.0% reduction" in str(info.value) and "v dense" in str(info.value)
    # just inside the stated maximum is feasible
    ranks, _ = project_to_budget(SMOL, "svd", grouping, _ratios(grouping, SMOL, "svd"),
                                 budget_target(SMOL, feasible - 0.01))
    assert count_parameters(SMOL, "svd", ranks).decoder_reduction >= feasible - 0.01
    with pytest.raises(BudgetError, match=r"\[0, 1\)"):
        budget_target(SMOL, 1.0)


def test_any_ratios_project_onto_a_feasible_budget():
    """A search may ask for all groups dense, or one group alone: the projection still meets the budget."""
    grouping = Grouping.parse("5x2")
    zeros = {name: 0.0 for name in grouping.groups(SMOL, "svd")}
    target = budget_target(SMOL, 0.2)
    ranks, used = project_to_budget(SMOL, "svd", grouping, zeros, target)
    assert len(set(used.values())) == 1 and 0.0 < next(iter(used.values())) < 0.5  # raised together
    assert target - _step(SMOL, "svd") < count_parameters(SMOL, "svd", ranks).decoder_compressed <= target

    one_group = Grouping.parse("5x1")
    target = budget_target(SMOL, 0.5)
    ranks, used = project_to_budget(SMOL, "svd", one_group, {"o": 0.5}, target)
    assert used["o"] > max(v for k, v in used.items() if k != "o")  # o keeps its head start
    assert all(v > 0 for v in used.values())  # o alone could not remove half, so the others were raised too
    assert target - _step(SMOL, "svd") < count_parameters(SMOL, "svd", ranks).decoder_compressed <= target

    ranks, used = project_to_budget(SMOL, "svd", grouping, zeros, budget_target(SMOL, 0.0))
    assert all(rank is None for rank in ranks.values()) and set(used.values()) == {0.0}


def test_zero_ratio_groups_and_v_stay_dense_after_projection():
    grouping = Grouping.parse("5x1")
    ratios = {"qk": 0.0, "o": 0.3, "gate": 0.5, "up": 0.5, "down": 0.5}
    target = budget_target(SMOL, 0.35)
    ranks, used = project_to_budget(SMOL, "svd", grouping, ratios, target)
    assert used["qk"] == 0.0  # the other groups suffice, so qk stays dense
    for s in SMOL.linears:
        if s.linear_type in ("q", "k", "v"):
            assert ranks.get(s.path) is None, s.path
        else:
            assert ranks[s.path] is not None, s.path
    assert count_parameters(SMOL, "svd", ranks).decoder_compressed <= target

    searched = Grouping.parse("5x1", search_v=True)
    ranks, _ = project_to_budget(SMOL, "svd", searched, {**ratios, "v": 0.5}, target)
    assert all(ranks[f"model.layers.{layer}.v"] is not None for layer in range(30))


def test_ranks_from_ratios_rejects_out_of_range_ratios():
    groups = Grouping.parse("5x1").groups(SMOL, "svd")
    ranks = ranks_from_ratios(groups, {"o": 0.5})
    assert ranks["model.layers.4.o"] == 144 and ranks["model.layers.4.q"] is None
    with pytest.raises(RankScopeError, match="between 0 \\(dense\\) and 0.99"):
        ranks_from_ratios(groups, {"o": 1.0})

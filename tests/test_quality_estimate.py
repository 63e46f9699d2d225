"""The instant quality estimate (engine/analysis/quality_estimate.py) on synthetic sweeps, studies and plans.

Shapes are a small two-layer Llama-like model built by hand; sweep points carry the `decoder_params` their
ranks give, so the curves' x (each type's achieved reduction) is what the engine would store.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import time

import pytest

from engine.analysis.quality_estimate import (
    ALL_LAYERS, FULL, MLP_PRUNE, NO_SWEEP, VALIDATION, Correction, NoEstimate, QualityEstimate, QualityEstimator,
    StoredEvaluation, SweepCurve, allocation_key, fit_correction, plan_evaluation, study_evaluations,
)
from engine.compression.units import LinearShape, ModelShapes, count_parameters
from engine.paths import PROJECT_ROOT
from engine.records import SensitivityPoint
from engine.search.records import TrialKind, TrialRecord

METHOD = "feature-pca"
PPL0 = 20.0
SIZES = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (128, 64), "up": (128, 64),
         "down": (64, 128)}
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
PRUNING = {"aggregation": "l2", "retention": 0.01}


def make_shapes(layers: int = 2) -> ModelShapes:
    linears = tuple(LinearShape(f"model.layers.{layer}.{MODULES[t]}", layer, t, *SIZES[t])
                    for layer in range(layers) for t in SIZES)
    return ModelShapes("synthetic", "fp", "llama", layers, linears, 10 * sum(a * b for a, b in SIZES.values()))


SHAPES = make_shapes()


def ranks_at(types: dict[str, float], layers=None, shapes: ModelShapes = SHAPES) -> dict:
    """Ranks with each type in `types` at its ratio (in `layers`, default every layer)."""
    ranks = {}
    for unit in shapes.units(METHOD):
        t = unit.types[0]
        if t in types and (layers is None or unit.layer in layers):
            ranks[unit.paths[0]] = unit.rank_for_ratio(types[t])
    return ranks


def point(t: str, ratio: float, perplexity: float, kl: float, layer: int = ALL_LAYERS,
          sweep: str = "s") -> SensitivityPoint:
    params = count_parameters(SHAPES, METHOD, ranks_at({t: ratio}, None if layer == ALL_LAYERS else [layer]))
    return SensitivityPoint(sweep, t, layer, ratio, params.decoder_compressed, perplexity, kl, 1.1 * kl, 1.0)


def reduction(t: str, ratio: float) -> float:
    """The share of type t's parameters that ratio's ranks remove (what the curve's x is)."""
    units = [u for u in SHAPES.units(METHOD) if u.types == (t,)]
    return sum(u.dense_params - u.params(u.rank_for_ratio(ratio)) for u in units) / sum(u.dense_params for u in units)


# one per-type sweep: every type at 0.25 and 0.5 (Δlog PPL grows with the ratio, by type)
SLOPES = {"q": 0.1, "k": 0.2, "v": 0.8, "o": 0.3, "gate": 0.5, "up": 0.6, "down": 0.7}
SWEEP = [point(t, r, PPL0 * math.exp(s * r * (1 + r)), s * r) for t, s in SLOPES.items() for r in (0.25, 0.5)]


def delta(t: str, ratio: float) -> float:
    """The swept Δlog PPL of type t at one of the swept ratios."""
    return SLOPES[t] * ratio * (1 + ratio)


def evaluation(ranks, perplexity, kl=0.5, windows=FULL, study=None, label="e", channels=None, pruning=None):
    return StoredEvaluation(label, ranks, channels, perplexity, kl, kl, windows, study, pruning)


# -- curves ---------------------------------------------------------------------------------------------------


def test_a_curve_interpolates_through_the_origin_and_continues_its_last_segment():
    curve = SweepCurve.through([(0.4, 3.0), (0.2, 1.0), (0.2, 2.0)])  # two points at 0.2: averaged
    assert curve.xs == (0.0, 0.2, 0.4) and curve.ys == (0.0, 1.5, 3.0)
    assert curve(0.0) == 0.0 and curve(-0.1) == 0.0
    assert curve(0.1) == pytest.approx(0.75)
    assert curve(0.3) == pytest.approx(2.25)
    assert curve(0.6) == pytest.approx(3.0 + 7.5 * 0.2)  # the last slope, (3 - 1.5) / 0.2
    falling = SweepCurve.through([(0.2, 1.0), (0.4, 0.8)])
    assert falling(0.8) == pytest.approx(0.8)  # never extended downwards
    assert curve.reach == 0.4


def test_one_swept_type_alone_is_predicted_as_its_point():
    estimator = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP)
    estimate = estimator.estimate(ranks_at({"up": 0.5}))
    assert isinstance(estimate, QualityEstimate)
    assert estimate.perplexity == pytest.approx(PPL0 * math.exp(delta("up", 0.5)), rel=1e-12)
    assert estimate.kl_forward == pytest.approx(SLOPES["up"] * 0.5)
    assert estimate.kl_reverse == pytest.approx(1.1 * SLOPES["up"] * 0.5)
    assert estimate.error is None and estimate.n_fit == 0 and not estimate.extrapolated


def test_types_add_up_in_log_perplexity_and_in_kl():
    estimator = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP)
    estimate = estimator.estimate(ranks_at({"up": 0.5, "down": 0.25, "k": 0.5}))
    expected = delta("up", 0.5) + delta("down", 0.25) + delta("k", 0.5)
    assert math.log(estimate.perplexity / PPL0) == pytest.approx(expected, rel=1e-12)
    assert estimate.contributions == pytest.approx({"up": delta("up", 0.5), "down": delta("down", 0.25),
                                                    "k": delta("k", 0.5)})
    assert estimate.kl_forward == pytest.approx((SLOPES["up"] + SLOPES["k"]) * 0.5 + SLOPES["down"] * 0.25)


def test_a_rank_between_swept_ones_is_interpolated_on_the_achieved_reduction():
    estimator = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP)
    gates = [u for u in SHAPES.units(METHOD) if u.types == ("gate",)]
    ranks = {u.paths[0]: 28 for u in gates}  # between the swept ratios' ranks (32 at 0.25, 24 at 0.5)
    x = 1 - 28 * (64 + 128) / (64 * 128)
    x0, x1 = reduction("gate", 0.25), reduction("gate", 0.5)
    assert x0 < x < x1
    expected = delta("gate", 0.25) + (delta("gate", 0.5) - delta("gate", 0.25)) * (x - x0) / (x1 - x0)
    estimate = estimator.estimate(ranks)
    assert math.log(estimate.perplexity / PPL0) == pytest.approx(expected, rel=1e-12)
    beyond = estimator.estimate(ranks_at({"gate": 0.75}))
    assert beyond.extrapolated == ("gate",)
    assert math.log(beyond.perplexity / PPL0) > delta("gate", 0.5)


def test_per_layer_points_share_a_type_out_by_measured_sensitivity():
    # layer 0 is three times as sensitive as layer 1 at ratio 0.5
    layers = [point("up", 0.5, PPL0 * math.exp(0.3), 0.3, layer=0),
              point("up", 0.5, PPL0 * math.exp(0.1), 0.1, layer=1)]
    plain = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP)
    refined = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP + layers)
    # every layer alike: the same as the per-type curve
    uniform = ranks_at({"up": 0.5})
    assert refined.estimate(uniform).perplexity == pytest.approx(plain.estimate(uniform).perplexity, rel=1e-12)
    assert refined.estimate(uniform).refined == ("up",)
    # only layer 0 compressed: 3/4 of the curve at that layer's own reduction (the type's at 0.5)
    only_first = refined.estimate(ranks_at({"up": 0.5}, layers=[0]))
    assert math.log(only_first.perplexity / PPL0) == pytest.approx(0.75 * delta("up", 0.5), rel=1e-12)
    assert only_first.kl_forward == pytest.approx(0.75 * SLOPES["up"] * 0.5)
    # the per-type curve alone reads the half-compressed type at half the reduction
    assert plain.estimate(ranks_at({"up": 0.5}, layers=[0])).refined == ()


def test_per_layer_points_that_miss_a_layer_do_not_refine():
    partial = [point("up", 0.5, PPL0 * math.exp(0.3), 0.3, layer=0)]
    estimator = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP + partial)
    assert estimator.estimate(ranks_at({"up": 0.5}, layers=[0])).refined == ()


# -- the correction ---------------------------------------------------------------------------------------------


def test_the_correction_fits_a_scale_then_a_power_with_enough_spread_evaluations():
    assert fit_correction([]) == Correction()
    scale_only = fit_correction([(1.0, 2.0), (2.0, 3.0), (0.5, 1.5)])  # three: a scale, the geometric mean ratio
    assert scale_only.exponent == 1.0 and scale_only.n == 3
    assert scale_only.scale == pytest.approx(math.exp((math.log(2) + math.log(1.5) + math.log(3)) / 3))
    power = fit_correction([(a, 1.5 * a ** 0.6) for a in (0.2, 0.5, 1.0, 2.0, 3.0)])
    assert power.exponent == pytest.approx(0.6) and power.scale == pytest.approx(1.5)
    assert power(2.0) == pytest.approx(1.5 * 2.0 ** 0.6) and power(0.0) == 0.0
    steep = fit_correction([(a, a ** 3) for a in (0.5, 1.0, 2.0, 4.0)])
    assert steep.exponent == 2.0  # clamped
    narrow = fit_correction([(a, a ** 3) for a in (1.0, 1.1, 1.2, 1.3)])  # less than a factor 1.5 apart
    assert narrow.exponent == 1.0
    assert fit_correction([(0.0, 1.0), (1.0, -0.1)]) == Correction()  # nothing usable in log space


def test_stored_evaluations_correct_the_sum_and_are_checked_by_leave_one_out():
    allocations = [ranks_at({"up": 0.5, "down": 0.5}), ranks_at({"gate": 0.25, "v": 0.5}),
                   ranks_at({"o": 0.5, "k": 0.25})]
    base = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP)
    additive = [sum(base.estimate(r).contributions.values()) for r in allocations]
    factors = [1.2, 1.5, 1.8]  # the measured Δlog PPL is this much the sum
    evaluations = [evaluation(r, PPL0 * math.exp(f * a), label=f"plan {i}")
                   for i, (r, a, f) in enumerate(zip(allocations, additive, factors))]
    estimator = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP, evaluations=evaluations)
    target = ranks_at({"up": 0.25, "q": 0.5})
    estimate = estimator.estimate(target)
    scale = math.exp(sum(math.log(f) for f in factors) / 3)  # three evaluations: a scale only
    plain = sum(estimate.contributions.values())
    assert estimate.n_fit == 3 and estimate.corrections["log_ppl"].scale == pytest.approx(scale)
    assert math.log(estimate.perplexity / PPL0) == pytest.approx(scale * plain, rel=1e-12)
    assert estimate.additive["perplexity"] == pytest.approx(PPL0 * math.exp(plain), rel=1e-12)

    # leave-one-out: each evaluation predicted with the scale of the other two
    errors = []
    for i in range(3):
        others = [f for j, f in enumerate(factors) if j != i]
        left_out_scale = math.exp(sum(math.log(f) for f in others) / 2)
        errors.append(math.exp((left_out_scale - factors[i]) * additive[i]) - 1)
    expected = math.sqrt(sum(e * e for e in errors) / 3)
    assert estimate.error.n == 3
    assert estimate.error.perplexity == pytest.approx(expected, rel=1e-9)
    assert estimator.leave_one_out(corrected=False).perplexity == pytest.approx(
        math.sqrt(sum((math.exp((1 - f) * a) - 1) ** 2 for f, a in zip(factors, additive)) / 3), rel=1e-9)


def test_an_exact_multiple_is_predicted_without_error():
    allocations = [ranks_at({"up": r, "down": r}) for r in (0.25, 0.5)] + [ranks_at({"gate": 0.5})]
    base = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP)
    evaluations = [evaluation(r, PPL0 * math.exp(1.4 * sum(base.estimate(r).contributions.values())))
                   for r in allocations]
    estimate = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP, evaluations=evaluations).estimate(allocations[0])
    assert estimate.error.perplexity == pytest.approx(0.0, abs=1e-12) and estimate.error.n == 3


# -- studies: results on the full windows anchor trials on the validation subset ------------------------------


def trial(number: int, label: str, ranks: dict, perplexity: float, kind=TrialKind.SEARCH,
          kl: float = 0.5) -> TrialRecord:
    return TrialRecord("study", number, kind, label, {}, {}, ranks, 0.0, perplexity, kl, kl, 0, 0, 0.0)


def test_a_study_anchors_its_trials_with_its_re_measured_results():
    base = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP)
    plain = lambda r: sum(base.estimate(r).contributions.values())  # noqa: E731
    shift, k = 0.25, 1.3  # validation windows read 0.25 lower in log PPL; the truth is 1.3 x the sum
    uniform = ranks_at({t: 0.25 for t in SLOPES})
    searched = [ranks_at({"up": 0.5, "q": 0.25}), ranks_at({"down": 0.5}), ranks_at({"gate": 0.5, "o": 0.5})]
    trials = [trial(0, "uniform", uniform, PPL0 * math.exp(k * plain(uniform) - shift), TrialKind.BASELINE)]
    trials += [trial(i + 1, f"trial {i}", r, PPL0 * math.exp(k * plain(r) - shift)) for i, r in enumerate(searched)]
    results = {"uniform": {"trial": 0, "perplexity": PPL0 * math.exp(k * plain(uniform)), "kl_forward": 0.5,
                           "kl_reverse": 0.5}}
    evaluations = study_evaluations("study", {"method": METHOD}, trials, results)
    assert [(e.windows, e.label) for e in evaluations] == [(FULL, "study: uniform")] + [
        (VALIDATION, f"study: {t.label}") for t in trials]
    estimator = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP, evaluations=evaluations)
    estimate = estimator.estimate(ranks_at({"v": 0.5}))
    # 1 result + 3 anchored trials, all exactly k x their sum once anchored; a power fit finds that
    assert estimate.n_fit == 4
    assert estimate.corrections["log_ppl"].scale == pytest.approx(k) and \
        estimate.corrections["log_ppl"].exponent == pytest.approx(1.0)
    assert estimate.error.n == 1  # only the result is a full-window measurement
    # leaving the only result out leaves nothing to anchor the trials: the plain sum
    assert estimate.error.perplexity == pytest.approx(abs(math.exp((1 - k) * plain(uniform)) - 1), rel=1e-9)
    # without results a study's trials are not used at all
    unanchored = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP, evaluations=study_evaluations(
        "study", {"method": METHOD}, trials, {}))
    assert unanchored.estimate(uniform).n_fit == 0 and unanchored.estimate(uniform).error is None


def test_leave_one_out_drops_the_held_out_allocation_in_every_form():
    base = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP)
    plain = lambda r: sum(base.estimate(r).contributions.values())  # noqa: E731
    shift = 0.1
    uniform, best = ranks_at({t: 0.25 for t in SLOPES}), ranks_at({"up": 0.5, "gate": 0.5})
    factor = {"uniform": 1.0, "best": 2.0}
    chosen = {"uniform": uniform, "best": best}
    trials = [trial(i, name, chosen[name], PPL0 * math.exp(factor[name] * plain(chosen[name]) - shift))
              for i, name in enumerate(("uniform", "best"))]
    results = {name: {"trial": i, "perplexity": PPL0 * math.exp(factor[name] * plain(chosen[name])),
                      "kl_forward": 0.5, "kl_reverse": 0.5} for i, name in enumerate(("uniform", "best"))}
    estimator = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP,
                                 evaluations=study_evaluations("study", {}, trials, results))
    # best is predicted from uniform alone (scale 1), never from best's own trial anchored by uniform
    errors = [math.exp((2.0 - 1.0) * plain(uniform)) - 1, math.exp((1.0 - 2.0) * plain(best)) - 1]
    assert estimator.leave_one_out().perplexity == pytest.approx(math.sqrt(sum(e * e for e in errors) / 2), rel=1e-9)


# -- too little data --------------------------------------------------------------------------------------------


def test_without_a_sweep_or_a_swept_type_the_estimator_says_what_to_run():
    empty = QualityEstimator(SHAPES, METHOD, PPL0, [])
    result = empty.estimate(ranks_at({"up": 0.5}))
    assert isinstance(result, NoEstimate) and result.message == NO_SWEEP
    assert "per-type sweep on the Sensitivity page" in NO_SWEEP
    only_up = QualityEstimator(SHAPES, METHOD, PPL0, [p for p in SWEEP if p.linear_type == "up"])
    missing = only_up.estimate(ranks_at({"up": 0.5, "down": 0.5, "v": 0.25}))
    assert isinstance(missing, NoEstimate)
    assert "no points for v, down" in missing.message  # in the model's order and "Sensitivity page" in missing.message
    # per-layer points alone do not make a curve
    layers_only = QualityEstimator(SHAPES, METHOD, PPL0, [point("up", 0.5, 30.0, 0.3, layer=0)])
    assert isinstance(layers_only.estimate(ranks_at({"up": 0.5}, layers=[0])), NoEstimate)


# -- pruned MLPs ------------------------------------------------------------------------------------------------


def mlp_point(ratio: float, perplexity: float, kl: float) -> SensitivityPoint:
    kept = {mlp.path: round((1 - ratio) * mlp.d_ff) for mlp in SHAPES.mlps}
    params = count_parameters(SHAPES, METHOD, {}, kept).decoder_compressed
    return SensitivityPoint("m", MLP_PRUNE, ALL_LAYERS, ratio, params, perplexity, kl, kl, 1.0)


def test_pruned_mlps_use_the_mlp_sweep_or_say_the_estimate_covers_low_rank_mlps_only():
    kept = {mlp.path: 96 for mlp in SHAPES.mlps}  # 25% of 128 channels pruned in every MLP
    ranks = ranks_at({"k": 0.5})
    without = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP).estimate(ranks, kept)
    assert isinstance(without, NoEstimate)
    assert "MLP sweep" in without.message and "low-rank MLPs only" in without.message
    mlp = [mlp_point(0.25, PPL0 * math.exp(0.4), 0.4), mlp_point(0.5, PPL0 * math.exp(1.0), 1.0)]
    estimator = QualityEstimator(SHAPES, METHOD, PPL0, SWEEP, mlp_points=mlp, pruning=PRUNING)
    estimate = estimator.estimate({**ranks, **{p: None for m in SHAPES.mlps for p in m.paths}}, kept)
    assert math.log(estimate.perplexity / PPL0) == pytest.approx(0.4 + delta("k", 0.5), rel=1e-12)
    half_pruned = estimator.estimate(ranks, {SHAPES.mlps[0].path: 64, SHAPES.mlps[1].path: None})
    assert half_pruned.contributions[MLP_PRUNE] == pytest.approx(0.4)  # 50% of one MLP = 25% of all: the 0.25 point
    # evaluations pruned with other settings than the MLP sweep's are left out
    other = evaluation(ranks, 50.0, channels=kept, pruning={"aggregation": "l1", "retention": 0.01})
    same = evaluation(ranks, 50.0, channels=kept, pruning=PRUNING)
    assert QualityEstimator(SHAPES, METHOD, PPL0, SWEEP, mlp, [other], PRUNING).estimate(ranks).n_fit == 0
    assert QualityEstimator(SHAPES, METHOD, PPL0, SWEEP, mlp, [same], PRUNING).estimate(ranks).n_fit == 1


# -- plans as evaluations ---------------------------------------------------------------------------------------


def test_measured_plans_count_only_for_this_model_method_and_evaluation_set():
    evaluation_set = {"text_fingerprint": "abc", "window_len": 512, "n_windows": 16}
    calibration = {"text_fingerprint": "cal", "window_len": 512, "n_windows": 128, "n_groups": 32}
    plan = {"model": {"fingerprint": "fp"}, "method": METHOD, "ranks": ranks_at({"up": 0.5}),
            "metrics": {"perplexity": 30.0, "kl_forward": 0.2, "kl_reverse": 0.3},
            "evaluation": {**evaluation_set, "text": "sherlock-holmes"}, "calibration": dict(calibration)}
    found = plan_evaluation(plan, "mine", "fp", METHOD, evaluation_set, calibration)
    assert found is not None and found.windows == FULL and found.perplexity == 30.0 and found.kl_reverse == 0.3
    assert found.key == allocation_key({**plan["ranks"], "model.layers.0.mlp.down_proj": None})
    assert plan_evaluation(plan, "mine", "other", METHOD, evaluation_set) is None
    assert plan_evaluation(plan, "mine", "fp", "svd", evaluation_set) is None
    assert plan_evaluation(plan, "mine", "fp", METHOD, {**evaluation_set, "n_windows": 8}) is None
    assert plan_evaluation(plan, "mine", "fp", METHOD, evaluation_set, {**calibration, "n_groups": 4}) is None
    assert plan_evaluation({**plan, "metrics": {}}, "mine", "fp", METHOD, evaluation_set) is None
    assert plan_evaluation({**plan, "recovery": {"run_id": "r"}}, "mine", "fp", METHOD, evaluation_set) is None


# -- contracts ----------------------------------------------------------------------------------------------------


def test_labels_match_the_sweeps_and_the_module_loads_without_torch():
    from engine.compression import sweep

    assert (ALL_LAYERS, MLP_PRUNE) == (sweep.ALL_LAYERS, sweep.MLP_PRUNE)
    code = "import sys, engine.analysis.quality_estimate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT)


def test_an_estimate_on_a_default_sized_model_takes_well_under_half_a_second():
    shapes = make_shapes(layers=30)
    sweep = []
    for t, s in SLOPES.items():
        for r in (0.2, 0.4, 0.6):
            params = count_parameters(shapes, METHOD, ranks_at({t: r}, shapes=shapes)).decoder_compressed
            sweep.append(SensitivityPoint("s", t, ALL_LAYERS, r, params, PPL0 * math.exp(s * r), s * r, s * r, 1.0))
    rng = random.Random(0)
    evaluations = []
    for i in range(60):  # a finished study's worth: trials on validation windows, four of them re-measured
        r = {u.paths[0]: rng.randrange(8, u.max_rank // 2, 8) for u in shapes.units(METHOD)}
        evaluations.append(evaluation(r, PPL0 * (2 + 0.01 * i), windows=VALIDATION, study="s"))
        if i < 4:
            evaluations.append(evaluation(r, PPL0 * (2.1 + 0.01 * i), windows=FULL, study="s"))
    start = time.perf_counter()
    estimate = QualityEstimator(shapes, METHOD, PPL0, sweep, evaluations=evaluations).estimate(
        ranks_at({t: 0.3 for t in SLOPES}, shapes=shapes))
    seconds = time.perf_counter() - start
    assert estimate.error.n == 4 and estimate.n_fit == 60
    assert seconds < 0.5, seconds

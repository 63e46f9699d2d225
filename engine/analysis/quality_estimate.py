"""The Allocate page's instant estimate: perplexity and both KLs of an allocation predicted from what the store
already measured for this model, method and texts, with the prediction's own measured error. Torch-free and
cheap (no model runs), so a page can call it on every rerun.

**What it is built from.** A per-type sweep (`SensitivityPoint`s with `layer == -1`: one type compressed in every
layer at a ratio) and, for pruned MLPs, the MLP sweep's `mlp-prune` points; per-layer points (`layer >= 0`) of
the same sweeps where stored; and *multi-type evaluations*: allocations that compress several types at once and
were measured, i.e. a search study's results (its best plan and baselines re-measured on the full evaluation
windows), its trials (measured on a validation subset, anchored to the full windows below) and evaluated plans
(Apply, saved plans with metrics).

**The model**, for each metric m: Δlog PPL = log PPL − log PPL_orig, KL(P_orig‖P_comp) and KL(P_comp‖P_orig).

1. A type's achieved reduction x_t is the share of that type's decoder-linear parameters the allocation removes
   (0..1). For pruned MLPs the type is `mlp-prune`: the parameters pruning removes over all MLP parameters. A
   sweep point's x is the same share, read from its stored `decoder_params`, so rank rounding is on the curve.
2. The type's curve f_t runs through (0, 0) and its sweep points, linear in between and continued along its
   last segment past the last point (such types are reported as extrapolated).
3. The additive prediction is A = Σ_t f_t(x_t). Where a per-layer sweep covers every layer of a type at some
   ratio, layer ℓ's share w_ℓ of that type (its point's value over the sum over layers, averaged over such
   ratios) refines the term to Σ_ℓ w_ℓ·f_t(x_t,ℓ): the same f_t(x) when every layer has the same x, and uneven
   allocations weighed by each layer's measured sensitivity.
4. Types interact (compressing two costs more than the sum of each alone, usually), so the estimate is
   ŷ = b·A^c with (b, c) fitted by least squares in log space (log y = log b + c·log A) on the stored multi-type
   evaluations: c = 1 (a scale only) with fewer than `POWER_MIN_EVALUATIONS` of them or when their A span less
   than a factor `POWER_MIN_SPAN`, otherwise c within `EXPONENT_BOUNDS`; with none, b = c = 1 (plain A).

**Trials anchored to the full windows.** A study scores its trials on a validation subset (other windows than
the evaluation set), then re-measures its best plan and its baselines on the full evaluation windows, so each
result is also one of its trials. Those pairs anchor the study's other trials: log PPL moves by the mean
difference full − validation of the paired log PPLs, each KL is multiplied by the geometric mean of the paired
full / validation ratios. A study without re-measured results (stopped early) gives no evaluations.

**The error** is measured by leave-one-out over the stored full-window evaluations (study results and evaluated
plans; one per distinct allocation): each is predicted by the model fitted without it, i.e. without its
allocation in any form (its own trial too) and with its study's anchor recomputed from the other results. The
number shown is the root-mean-square relative error of the predicted perplexity (and of each KL) against the
measured one over those n predictions, "±x% on n stored evaluations". With no full-window evaluation the
error is not known and is not shown.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence, Union

from engine.compression.units import ModelShapes
from engine.hashing import sha256_json
from engine.records import SensitivityPoint
from engine.search.records import TrialRecord

ALL_LAYERS = -1  # a per-type point (engine.compression.sweep.ALL_LAYERS; that module needs torch)
MLP_PRUNE = "mlp-prune"  # an MLP sweep's pruned-by-channels label (engine.compression.sweep.MLP_PRUNE)
METRICS = ("log_ppl", "kl_forward", "kl_reverse")
FULL, VALIDATION = "full", "validation"  # which windows an evaluation was measured on
POWER_MIN_EVALUATIONS = 4
POWER_MIN_SPAN = 1.5
EXPONENT_BOUNDS = (0.25, 2.0)

NO_SWEEP = ("No per-type sweep is stored for this model, method and texts, so there is nothing to predict from: "
            "run the per-type sweep on the Sensitivity page (every type; the default ratios will do) and the "
            "estimate appears here at once.")


def allocation_key(ranks: Mapping[str, Optional[int]], channels: Optional[Mapping[str, Optional[int]]] = None) -> str:
    """One id per allocation: the same compressed ranks and kept channels give the same id (dense entries and
    unpruned MLPs, whether listed as None or left out, do not count)."""
    compressed = sorted((path, int(rank)) for path, rank in ranks.items() if rank is not None)
    pruned = sorted((path, int(kept)) for path, kept in (channels or {}).items() if kept is not None)
    return sha256_json([compressed, pruned])[:16]


@dataclass(frozen=True)
class StoredEvaluation:
    """One measured allocation: its ranks (and kept channels), metrics, and on which windows they were measured."""

    label: str
    ranks: Mapping[str, Optional[int]]
    channels: Optional[Mapping[str, Optional[int]]]
    perplexity: float
    kl_forward: float
    kl_reverse: float
    windows: str = FULL  # FULL: the evaluation windows; VALIDATION: a study's validation subset
    study: Optional[str] = None  # the study it comes from, which anchors its validation trials
    pruning: Optional[dict] = None  # how pruned MLPs chose their channels (PruningSettings.to_dict())
    key: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", allocation_key(self.ranks, self.channels))

    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.perplexity, self.kl_forward, self.kl_reverse)) \
            and self.perplexity > 0


def study_evaluations(study_id: str, settings: Mapping, trials: Sequence[TrialRecord],
                      results: Mapping[str, dict]) -> list[StoredEvaluation]:
    """A study's results (full windows; each names the trial it re-measured) and its trials (validation subset).

    The caller picks studies of the same model, method and texts (the results are on those evaluation windows)."""
    pruning = settings.get("pruning")
    by_number = {trial.number: trial for trial in trials}
    out = []
    for label, result in results.items():
        trial = by_number.get(result.get("trial"))
        if trial is None:
            continue
        out.append(StoredEvaluation(f"{study_id}: {label}", trial.ranks, trial.channels, float(result["perplexity"]),
                                    float(result["kl_forward"]), float(result["kl_reverse"]), FULL, study_id,
                                    pruning if trial.channels else None))
    for trial in trials:
        out.append(StoredEvaluation(f"{study_id}: {trial.label}", trial.ranks, trial.channels, trial.perplexity,
                                    trial.kl_forward, trial.kl_reverse, VALIDATION, study_id,
                                    pruning if trial.channels else None))
    return out


def plan_evaluation(plan: Mapping, label: str, fingerprint: str, method: str, evaluation: Mapping,
                    calibration: Optional[Mapping] = None) -> Optional[StoredEvaluation]:
    """A plan dict's measured metrics as an evaluation, or None when they cannot be used here: no metrics,
    another model or method, a recovered plan (its factors are not the method's), or metrics measured on
    another evaluation set (`evaluation`: text fingerprint, window length and count) or with factors from
    another calibration (`calibration`, for methods that use one)."""
    metrics = plan.get("metrics") or {}
    if not all(name in metrics for name in ("perplexity", "kl_forward", "kl_reverse")):
        return None
    if (plan.get("model") or {}).get("fingerprint") != fingerprint or plan.get("method") != method \
            or plan.get("recovery"):
        return None
    if not _same(plan.get("evaluation"), evaluation, ("text_fingerprint", "window_len", "n_windows")):
        return None
    calibration_keys = ("text_fingerprint", "window_len", "n_windows", "n_groups")
    if calibration is not None and not _same(plan.get("calibration"), calibration, calibration_keys):
        return None
    return StoredEvaluation(label, dict(plan["ranks"]), plan.get("channels"), float(metrics["perplexity"]),
                            float(metrics["kl_forward"]), float(metrics["kl_reverse"]), FULL, None,
                            plan.get("pruning") if plan.get("channels") else None)


def _same(section: Optional[Mapping], wanted: Mapping, keys: Sequence[str]) -> bool:
    return section is not None and all(section.get(k) == wanted.get(k) for k in keys)


# -- curves ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepCurve:
    """A metric against a type's achieved reduction: through (0, 0) and the sweep's points, linear in between,
    continued along the last segment (never downwards) past the last point."""

    xs: tuple[float, ...]  # ascending, xs[0] == 0
    ys: tuple[float, ...]

    @classmethod
    def through(cls, points: Sequence[tuple[float, float]]) -> "SweepCurve":
        """The curve through `points` (x, y) and the origin; points at the same x are averaged."""
        by_x: dict[float, list[float]] = {0.0: [0.0]}
        for x, y in points:
            if x > 0:
                by_x.setdefault(round(x, 9), []).append(y)
        xs = sorted(by_x)
        return cls(tuple(xs), tuple(sum(by_x[x]) / len(by_x[x]) for x in xs))

    @property
    def reach(self) -> float:
        """The largest measured reduction."""
        return self.xs[-1]

    def __call__(self, x: float) -> float:
        if x <= 0.0 or len(self.xs) < 2:
            return 0.0
        i = bisect.bisect_right(self.xs, x)
        if i < len(self.xs):
            x0, x1, y0, y1 = self.xs[i - 1], self.xs[i], self.ys[i - 1], self.ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        x0, x1, y0, y1 = self.xs[-2], self.xs[-1], self.ys[-2], self.ys[-1]
        return y1 + max(0.0, (y1 - y0) / (x1 - x0)) * (x - x1)


@dataclass(frozen=True)
class Correction:
    """ŷ = scale·A^exponent for an additive prediction A > 0 (0 otherwise), fitted on `n` evaluations."""

    scale: float = 1.0
    exponent: float = 1.0
    n: int = 0

    def __call__(self, additive: float) -> float:
        return self.scale * additive ** self.exponent if additive > 0 else 0.0


def fit_correction(pairs: Sequence[tuple[float, float]]) -> Correction:
    """Least squares of log y on log A over the pairs (A, y) with both positive (see the module docstring for
    when the exponent is fitted); no usable pair gives the identity."""
    usable = [(a, y) for a, y in pairs if a > 0 and y > 0 and math.isfinite(a) and math.isfinite(y)]
    if not usable:
        return Correction()
    log_a = [math.log(a) for a, _ in usable]
    log_y = [math.log(y) for _, y in usable]
    exponent = 1.0
    if len(usable) >= POWER_MIN_EVALUATIONS and max(a for a, _ in usable) >= POWER_MIN_SPAN * min(a for a, _ in usable):
        mean_a, mean_y = sum(log_a) / len(log_a), sum(log_y) / len(log_y)
        sxx = sum((a - mean_a) ** 2 for a in log_a)
        sxy = sum((a - mean_a) * (y - mean_y) for a, y in zip(log_a, log_y))
        exponent = min(max(sxy / sxx, EXPONENT_BOUNDS[0]), EXPONENT_BOUNDS[1])
    log_scale = sum(y - exponent * a for a, y in zip(log_a, log_y)) / len(usable)
    return Correction(math.exp(log_scale), exponent, len(usable))


# -- results ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EstimateError:
    """Root-mean-square relative error of each predicted metric over `n` leave-one-out predictions."""

    perplexity: float
    kl_forward: float
    kl_reverse: float
    n: int


@dataclass(frozen=True)
class QualityEstimate:
    """The predicted metrics of one allocation and what they rest on."""

    perplexity: float
    kl_forward: float
    kl_reverse: float
    additive: dict  # metric -> the plain sum A before the correction
    contributions: dict  # type -> its Δlog PPL term of A
    error: Optional[EstimateError]  # None: no full-window evaluation to measure it on
    corrections: dict  # metric -> Correction
    n_fit: int  # evaluations the corrections were fitted on (anchored study trials included; each metric's fit uses
    # those where both the sum and the measured value are positive, `corrections[m].n`)
    extrapolated: tuple[str, ...] = ()  # types compressed beyond their sweep's last point
    refined: tuple[str, ...] = ()  # types whose term uses per-layer points


@dataclass(frozen=True)
class NoEstimate:
    """Why there is no estimate, saying what to run."""

    message: str


@dataclass(frozen=True)
class _Additive:
    values: dict  # metric -> A
    contributions: dict  # type -> Δlog PPL term
    missing: tuple[str, ...]
    extrapolated: tuple[str, ...]
    refined: tuple[str, ...]
    compressed: bool


class QualityEstimator:
    """Predicts perplexity and both KLs of allocations from stored sweeps and evaluations (module docstring).

    `points`: the rank sweep's points (per type and per layer); `mlp_points`: the MLP sweep's, measured with
    `pruning` (pruned evaluations chosen otherwise are left out); `evaluations`: stored multi-type evaluations of
    the same model, method and texts; `original_perplexity`: the original model's on the evaluation windows.

    Example: `QualityEstimator(shapes, "feature-pca", 28.86, store.sensitivity_points(sid)).estimate(ranks)`.
    """

    def __init__(self, shapes: ModelShapes, method: str, original_perplexity: float,
                 points: Sequence[SensitivityPoint], mlp_points: Sequence[SensitivityPoint] = (),
                 evaluations: Sequence[StoredEvaluation] = (), pruning: Optional[dict] = None):
        self.shapes, self.method, self.pruning = shapes, method, pruning
        self.log_ppl0 = math.log(original_perplexity)
        self._units = shapes.units(method)
        self._mlps = shapes.mlps
        self._elements = self._type_elements()
        self._curves: dict[str, dict[str, SweepCurve]] = {}
        self._weights: dict[tuple[str, str], dict[int, float]] = {}
        self._read_points([p for p in points if p.linear_type != MLP_PRUNE]
                          + [p for p in mlp_points if p.linear_type == MLP_PRUNE])
        self._additive_cache: dict[str, _Additive] = {}
        self._loo: dict[bool, Optional[EstimateError]] = {}
        self.evaluations = [e for e in evaluations if self._usable(e)]
        training = self._training(frozenset())
        self._n_fit = len(training)
        self._corrections = self._fit(training)

    # -- what a type is made of ----------------------------------------------------------------------------------
    def _type_elements(self) -> dict[str, dict[int, int]]:
        """type -> layer -> dense parameters: rank-unit labels (`q`, `q+k`, ...) and `mlp-prune` (whole MLPs)."""
        elements: dict[str, dict[int, int]] = {}
        for unit in self._units:
            per_layer = elements.setdefault("+".join(unit.types), {})
            per_layer[unit.layer] = per_layer.get(unit.layer, 0) + unit.dense_params
        if self._mlps:
            elements[MLP_PRUNE] = {mlp.layer: mlp.params(None) for mlp in self._mlps}
        return elements

    def _removed(self, ranks: Mapping[str, Optional[int]],
                 channels: Optional[Mapping[str, Optional[int]]]) -> dict[str, dict[int, int]]:
        """type -> layer -> parameters the allocation removes (a pruned MLP's gate, up and down count as pruning)."""
        removed: dict[str, dict[int, int]] = {}
        pruned = {mlp.path: channels[mlp.path] for mlp in self._mlps
                  if channels and channels.get(mlp.path) is not None}
        pruned_paths = {path for mlp in self._mlps if mlp.path in pruned for path in mlp.paths}
        for unit in self._units:
            rank = ranks.get(unit.paths[0])
            if rank is None or any(path in pruned_paths for path in unit.paths):
                continue
            per_layer = removed.setdefault("+".join(unit.types), {})
            per_layer[unit.layer] = per_layer.get(unit.layer, 0) + max(0, unit.dense_params - unit.params(rank))
        for mlp in self._mlps:
            if mlp.path in pruned:
                removed.setdefault(MLP_PRUNE, {})[mlp.layer] = mlp.params(None) - mlp.params(pruned[mlp.path])
        return removed

    # -- curves from the sweeps -------------------------------------------------------------------------------
    def _metric_values(self, point: SensitivityPoint) -> Optional[dict[str, float]]:
        values = (point.perplexity, point.kl_forward, point.kl_reverse)
        if not all(math.isfinite(v) for v in values) or point.perplexity <= 0:
            return None  # an overflowed point says nothing a curve can use
        return {"log_ppl": math.log(point.perplexity) - self.log_ppl0, "kl_forward": point.kl_forward,
                "kl_reverse": point.kl_reverse}

    def _read_points(self, points: Sequence[SensitivityPoint]) -> None:
        dense_total = self.shapes.decoder_linear_params
        per_type: dict[str, list[tuple[float, dict]]] = {}
        per_layer: dict[str, dict[float, dict[int, dict]]] = {}  # type -> ratio -> layer -> metric values
        for point in points:
            elements = self._elements.get(point.linear_type)
            values = self._metric_values(point)
            if elements is None or values is None:
                continue
            removed = dense_total - point.decoder_params
            if point.layer == ALL_LAYERS:
                per_type.setdefault(point.linear_type, []).append((removed / sum(elements.values()), values))
            elif point.layer in elements:
                per_layer.setdefault(point.linear_type, {}).setdefault(round(point.ratio, 6), {})[point.layer] = values
        for linear_type, measured in per_type.items():
            self._curves[linear_type] = {m: SweepCurve.through([(x, v[m]) for x, v in measured]) for m in METRICS}
        for linear_type, by_ratio in per_layer.items():
            if linear_type not in self._curves:
                continue  # per-layer shares refine a per-type curve; alone they do not make one
            layers = set(self._elements[linear_type])
            for metric in METRICS:
                shares = []
                for values in by_ratio.values():
                    if not layers <= set(values):
                        continue  # a ratio not measured at every layer cannot share the type out
                    sensitivity = {layer: max(values[layer][metric], 0.0) for layer in layers}
                    total = sum(sensitivity.values())
                    if total > 0:
                        shares.append({layer: s / total for layer, s in sensitivity.items()})
                if shares:
                    self._weights[(linear_type, metric)] = {layer: sum(s[layer] for s in shares) / len(shares)
                                                           for layer in layers}

    # -- the additive prediction --------------------------------------------------------------------------------
    def _additive(self, ranks: Mapping[str, Optional[int]], channels: Optional[Mapping[str, Optional[int]]],
                  key: Optional[str] = None) -> _Additive:
        key = key or allocation_key(ranks, channels)
        if key in self._additive_cache:
            return self._additive_cache[key]
        totals = {metric: 0.0 for metric in METRICS}
        contributions, missing, extrapolated, refined = {}, [], [], []
        compressed = False
        for linear_type, removed in self._removed(ranks, channels).items():
            if sum(removed.values()) <= 0:
                continue
            compressed = True
            curves = self._curves.get(linear_type)
            if curves is None:
                missing.append(linear_type)
                continue
            dense = self._elements[linear_type]
            x = sum(removed.values()) / sum(dense.values())
            if x > curves["log_ppl"].reach + 1e-9:
                extrapolated.append(linear_type)
            for metric in METRICS:
                weights = self._weights.get((linear_type, metric))
                if weights is None:
                    term = curves[metric](x)
                else:
                    term = sum(w * curves[metric](removed.get(layer, 0) / dense[layer]) for layer, w in weights.items())
                    if linear_type not in refined:
                        refined.append(linear_type)
                totals[metric] += term
                if metric == "log_ppl":
                    contributions[linear_type] = term
        result = _Additive(totals, contributions, tuple(missing), tuple(extrapolated), tuple(refined), compressed)
        self._additive_cache[key] = result
        return result

    def _usable(self, evaluation: StoredEvaluation) -> bool:
        """Finite, compressing something the curves cover, and pruned as the MLP curve was (if it prunes)."""
        if not evaluation.finite():
            return False
        if any(k is not None for k in (evaluation.channels or {}).values()) and evaluation.pruning != self.pruning:
            return False
        additive = self._additive(evaluation.ranks, evaluation.channels, evaluation.key)
        return additive.compressed and not additive.missing

    # -- the correction, and the evaluations it is fitted on --------------------------------------------------------
    def _training(self, excluded: frozenset) -> list[StoredEvaluation]:
        """Full-window evaluations (one per allocation) and the validation trials of studies with re-measured
        results, anchored to the full windows by those results; allocations in `excluded` left out everywhere."""
        full: dict[str, StoredEvaluation] = {}
        for e in self.evaluations:
            if e.windows == FULL and e.key not in excluded:
                full.setdefault(e.key, e)
        trials: dict[str, dict[str, StoredEvaluation]] = {}
        for e in self.evaluations:
            if e.windows == VALIDATION and e.study is not None and e.key not in excluded:
                trials.setdefault(e.study, {}).setdefault(e.key, e)
        anchored: dict[str, StoredEvaluation] = {}
        for study, by_key in trials.items():
            pairs = [(e, by_key[e.key]) for e in self.evaluations
                     if e.windows == FULL and e.study == study and e.key in by_key and e.key not in excluded]
            if not pairs:
                continue  # no re-measured result: its validation numbers cannot be put on the full windows
            shift = sum(math.log(f.perplexity) - math.log(v.perplexity) for f, v in pairs) / len(pairs)
            kl_factor = {name: _geometric_ratio([(getattr(f, name), getattr(v, name)) for f, v in pairs])
                         for name in ("kl_forward", "kl_reverse")}
            for key, trial in by_key.items():
                if key not in full and key not in anchored:
                    anchored[key] = replace(trial, perplexity=math.exp(math.log(trial.perplexity) + shift),
                                            kl_forward=trial.kl_forward * kl_factor["kl_forward"],
                                            kl_reverse=trial.kl_reverse * kl_factor["kl_reverse"], windows=FULL)
        return list(full.values()) + list(anchored.values())

    def _targets(self, evaluation: StoredEvaluation) -> dict[str, float]:
        return {"log_ppl": math.log(evaluation.perplexity) - self.log_ppl0, "kl_forward": evaluation.kl_forward,
                "kl_reverse": evaluation.kl_reverse}

    def _fit(self, training: Sequence[StoredEvaluation]) -> dict[str, Correction]:
        pairs = {metric: [] for metric in METRICS}
        for e in training:
            additive = self._additive(e.ranks, e.channels, e.key).values
            measured = self._targets(e)
            for metric in METRICS:
                pairs[metric].append((additive[metric], measured[metric]))
        return {metric: fit_correction(pairs[metric]) for metric in METRICS}

    def _predict(self, additive: _Additive, corrections: Mapping[str, Correction]) -> dict[str, float]:
        values = {metric: corrections[metric](additive.values[metric]) for metric in METRICS}
        return {"perplexity": math.exp(self.log_ppl0 + values["log_ppl"]), "kl_forward": values["kl_forward"],
                "kl_reverse": values["kl_reverse"]}

    # -- what a page asks --------------------------------------------------------------------------------------
    @property
    def has_curves(self) -> bool:
        return bool(self._curves)

    @property
    def swept_types(self) -> list[str]:
        return [t for t in self._elements if t in self._curves]

    def estimate(self, ranks: Mapping[str, Optional[int]],
                 channels: Optional[Mapping[str, Optional[int]]] = None) -> Union[QualityEstimate, NoEstimate]:
        """The predicted metrics of an allocation with the leave-one-out error, or why there is none."""
        if not self._curves:
            return NoEstimate(NO_SWEEP)
        additive = self._additive(ranks, channels)
        if additive.missing:
            return NoEstimate(_missing_message(additive.missing))
        predicted = self._predict(additive, self._corrections)
        plain = self._predict(additive, {metric: Correction() for metric in METRICS})
        return QualityEstimate(
            predicted["perplexity"], predicted["kl_forward"], predicted["kl_reverse"],
            {"perplexity": plain["perplexity"], "kl_forward": plain["kl_forward"], "kl_reverse": plain["kl_reverse"]},
            dict(additive.contributions), self.leave_one_out(), dict(self._corrections),
            self._n_fit, additive.extrapolated, additive.refined)

    def leave_one_out(self, corrected: bool = True) -> Optional[EstimateError]:
        """The RMS relative error of each metric over the full-window evaluations, each predicted without itself
        (`corrected=False`: of the plain additive sum, for comparison); None when there is none."""
        if corrected in self._loo:
            return self._loo[corrected]
        targets: dict[str, StoredEvaluation] = {}
        for e in self.evaluations:
            if e.windows == FULL:
                targets.setdefault(e.key, e)
        errors: dict[str, list[float]] = {"perplexity": [], "kl_forward": [], "kl_reverse": []}
        identity = {metric: Correction() for metric in METRICS}
        for key, target in targets.items():
            corrections = self._fit(self._training(frozenset({key}))) if corrected else identity
            predicted = self._predict(self._additive(target.ranks, target.channels, key), corrections)
            for name in errors:
                measured = getattr(target, name)
                if measured > 0:
                    errors[name].append(predicted[name] / measured - 1.0)
        result = None
        if targets:
            result = EstimateError(*(_rms(errors[name]) for name in ("perplexity", "kl_forward", "kl_reverse")),
                                   n=len(targets))
        self._loo[corrected] = result
        return result


def _geometric_ratio(pairs: Sequence[tuple[float, float]]) -> float:
    logs = [math.log(a / b) for a, b in pairs if a > 0 and b > 0]
    return math.exp(sum(logs) / len(logs)) if logs else 1.0


def _rms(values: Sequence[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else math.nan


def _missing_message(missing: Sequence[str]) -> str:
    parts = []
    ranked = [t for t in missing if t != MLP_PRUNE]
    if ranked:
        parts.append(f"The per-type sweep has no points for {', '.join(ranked)}, which this allocation compresses: "
                     "run the per-type sweep for them on the Sensitivity page.")
    if MLP_PRUNE in missing:
        parts.append("This allocation prunes MLPs by channels and no MLP sweep (every layer pruned, with these pruning "
                     "settings) is stored for this model, method and texts: run the MLP sweep on the Sensitivity page "
                     "(it prunes with LoRAP's l2 scores and 1% retention). Until then the estimate covers allocations "
                     "with low-rank MLPs only.")
    return " ".join(parts)

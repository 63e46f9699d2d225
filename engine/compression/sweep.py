"""Sensitivity sweeps: how much each type (or one layer of a type) tolerates compression.

- by type: compress one type in every layer at each ratio of a grid (default 0.1-0.9);
- by layer: compress one layer of one type at a ratio, for each layer.
For joint methods the unit is the pair (`q+k`, `gate+up`). Every point is written to the store
the moment it is measured; a sweep started again skips the points already stored, so a sweep
killed midway resumes where it stopped and never recomputes a point.

A by-layer point runs only the layers from the compressed one up: the original model's input
states of that layer come from a `LayerPrefixCache` (engine/compression/layer_prefix.py), built
once per sweep and advanced layer by layer, so its numbers are those of a full evaluation. Points
by type, and models whose partial forward is not proven (`supports_prefix`), are evaluated in full.

MLP sweeps (LoRAP) compare two kinds of compression of the gated MLPs at equal parameters. At an
MLP parameter-reduction ratio λ each MLP keeps `round((1 − λ)·d_ff)` channels when pruned (label
`mlp-prune`: LoRAP's gradient-free channel pruning with the given `PruningSettings`, l2 rows and 1%
retention by default), or its gate, up and down get the session method's rank of the same parameter
count, `⌊3·d·kept / Σ(d_in + d_out)⌋` (label `mlp-lowrank`). `sweep_mlp_by_type` does every layer's
MLP at each ratio of a grid; `sweep_mlp_by_layer` one layer's MLP at a time. Their points are
`SensitivityPoint`s like the others, under a sweep id of their own (`mlp_sweep_id`: the session's
sweep id with the calibration that scores channels and the pruning settings), stored and resumed the
same way; they are not registered in the `sweeps` table, so the rank sweeps' lookups never see them.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional, Sequence

from engine.cache.keys import KEY_LENGTH, calibration_key, factorization_key, reference_key, sweep_key
from engine.compression.evaluators import EvaluationTask, Evaluator
from engine.compression.layer_prefix import LayerPrefixCache, supports_prefix
from engine.compression.plan import RankPlan
from engine.compression.pruning import PruningSettings
from engine.compression.session import CompressionSession
from engine.compression.units import MlpShape, count_parameters
from engine.errors import RankScopeError
from engine.hashing import sha256_json
from engine.methods import get_method
from engine.progress import ProgressCallback, ProgressTracker
from engine.records import SensitivityPoint
from engine.texts.corpus import text_fingerprint
from engine.texts.settings import TextSettings

DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ALL_LAYERS = -1
MLP_PRUNE = "mlp-prune"  # the MLP pruned by channels (LoRAP)
MLP_LOW_RANK = "mlp-lowrank"  # gate, up and down factorised by the session's method at the same parameter count
MLP_FORMS: tuple[str, ...] = (MLP_PRUNE, MLP_LOW_RANK)

# what a point's measurement returns: decoder-linear parameters, perplexity, forward KL, reverse KL
Measured = tuple[int, float, float, float]


def sweep_id(session: CompressionSession) -> str:
    """Points of one sweep share a model, method, factorisation and evaluation set."""
    return sweep_key(session.loaded.fingerprint, session.method, session.factorization_record.factorization_id,
                     session.reference_record.reference_id)


def unit_labels(session: CompressionSession) -> list[str]:
    """Type labels of the session's rank units in canonical order: `q`, ... or `q+k` for joint pairs."""
    return list(dict.fromkeys("+".join(u.types) for u in session.shapes.units(session.method)))


def _ranks_for(session: CompressionSession, label: str, layer: int, ratio: float) -> dict:
    ranks = {}
    for unit in session.shapes.units(session.method):
        if "+".join(unit.types) == label and layer in (ALL_LAYERS, unit.layer):
            rank = unit.rank_for_ratio(ratio)
            ranks.update({p: rank for p in unit.paths})
    return ranks


def _run_points(session: CompressionSession, points: Sequence[tuple[str, int, float]],
                progress: Optional[ProgressCallback], reuse_prefix: bool = False,
                evaluator: Optional[Evaluator] = None) -> list[SensitivityPoint]:
    sid = sweep_id(session)
    session.store.register_sweep(sid, session.loaded.fingerprint, session.method,
                                 session.factorization_record.factorization_id, session.reference_record.reference_id,
                                 {"texts": session.texts.to_dict()})

    def measure(label: str, layer: int, ratio: float) -> Measured:
        ranks = _ranks_for(session, label, layer, ratio)
        result = session.evaluate_ranks(ranks)
        return (count_parameters(session.shapes, session.method, ranks).decoder_compressed, result.perplexity,
                result.kl_forward, result.kl_reverse)

    if evaluator is not None and evaluator.workers > 1:
        return _measure_points_on(evaluator, session, sid, points, f"sweep ({session.method})", progress)
    return _measure_points(session, sid, points, measure, f"sweep ({session.method})", progress, reuse_prefix)


def _measure_points_on(evaluator: Evaluator, session: CompressionSession, sid: str,
                       points: Sequence[tuple[str, int, float]], stage: str,
                       progress: Optional[ProgressCallback]) -> list[SensitivityPoint]:
    """`_measure_points` on a pool of workers: every point not stored yet is handed out at once and stored (here,
    by the driver) as it comes back, in whatever order. Points run in full (no layer prefix on the workers)."""
    store = session.store
    done = {(p.linear_type, p.layer, round(p.ratio, 6)) for p in store.sensitivity_points(sid)}
    todo = [pt for pt in points if (pt[0], pt[1], round(pt[2], 6)) not in done]
    tracker = ProgressTracker(progress, f"{stage} on {evaluator.workers} workers", total=len(points), unit="points")
    tracker.advance(len(points) - len(todo))
    tasks = [EvaluationTask(point, _ranks_for(session, *point)) for point in todo]
    for evaluated in evaluator.map_unordered(tasks):
        label, layer, ratio = evaluated.task.key
        result = evaluated.result
        params = count_parameters(session.shapes, session.method, evaluated.task.ranks).decoder_compressed
        store.put_sensitivity_point(SensitivityPoint(sid, label, layer, float(ratio), params, result.perplexity,
                                                     result.kl_forward, result.kl_reverse, evaluated.seconds))
        tracker.advance()
    wanted = {(label, layer, round(ratio, 6)) for label, layer, ratio in points}
    return [p for p in store.sensitivity_points(sid) if (p.linear_type, p.layer, round(p.ratio, 6)) in wanted]


def _measure_points(session: CompressionSession, sid: str, points: Sequence[tuple[str, int, float]],
                    measure: Callable[[str, int, float], Measured], stage: str,
                    progress: Optional[ProgressCallback], reuse_prefix: bool = False) -> list[SensitivityPoint]:
    """Measure the points of sweep `sid` not stored yet, storing each at once; returns the stored `points`."""
    store = session.store
    done = {(p.linear_type, p.layer, round(p.ratio, 6)) for p in store.sensitivity_points(sid)}
    todo = [pt for pt in points if (pt[0], pt[1], round(pt[2], 6)) not in done]
    tracker = ProgressTracker(progress, stage, total=len(points), unit="points")
    tracker.advance(len(points) - len(todo))
    prefix = None
    if reuse_prefix and supports_prefix(session.loaded) and any(layer != ALL_LAYERS for _, layer, _ in todo):
        prefix = LayerPrefixCache(session.loaded, session.windows)
        todo.sort(key=lambda point: point[1])  # upwards: the cache only advances
    for label, layer, ratio in todo:
        start = time.perf_counter()
        if prefix is None or layer == ALL_LAYERS:
            params, perplexity, kl_forward, kl_reverse = measure(label, layer, ratio)
        else:
            prefix.advance_to(layer)  # timed with the point that needs it
            with prefix.replaying():
                params, perplexity, kl_forward, kl_reverse = measure(label, layer, ratio)
        store.put_sensitivity_point(SensitivityPoint(sid, label, layer, float(ratio), params, perplexity, kl_forward,
                                                     kl_reverse, time.perf_counter() - start))
        tracker.advance()
    wanted = {(label, layer, round(ratio, 6)) for label, layer, ratio in points}
    return [p for p in store.sensitivity_points(sid) if (p.linear_type, p.layer, round(p.ratio, 6)) in wanted]


def _check_ratios(ratios: Iterable[float]) -> None:
    bad = [r for r in ratios if not 0.0 < r < 1.0]
    if bad:
        raise RankScopeError(f"Sweep ratios must be between 0 and 1 (exclusive), got {bad}.")


def _check(session: CompressionSession, labels: Iterable[str], ratios: Iterable[float]) -> None:
    known = unit_labels(session)
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise RankScopeError(f"Unknown type(s) {', '.join(unknown)} for method {session.method}; types: {', '.join(known)}.")
    _check_ratios(ratios)


def sweep_by_type(session: CompressionSession, ratios: Sequence[float] = DEFAULT_RATIOS,
                  types: Optional[Sequence[str]] = None, progress: Optional[ProgressCallback] = None,
                  evaluator: Optional[Evaluator] = None) -> list[SensitivityPoint]:
    """Each type compressed alone, in every layer, at each ratio (on `evaluator`'s workers when given)."""
    labels = list(types) if types else unit_labels(session)
    _check(session, labels, ratios)
    return _run_points(session, [(label, ALL_LAYERS, r) for label in labels for r in ratios], progress,
                       evaluator=evaluator)


def sweep_by_layer(session: CompressionSession, linear_type: str, ratio: float,
                   layers: Optional[Sequence[int]] = None, progress: Optional[ProgressCallback] = None,
                   reuse_prefix: bool = True, evaluator: Optional[Evaluator] = None) -> list[SensitivityPoint]:
    """One layer of `linear_type` compressed at `ratio`, for each layer in turn.

    With `reuse_prefix` (the default) each point runs only the layers from its own up, on the
    original model's cached states below it (identical numbers, less time); False evaluates in full.
    On `evaluator`'s workers (when given) points run in full, several at once.
    """
    _check(session, [linear_type], [ratio])
    chosen = list(layers) if layers is not None else list(range(session.shapes.num_layers))
    outside = [layer for layer in chosen if not 0 <= layer < session.shapes.num_layers]
    if outside:
        raise RankScopeError(f"Layers {outside} do not exist; the model has layers 0-{session.shapes.num_layers - 1}.")
    return _run_points(session, [(linear_type, layer, ratio) for layer in chosen], progress, reuse_prefix, evaluator)


# -- MLP sweeps: channel pruning (LoRAP) against low rank at equal parameters ------------------------------


def mlp_sweep_key(base_sweep_id: str, calibration_id: str, pruning: PruningSettings) -> str:
    """The id of an MLP sweep: the rank sweep's id, the calibration whose norms score channels, the pruning."""
    return sha256_json(["mlp-sweep", base_sweep_id, calibration_id, pruning.to_dict()])[:KEY_LENGTH]


def mlp_sweep_id(session: CompressionSession, pruning: PruningSettings = PruningSettings()) -> str:
    """Points of one MLP sweep share the session's sweep, the calibration of the channel scores and `pruning`
    (a data-free method's session scores channels on its texts' calibration, `CompressionSession.channel_order`)."""
    texts = session.texts
    calibration_id = (session.calibration.record.calibration_id if session.calibration is not None else
                      calibration_key(session.loaded.fingerprint, text_fingerprint(texts.calibration_text),
                                      texts.calibration_windowing, texts.n_groups, session.loaded.dtype))
    return mlp_sweep_key(sweep_id(session), calibration_id, pruning)


def mlp_sweep_id_for(model_fingerprint: str, method: str, texts: TextSettings,
                     pruning: PruningSettings = PruningSettings(), dtype: str = "float32") -> str:
    """`mlp_sweep_id` from the settings alone, without a session or a model: how a page finds the stored points."""
    calibration_id = calibration_key(model_fingerprint, text_fingerprint(texts.calibration_text),
                                     texts.calibration_windowing, texts.n_groups, dtype)
    factorization_id = factorization_key(model_fingerprint, method, calibration_id if get_method(method).needs else "",
                                         dtype)
    reference_id = reference_key(model_fingerprint, text_fingerprint(texts.evaluation_text), texts.evaluation_windowing,
                                 dtype)
    return mlp_sweep_key(sweep_key(model_fingerprint, method, factorization_id, reference_id), calibration_id, pruning)


def kept_for_ratio(mlp: MlpShape, ratio: float) -> int:
    """Channels an MLP keeps at parameter-reduction `ratio`: `(1 − ratio)·d_ff` rounded, from 1 to d_ff."""
    return max(1, min(mlp.d_ff, int((1.0 - ratio) * mlp.d_ff + 0.5)))


def mlp_point_plan(session: CompressionSession, label: str, layer: int, ratio: float,
                   pruning: PruningSettings = PruningSettings()) -> RankPlan:
    """The plan an MLP sweep point evaluates: `layer`'s MLP (every MLP for `ALL_LAYERS`) pruned (`mlp-prune`) or
    factorised at the same parameter count (`mlp-lowrank`); everything else dense."""
    if label not in MLP_FORMS:
        raise RankScopeError(f"Unknown MLP compression '{label}'; forms: {', '.join(MLP_FORMS)}.")
    units = session.shapes.units(session.method)
    ranks: dict[str, Optional[int]] = {}
    channels: dict[str, Optional[int]] = {}
    for mlp in session.shapes.mlps:
        if layer not in (ALL_LAYERS, mlp.layer):
            continue
        kept = kept_for_ratio(mlp, ratio)
        if label == MLP_PRUNE:
            channels[mlp.path] = kept
            continue
        mlp_units = [u for u in units if set(u.paths) <= set(mlp.paths)]  # joint methods: gate+up share one
        per_rank = sum(u.d_in + u.d_out for u in mlp_units)
        rank = max(1, min(min(u.break_even_rank for u in mlp_units), mlp.params(kept) // per_rank))
        ranks.update({path: rank for u in mlp_units for path in u.paths})
    if label == MLP_PRUNE:
        return session.plan({}, channels=channels, pruning=pruning.to_dict())
    return session.plan(ranks)


def _check_mlp(session: CompressionSession, forms: Iterable[str], ratios: Iterable[float]) -> None:
    if not session.shapes.mlps:
        raise RankScopeError(f"MLP sweeps prune or factorise gated MLPs (gate, up and down); "
                             f"'{session.shapes.model_id}' has none.")
    unknown = [form for form in forms if form not in MLP_FORMS]
    if unknown:
        raise RankScopeError(f"Unknown MLP compression(s) {', '.join(unknown)}; forms: {', '.join(MLP_FORMS)}.")
    _check_ratios(ratios)


def _run_mlp_points(session: CompressionSession, points: Sequence[tuple[str, int, float]], pruning: PruningSettings,
                    progress: Optional[ProgressCallback], reuse_prefix: bool = False) -> list[SensitivityPoint]:
    if any(label == MLP_PRUNE for label, _, _ in points):
        session.channel_order(pruning.aggregation, progress)  # scored once on the dense model, before any point

    def measure(label: str, layer: int, ratio: float) -> Measured:
        evaluated = session.evaluate(mlp_point_plan(session, label, layer, ratio, pruning))
        metrics = evaluated.metrics
        return (evaluated.parameters["decoder_linear"]["compressed"], metrics["perplexity"], metrics["kl_forward"],
                metrics["kl_reverse"])

    return _measure_points(session, mlp_sweep_id(session, pruning), points, measure, f"MLP sweep ({session.method})",
                           progress, reuse_prefix)


def sweep_mlp_by_type(session: CompressionSession, ratios: Sequence[float] = DEFAULT_RATIOS,
                      forms: Sequence[str] = MLP_FORMS, pruning: PruningSettings = PruningSettings(),
                      progress: Optional[ProgressCallback] = None) -> list[SensitivityPoint]:
    """Every layer's MLP pruned by channels, and factorised at the same parameter count, at each ratio."""
    _check_mlp(session, forms, ratios)
    return _run_mlp_points(session, [(form, ALL_LAYERS, r) for form in forms for r in ratios], pruning, progress)


def sweep_mlp_by_layer(session: CompressionSession, ratio: float, layers: Optional[Sequence[int]] = None,
                       form: str = MLP_PRUNE, pruning: PruningSettings = PruningSettings(),
                       progress: Optional[ProgressCallback] = None, reuse_prefix: bool = True
                       ) -> list[SensitivityPoint]:
    """One layer's MLP compressed (`form`, pruned by default) at `ratio`, the others untouched, for each layer.

    Per-layer points reuse the original layers below the compressed one, as `sweep_by_layer` does."""
    _check_mlp(session, [form], [ratio])
    chosen = list(layers) if layers is not None else [mlp.layer for mlp in session.shapes.mlps]
    known = {mlp.layer for mlp in session.shapes.mlps}
    outside = [layer for layer in chosen if layer not in known]
    if outside:
        raise RankScopeError(f"Layers {outside} have no gated MLP; MLP layers: {sorted(known)}.")
    return _run_mlp_points(session, [(form, layer, ratio) for layer in chosen], pruning, progress, reuse_prefix)

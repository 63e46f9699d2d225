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
"""

from __future__ import annotations

import time
from typing import Iterable, Optional, Sequence

from engine.cache.keys import sweep_key
from engine.compression.layer_prefix import LayerPrefixCache, supports_prefix
from engine.compression.session import CompressionSession
from engine.compression.units import count_parameters
from engine.errors import RankScopeError
from engine.progress import ProgressCallback, ProgressTracker
from engine.records import SensitivityPoint

DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ALL_LAYERS = -1


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
                progress: Optional[ProgressCallback], reuse_prefix: bool = False) -> list[SensitivityPoint]:
    sid = sweep_id(session)
    store = session.store
    store.register_sweep(sid, session.loaded.fingerprint, session.method, session.factorization_record.factorization_id,
                         session.reference_record.reference_id, {"texts": session.texts.to_dict()})
    done = {(p.linear_type, p.layer, round(p.ratio, 6)) for p in store.sensitivity_points(sid)}
    todo = [pt for pt in points if (pt[0], pt[1], round(pt[2], 6)) not in done]
    tracker = ProgressTracker(progress, f"sweep ({session.method})", total=len(points), unit="points")
    tracker.advance(len(points) - len(todo))
    prefix = None
    if reuse_prefix and supports_prefix(session.loaded) and any(layer != ALL_LAYERS for _, layer, _ in todo):
        prefix = LayerPrefixCache(session.loaded, session.windows)
        todo.sort(key=lambda point: point[1])  # upwards: the cache only advances
    for label, layer, ratio in todo:
        ranks = _ranks_for(session, label, layer, ratio)
        start = time.perf_counter()
        if prefix is None or layer == ALL_LAYERS:
            result = session.evaluate_ranks(ranks)
        else:
            prefix.advance_to(layer)  # timed with the point that needs it
            with prefix.replaying():
                result = session.evaluate_ranks(ranks)
        store.put_sensitivity_point(SensitivityPoint(
            sid, label, layer, float(ratio), count_parameters(session.shapes, session.method, ranks).decoder_compressed,
            result.perplexity, result.kl_forward, result.kl_reverse, time.perf_counter() - start,
        ))
        tracker.advance()
    wanted = {(label, layer, round(ratio, 6)) for label, layer, ratio in points}
    return [p for p in store.sensitivity_points(sid) if (p.linear_type, p.layer, round(p.ratio, 6)) in wanted]


def _check(session: CompressionSession, labels: Iterable[str], ratios: Iterable[float]) -> None:
    known = unit_labels(session)
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise RankScopeError(f"Unknown type(s) {', '.join(unknown)} for method {session.method}; types: {', '.join(known)}.")
    bad = [r for r in ratios if not 0.0 < r < 1.0]
    if bad:
        raise RankScopeError(f"Sweep ratios must be between 0 and 1 (exclusive), got {bad}.")


def sweep_by_type(session: CompressionSession, ratios: Sequence[float] = DEFAULT_RATIOS,
                  types: Optional[Sequence[str]] = None, progress: Optional[ProgressCallback] = None
                  ) -> list[SensitivityPoint]:
    """Each type compressed alone, in every layer, at each ratio."""
    labels = list(types) if types else unit_labels(session)
    _check(session, labels, ratios)
    return _run_points(session, [(label, ALL_LAYERS, r) for label in labels for r in ratios], progress)


def sweep_by_layer(session: CompressionSession, linear_type: str, ratio: float,
                   layers: Optional[Sequence[int]] = None, progress: Optional[ProgressCallback] = None,
                   reuse_prefix: bool = True) -> list[SensitivityPoint]:
    """One layer of `linear_type` compressed at `ratio`, for each layer in turn.

    With `reuse_prefix` (the default) each point runs only the layers from its own up, on the
    original model's cached states below it (identical numbers, less time); False evaluates in full.
    """
    _check(session, [linear_type], [ratio])
    chosen = list(layers) if layers is not None else list(range(session.shapes.num_layers))
    outside = [layer for layer in chosen if not 0 <= layer < session.shapes.num_layers]
    if outside:
        raise RankScopeError(f"Layers {outside} do not exist; the model has layers 0-{session.shapes.num_layers - 1}.")
    return _run_points(session, [(linear_type, layer, ratio) for layer in chosen], progress, reuse_prefix)

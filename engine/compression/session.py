"""A compression session: one model, one method, its cached factors and the evaluation set.

`CompressionSession.open(...)` gathers (from the store, or by computing and storing) everything a
trial needs: calibration statistics if the method uses data, the method's full factorisation of
every decoder linear, the evaluation windows and the original model's reference distribution.
After that, `evaluate(plan)` costs one pass of the compressed model: it slices factors into the
model in place (`compress_`), evaluates, and restores the original modules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from engine.cache_keys import STATISTICS_VERSION
from engine.compression.grouping import Grouping, budget_target, project_to_budget, ranks_from_ratios
from engine.compression.lowrank import compress_, restore_
from engine.compression.plan import RankPlan
from engine.compression.units import ModelShapes
from engine.hashing import sha256_json
from engine.methods import Factorization, get_method
from engine.metrics import QualityResult, ReferenceDistribution, compute_reference, evaluate_quality
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback, ProgressTracker
from engine.store.arrays import load_arrays, load_arrays_with_metadata, save_arrays
from engine.store.duckdb_store import FactorizationRecord, ReferenceRecord, Store
from engine.texts.corpus import DEFAULT_CALIBRATION_TEXT, DEFAULT_EVALUATION_TEXT, text_fingerprint
from engine.texts.windows import Windowing
from engine.workspace import (
    DEFAULT_CALIBRATION_WINDOWING,
    DEFAULT_EVALUATION_WINDOWING,
    DEFAULT_GROUPS,
    Calibration,
    ensure_calibration,
    load_windows,
)

FACTORIZATION_VERSION = 1
REFERENCE_TOP_K = 1024


def ensure_factorization(
    store: Store,
    loaded: LoadedModel,
    method: str,
    calibration: Optional[Calibration],
    progress: Optional[ProgressCallback] = None,
) -> tuple[FactorizationRecord, Factorization]:
    """The full factorisation of every decoder linear for `method`, cached on disk and in the store."""
    spec = get_method(method)
    calibration_id = calibration.record.calibration_id if spec.needs else ""
    key = sha256_json(["factorization", FACTORIZATION_VERSION, STATISTICS_VERSION, loaded.fingerprint, method, calibration_id])[:32]
    record = store.get_factorization(key)
    if record is not None:
        stored = load_arrays_with_metadata(store, record.array_id)
        if stored is not None:
            return record, Factorization.from_tensors(*stored)
        store.forget_factorization(key)
    tracker = ProgressTracker(progress, f"factorising ({method})", total=1, unit="models")
    start = time.perf_counter()
    factorization = spec.factorize(loaded, calibration.statistics if spec.needs else None)
    seconds = time.perf_counter() - start
    tracker.advance()
    tensors, metadata = factorization.to_tensors()
    save_arrays(store, key, "factorization", tensors, metadata)
    record = FactorizationRecord(key, loaded.fingerprint, method, calibration_id, key, seconds)
    store.put_factorization(record)
    return record, factorization


def ensure_reference(
    store: Store,
    loaded: LoadedModel,
    text_source: str,
    windowing: Windowing,
    windows: torch.Tensor,
    top_k: int = REFERENCE_TOP_K,
    progress: Optional[ProgressCallback] = None,
) -> tuple[ReferenceRecord, ReferenceDistribution]:
    """The original model's top-k next-token distribution on the evaluation windows, cached."""
    key = sha256_json(["reference", loaded.fingerprint, text_fingerprint(text_source), *windowing.key(), top_k])[:32]
    record = store.get_reference(key)
    if record is not None:
        tensors = load_arrays(store, record.array_id)
        if tensors is not None:
            return record, ReferenceDistribution(
                tensors["top_logprobs"], tensors["top_indices"].long(), tensors["tail_logmass"], record.perplexity
            )
        store.forget_reference(key)
    start = time.perf_counter()
    reference = compute_reference(loaded.model, windows, top_k, progress)
    save_arrays(store, key, "reference", {
        "top_logprobs": reference.top_logprobs,
        "top_indices": reference.top_indices.to(torch.int32),
        "tail_logmass": reference.tail_logmass,
    })
    record = ReferenceRecord(key, loaded.fingerprint, text_fingerprint(text_source), windowing.window_len,
                             windows.shape[0], reference.top_k, key, reference.perplexity, time.perf_counter() - start)
    store.put_reference(record)
    return record, reference


@dataclass(frozen=True)
class TextSettings:
    """Calibration and evaluation texts with their windowing (defaults from DESIGN.md §4)."""

    calibration_text: str = DEFAULT_CALIBRATION_TEXT
    calibration_windowing: Windowing = DEFAULT_CALIBRATION_WINDOWING
    n_groups: int = DEFAULT_GROUPS
    evaluation_text: str = DEFAULT_EVALUATION_TEXT
    evaluation_windowing: Windowing = DEFAULT_EVALUATION_WINDOWING


class CompressionSession:
    """Everything needed to turn rank plans into measured compressed models, for one method."""

    def __init__(self, store: Store, loaded: LoadedModel, method: str, texts: TextSettings,
                 calibration: Optional[Calibration], factorization_record: FactorizationRecord,
                 factorization: Factorization, windows: torch.Tensor, reference_record: ReferenceRecord,
                 reference: ReferenceDistribution):
        self.store, self.loaded, self.method, self.texts = store, loaded, method, texts
        self.calibration = calibration
        self.factorization_record, self.factorization = factorization_record, factorization
        self.windows, self.reference_record, self.reference = windows, reference_record, reference
        self.shapes = ModelShapes.of(loaded)

    @classmethod
    def open(cls, store: Store, loaded: LoadedModel, method: str, texts: TextSettings = TextSettings(),
             progress: Optional[ProgressCallback] = None) -> "CompressionSession":
        spec = get_method(method)
        calibration = None
        if spec.needs:
            calibration = ensure_calibration(store, loaded, texts.calibration_text, texts.calibration_windowing,
                                             texts.n_groups, progress)
        f_record, factorization = ensure_factorization(store, loaded, method, calibration, progress)
        _, windows = load_windows(store, loaded, texts.evaluation_text, texts.evaluation_windowing)
        r_record, reference = ensure_reference(store, loaded, texts.evaluation_text, texts.evaluation_windowing,
                                               windows, progress=progress)
        return cls(store, loaded, method, texts, calibration, f_record, factorization, windows, r_record, reference)

    # -- plans ----------------------------------------------------------------------------------------
    def _plan_context(self) -> dict:
        t = self.texts
        calibration = None
        if self.calibration is not None:
            calibration = {"text": t.calibration_text, "text_fingerprint": self.calibration.record.text_fingerprint,
                           "window_len": t.calibration_windowing.window_len,
                           "n_windows": t.calibration_windowing.n_windows, "n_groups": t.n_groups}
        evaluation = {"text": t.evaluation_text, "text_fingerprint": self.reference_record.text_fingerprint,
                      "window_len": t.evaluation_windowing.window_len, "n_windows": t.evaluation_windowing.n_windows}
        return {"calibration": calibration, "evaluation": evaluation}

    def plan(self, ranks: Mapping[str, Optional[int]], grouping: Optional[dict] = None, **provenance) -> RankPlan:
        """A validated plan for explicit ranks (missing paths dense)."""
        return RankPlan.build(self.shapes, self.method, ranks, grouping=grouping, **self._plan_context(), **provenance)

    def plan_from_ratios(self, grouping: Grouping, ratios: Mapping[str, float], budget: Optional[float] = None,
                         **provenance) -> RankPlan:
        """A plan from group ratios; with `budget` (decoder-linear reduction) projected onto it exactly."""
        if budget is None:
            ranks = ranks_from_ratios(grouping.groups(self.shapes, self.method), ratios)
            values = dict(ratios)
        else:
            ranks, values = project_to_budget(self.shapes, self.method, grouping, ratios, budget_target(self.shapes, budget))
        return self.plan(ranks, grouping={**grouping.to_dict(), "values": values, "budget": budget}, **provenance)

    def uniform_plan(self, reduction: float, **provenance) -> RankPlan:
        """Every decoder linear (v included) at the same ratio, projected onto that reduction."""
        grouping = Grouping("5x1", search_v=True)
        names = grouping.groups(self.shapes, self.method)
        return self.plan_from_ratios(grouping, {name: reduction for name in names}, budget=reduction, **provenance)

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate_ranks(self, ranks: Mapping[str, Optional[int]], progress: Optional[ProgressCallback] = None,
                       window_indices: Optional[list[int]] = None, windows: Optional[torch.Tensor] = None,
                       reference: Optional[ReferenceDistribution] = None) -> QualityResult:
        """Apply ranks in place, measure perplexity and both KLs, and restore the original modules.

        By default on the evaluation windows; `windows` with their `reference` evaluate elsewhere
        (a search's validation windows), and `window_indices` picks some of them.
        """
        if (windows is None) != (reference is None):
            raise ValueError("windows and reference go together")
        model = self.loaded.model
        try:
            compress_(model, ranks, self.factorization)
            return evaluate_quality(model, self.windows if windows is None else windows,
                                    self.reference if reference is None else reference, progress, window_indices)
        finally:
            restore_(model)

    def evaluate(self, plan: RankPlan, progress: Optional[ProgressCallback] = None) -> RankPlan:
        """The plan with its measured metrics filled in."""
        plan.validate_for(self.shapes)
        result = self.evaluate_ranks(plan.ranks, progress)
        return plan.with_metrics(result.to_dict())

    def original_quality(self) -> dict:
        return {"perplexity": self.reference.perplexity, "kl_forward": 0.0, "kl_reverse": 0.0,
                "tokens": self.windows.shape[0] * (self.windows.shape[1] - 1)}

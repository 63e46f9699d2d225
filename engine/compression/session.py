"""A compression session: one model, one method, its cached factors and the evaluation set.

`CompressionSession.open(...)` gathers through `engine.cache` (from the store, or by computing and
storing) everything a trial needs: calibration statistics if the method uses data, the method's factors of every
decoder linear (up to the largest rank that saves parameters), the evaluation windows and the original model's reference distribution.
After that, `evaluate(plan)` costs one pass of the compressed model: it slices factors into the
model in place (`compress_`), evaluates, and restores the original modules.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from engine.cache.calibration import Calibration, ensure_calibration
from engine.cache.factorization import ensure_factorization
from engine.cache.reference import ensure_reference
from engine.cache.windows import ensure_windows
from engine.compression.grouping import Grouping, budget_target, project_to_budget, ranks_from_ratios
from engine.compression.lowrank import compress_, restore_
from engine.compression.plan import PlanError, RankPlan
from engine.compression.pruning import PruningSettings, channel_scores, kept_channels, prune_mlps_
from engine.compression.recovered import apply_recovery_
from engine.compression.units import ModelShapes
from engine.methods import Factorization, get_method
from engine.metrics import QualityResult, ReferenceDistribution, evaluate_quality
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback
from engine.records import FactorizationRecord, ReferenceRecord
from engine.store.arrays import load_arrays
from engine.store.duckdb_store import Store
from engine.texts.settings import TextSettings


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
        self._channel_orders: dict[str, dict[str, torch.Tensor]] = {}  # aggregation -> MLP path -> channel order

    @classmethod
    def open(cls, store: Store, loaded: LoadedModel, method: str, texts: TextSettings = TextSettings(),
             progress: Optional[ProgressCallback] = None) -> "CompressionSession":
        spec = get_method(method)
        calibration = None
        if spec.needs:
            calibration = ensure_calibration(store, loaded, texts.calibration_text, texts.calibration_windowing,
                                             texts.n_groups, progress)
        f_record, factorization = ensure_factorization(store, loaded, method, calibration, progress)
        windows = ensure_windows(store, loaded, texts.evaluation_text, texts.evaluation_windowing)
        r_record, reference = ensure_reference(store, loaded, texts.evaluation_text, texts.evaluation_windowing,
                                               progress=progress)
        return cls(store, loaded, method, texts, calibration, f_record, factorization, windows, r_record, reference)

    # -- plans ----------------------------------------------------------------------------------------
    def _plan_context(self) -> dict:
        calibration = None
        if self.calibration is not None:
            calibration = {**self.texts.calibration_dict(), "text_fingerprint": self.calibration.record.text_fingerprint}
        evaluation = {**self.texts.evaluation_dict(), "text_fingerprint": self.reference_record.text_fingerprint}
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
                       reference: Optional[ReferenceDistribution] = None,
                       channels: Optional[Mapping[str, Optional[int]]] = None,
                       pruning: Optional[Mapping] = None) -> QualityResult:
        """Apply ranks in place, measure perplexity and both KLs, and restore the original modules.

        By default on the evaluation windows; `windows` with their `reference` evaluate elsewhere
        (a search's validation windows), and `window_indices` picks some of them. `channels` (MLP path -> kept
        channels, None: not pruned) also prunes those MLPs as `pruning` says (LoRAP's l2 and 1% by default);
        their gate, up and down must be dense in `ranks`.
        """
        if (windows is None) != (reference is None):
            raise ValueError("windows and reference go together")
        model = self.loaded.model
        # chosen before compressing: channel scores come from the dense weights
        kept = self.kept_channels(channels, pruning) if channels and any(k is not None for k in channels.values()) \
            else {}
        try:
            compress_(model, ranks, self.factorization)
            self._prune_(kept)
            return evaluate_quality(model, self.windows if windows is None else windows,
                                    self.reference if reference is None else reference, progress, window_indices)
        finally:
            restore_(model)

    def apply_(self, plan: RankPlan) -> None:
        """Compress the model in place as `plan` says; `restore_(session.loaded.model)` undoes it.

        A recovered plan's factors are sliced at its starting ranks and its run's stored vectors are
        folded in (`engine.compression.recovered`), which gives the plan's own ranks.
        """
        recovery = plan.recovery
        model = self.loaded.model
        kept = self.kept_channels(plan.channels, plan.pruning) if plan.channels else {}
        if recovery is None:
            compress_(model, plan.ranks, self.factorization)
            self._prune_(kept)
            return
        tensors = load_arrays(self.store, recovery["run_id"])
        if tensors is None:
            raise PlanError(
                f"This plan was recovered by run {recovery['run_id'][:12]}, whose trained vectors are not in this cache "
                f"({self.store.cache_dir}). Run the recovery again on the plan it started from (rankscope recover, with "
                "the settings in the plan's 'recovery' section) to rebuild them.")
        compress_(model, recovery["base_ranks"], self.factorization)
        try:
            self._prune_(kept)
            ranks = apply_recovery_(model, recovery["kind"], tensors, recovery.get("subset"))
            wrong = {p: (r, plan.ranks.get(p)) for p, r in ranks.items() if plan.ranks.get(p) != r}
            if wrong:
                path, (got, said) = next(iter(wrong.items()))
                raise PlanError(f"The recovery run's vectors give '{path}' rank {got}, but the plan says {said}: "
                                "the plan does not belong to this run.")
        except Exception:
            restore_(model)
            raise

    # -- channel pruning (LoRAP) ----------------------------------------------------------------------------
    def channel_order(self, aggregation: str = "l2", progress: Optional[ProgressCallback] = None) -> dict[str, torch.Tensor]:
        """MLP path -> its channels by descending LoRAP group score (computed once per aggregation).

        Scores weigh the original weights by the calibration's input-channel L2 norms, so a method without
        calibration (svd, joint-svd) gathers the session texts' calibration here, once."""
        if aggregation not in self._channel_orders:
            PruningSettings(aggregation=aggregation)  # refuses an unknown aggregation with the allowed ones
            calibration = self.calibration or ensure_calibration(
                self.store, self.loaded, self.texts.calibration_text, self.texts.calibration_windowing,
                self.texts.n_groups, progress)
            model = self.loaded.model
            restore_(model)  # scores come from the dense weights
            orders = {}
            for mlp in self.shapes.mlps:
                gate, up, down = (model.get_submodule(p).weight.detach().cpu() for p in mlp.paths)  # beside the norms
                mlp_in = calibration.statistics.site(mlp.layer, "mlp_in").l2_norm
                down_in = calibration.statistics.site(mlp.layer, "down_in").l2_norm
                scores = channel_scores(gate, up, down, mlp_in, down_in, aggregation)
                orders[mlp.path] = torch.argsort(scores, descending=True, stable=True)
            self._channel_orders[aggregation] = orders
        return self._channel_orders[aggregation]

    def channel_orders(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every channel order computed so far (aggregation -> MLP path -> order): what a worker replica adopts."""
        return dict(self._channel_orders)

    def adopt_channel_orders(self, orders: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Take channel orders another session computed for the same model and calibration (a worker's replica)."""
        self._channel_orders.update({k: dict(v) for k, v in orders.items()})

    def kept_channels(self, channels: Mapping[str, Optional[int]], pruning: Optional[Mapping] = None
                      ) -> dict[str, tuple[str, str, str, torch.Tensor]]:
        """For each pruned MLP: (gate, up, down paths, the kept channel ids), chosen as `pruning` says."""
        settings = PruningSettings.from_dict(pruning)
        orders = self.channel_order(settings.aggregation)
        by_path = {m.path: m for m in self.shapes.mlps}
        return {path: (*by_path[path].paths, kept_channels(orders[path], keep, settings.retention))
                for path, keep in channels.items() if keep is not None}

    def _prune_(self, kept: Mapping[str, tuple[str, str, str, torch.Tensor]]) -> None:
        if not kept:
            return
        try:
            prune_mlps_(self.loaded.model, kept)
        except Exception:
            restore_(self.loaded.model)
            raise

    def evaluate(self, plan: RankPlan, progress: Optional[ProgressCallback] = None) -> RankPlan:
        """The plan with its measured metrics filled in."""
        plan = plan.validate_for(self.shapes)
        model = self.loaded.model
        try:
            self.apply_(plan)
            result = evaluate_quality(model, self.windows, self.reference, progress)
        finally:
            restore_(model)
        return plan.with_metrics(result.to_dict())

    def original_quality(self) -> dict:
        return {"perplexity": self.reference.perplexity, "kl_forward": 0.0, "kl_reverse": 0.0,
                "tokens": self.windows.shape[0] * (self.windows.shape[1] - 1)}

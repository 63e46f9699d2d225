"""Run a rank-allocation study: scikit-optimize ask/tell over group ratios, persisted trial by trial.

A trial: the optimiser asks group ratios; they are projected exactly onto the budget; the plan is
evaluated on the validation subset; the objective `log PPL + β·KL` is told back; the trial is
written to the store the moment it finishes. A study resumes from its stored trials by replaying
them through a fresh optimiser with the same seed (ask, then tell the stored result), which puts
the optimiser in the state an uninterrupted run would have, so it reaches the same result.
Baselines (uniform, LoRD, greedy, the global allocation; uniform and LoRAP when the study prunes MLPs,
`mlp="prune"`) are evaluated in the same study first.

Two strategies (`StudySettings.strategy`):
- `trust` (new studies): the baselines the study's coordinates can express (LoRD, greedy; uniform when it
  prunes) are told to the GP as they are; the others (the global allocation, LoRAP) and the warm start are
  evaluated as `prior` trials at their nearest point of the study's coordinates and told; then a random phase
  and GP expected improvement, local around the incumbent and global in turn (`engine.search.proposals`).
  Each proposal depends only on the stored trials, so a resumed study goes on exactly as it would have.
- `bo` (studies made before strategies existed): scikit-optimize's ask/tell loop told only the warm start; a
  study resumes by replaying its stored trials through a fresh optimiser with the same seed.
At the end the best `select_top` distinct plans by validation objective are measured on every candidate validation
window (the final selection: a few subset windows overrate their own winner) and the best there is the study's choice;
it and the baselines are re-measured on the full evaluation windows; a plan another study of the same model, method
and texts already measured there is not measured again.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np

from engine.cache.factorization import component_energies
from engine.cache.reference import ensure_reference
from engine.cache.windows import ensure_windows
from engine.compression.grouping import (
    MAX_RATIO, Grouping, budget_target, project_mixed_to_budget, project_to_budget, pruning_groups,
)
from engine.compression.lorap import lorap_allocation
from engine.compression.evaluators import EvaluationTask, Evaluator
from engine.compression.session import CompressionSession
from engine.compression.sweep import sweep_id
from engine.compression.units import count_parameters
from engine.errors import RankScopeError
from engine.hashing import sha256_json
from engine.progress import ProgressCallback, ProgressTracker
from engine.search import proposals
from engine.search.baselines import achieved_values, global_allocation, greedy_ratios, lord_ratios, uniform_ratios
from engine.search.records import (
    SELECTABLE_BASELINES, SELECTION, StudyRecord, StudyState, StudyStorage, TrialKind, TrialRecord, this_process,
)
from engine.search.settings import EXACT_KL_SINCE, StudySettings
from engine.search.subset import choose_subset, objective
from engine.search.summary import best_trial, is_complete, trial_values
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing


# what the optimiser is told for a plan whose perplexity overflowed (a GP cannot fit infinities)
NON_FINITE_OBJECTIVE = 100.0


def _told(value: float) -> float:
    return value if math.isfinite(value) else NON_FINITE_OBJECTIVE


def factor_energies(factorization) -> dict[str, np.ndarray]:
    """Module path -> energy of each factor component over the full rank, ‖B_i‖²·‖A_i‖² (σ_i² for an SVD): what
    dropping it removes from the weight, the share the global allocation spreads a type's measured loss by. A
    stored factorisation keeps factors only up to the break-even rank, and the energies of all components
    (`engine.cache.factorization.component_energies`)."""
    return component_energies(factorization)


def new_study_id(settings: StudySettings, name: Optional[str] = None) -> str:
    digest = sha256_json([settings.to_dict(), time.time_ns()])[:6]
    return name or f"{settings.method}-{settings.grouping}-{int(round(settings.budget * 100))}pct-s{settings.seed}-{digest}"


def create_study(storage: StudyStorage, session: CompressionSession, settings: StudySettings,
                 name: Optional[str] = None) -> StudyRecord:
    """Register a new study (state RUNNING, no trials yet)."""
    if settings.method != session.method:
        raise RankScopeError(f"The session is for method {session.method}, the settings ask for {settings.method}.")
    if settings.dtype != session.loaded.dtype:
        settings = replace(settings, dtype=session.loaded.dtype)  # a study records the dtype its trials run in
    groups = study_groups(settings, session.shapes, session.method)
    if settings.warm_start is not None:
        unknown = set(settings.warm_start) - set(groups)
        if unknown:
            raise RankScopeError(f"The warm start names groups this grouping does not have: {', '.join(sorted(unknown))}; "
                                 f"groups are {', '.join(groups)}.")
    # fail early on an impossible budget
    project_study(settings, session.shapes, session.method, uniform_ratios(list(groups), settings.budget),
                  budget_target(session.shapes, settings.budget))
    study_id = new_study_id(settings, name)
    record = StudyRecord(study_id, name or study_id, session.loaded.fingerprint, settings.to_dict(), StudyState.RUNNING)
    storage.create_study(record)
    return record


def study_groups(settings: StudySettings, shapes, method: str) -> list[str]:
    """The coordinates a study searches: the grouping's groups (a curve's knots), or, when it prunes MLPs, its
    attention groups and one `mlp-prune` group per layer block (`engine.compression.grouping.pruning_groups`)."""
    grouping = settings.parsed_grouping()
    if not settings.prunes:
        return grouping.search_dims(shapes, method)
    rank_groups, prune_groups = pruning_groups(shapes, method, grouping)
    return [*rank_groups, *prune_groups]


def project_study(settings: StudySettings, shapes, method: str, values: dict, target: int,
                  grouping: Optional[Grouping] = None) -> tuple[dict, Optional[dict], dict]:
    """(ranks, kept channels or None, projected values): a study's point projected onto its budget."""
    grouping = grouping or settings.parsed_grouping()
    if grouping.kind == "curve":  # knots -> per-layer values
        values = grouping.expand(shapes, method, values)
    if settings.prunes:
        ranks, channels, projected = project_mixed_to_budget(shapes, method, grouping, values, target)
        return ranks, (channels if any(k is not None for k in channels.values()) else None), projected
    ranks, projected = project_to_budget(shapes, method, grouping, values, target)
    return ranks, None, projected


# settings that determine which validation windows are chosen (mlp and pruning only when the MLP is pruned)
_SUBSET_KEYS = ("model", "method", "grouping", "search_v", "budget", "seed", "max_ratio", "subset", "subset_size",
                "subset_candidates", "subset_probe_plans", "texts", "mlp", "pruning")


def _subset_defining(settings: StudySettings) -> dict:
    data = settings.to_dict()
    return {k: data[k] for k in _SUBSET_KEYS if k in data}


def validation_windowing(texts: TextSettings, settings: StudySettings) -> Windowing:
    """A study's candidate validation windows: `subset_candidates` windows of the evaluation text right after the
    evaluation windows, so the search never sees the windows its best plan is finally measured on."""
    evaluation = texts.evaluation_windowing
    return Windowing(evaluation.window_len, settings.subset_candidates, start_window=evaluation.n_windows or 0)


VALIDATION_WINDOWS = "validation"  # the name a study's validation windows are registered under with its evaluator


@dataclass(frozen=True)
class _Pending:
    """A trial projected onto the budget, waiting for its measurement."""

    number: int
    kind: TrialKind
    label: str
    values: dict
    projected: dict
    ranks: dict
    channels: Optional[dict]
    extra: dict
    project_s: float


@dataclass
class StudyRun:
    """Live state a front end can read while a study runs."""

    study_id: str
    total_trials: int
    done_trials: int = 0
    best_objective: Optional[float] = None


class StudyRunner:
    """Runs (or resumes) one study with a session; `stop_event` stops it between trials."""

    def __init__(self, storage: StudyStorage, session: CompressionSession, study_id: str,
                 progress: Optional[ProgressCallback] = None, on_trial: Optional[Callable[[TrialRecord], None]] = None,
                 stop_event: Optional[threading.Event] = None, evaluator: Optional[Evaluator] = None):
        record = storage.get_study(study_id)
        if record is None:
            raise RankScopeError(f"No study with id '{study_id}'.")
        if record.model_fingerprint != session.loaded.fingerprint:
            raise RankScopeError(f"Study '{study_id}' was made for another model (fingerprint {record.model_fingerprint[:12]}).")
        self.storage, self.session, self.record = storage, session, record
        self.settings = StudySettings.from_dict(record.settings)
        if self.settings.dtype != session.loaded.dtype:  # trials in two dtypes would not be comparable
            raise RankScopeError(f"Study '{study_id}' runs its trials in {self.settings.dtype}, but the model was loaded "
                                 f"in {session.loaded.dtype}; load it with --dtype {self.settings.dtype}.")
        self.grouping = self.settings.parsed_grouping()
        self.groups = study_groups(self.settings, session.shapes, session.method)
        self.pruning = self.settings.pruning  # None unless the study prunes MLPs
        self.target = budget_target(session.shapes, self.settings.budget)
        self.progress, self.on_trial = progress, on_trial
        self.stop_event = stop_event or threading.Event()
        self.evaluator = evaluator  # None: every trial measured here (`engine.compression.evaluators`)

    # -- pieces ------------------------------------------------------------------------------------------
    @property
    def validation_windowing(self) -> Windowing:
        """The study's candidate validation windows (see `validation_windowing`)."""
        return validation_windowing(self.session.texts, self.settings)

    def validation_reference(self):
        """The candidate windows `[n, L]` and the original model's distribution on them (stored on first use)."""
        texts, windowing = self.session.texts, self.validation_windowing
        windows = ensure_windows(self.session.store, self.session.loaded, texts.evaluation_text, windowing)
        _, reference = ensure_reference(self.session.store, self.session.loaded, texts.evaluation_text, windowing,
                                        progress=self.progress)
        return windows, reference

    def _validation(self):
        """Candidate windows (after the evaluation windows), their reference, and the chosen subset."""
        s, texts, windowing = self.settings, self.session.texts, self.validation_windowing
        windows, reference = self.validation_reference()
        validation = self.record.validation or self._reusable_validation()
        if validation is not None and self.record.validation is None:
            self.storage.set_validation(self.record.study_id, validation)
        if validation is None:
            rng = np.random.default_rng(s.seed + 1)
            probes = [self._project({g: float(rng.uniform(0.05, s.max_ratio)) for g in self.groups})[:2]
                      for _ in range(s.subset_probe_plans)] if s.subset == "sensitive" else []

            def per_window(probe):
                ranks, channels = probe
                return self._measure(ranks, channels, windows=windows, reference=reference).window_nll

            validation = choose_subset(s.subset, s.subset_size, s.subset_candidates, probes, per_window, s.seed,
                                       self.progress)
            validation["candidate_windows"] = {"text": texts.evaluation_text, **windowing.__dict__}
            self.storage.set_validation(self.record.study_id, validation)
        return windows, reference, validation["windows"]

    def _reusable_validation(self) -> Optional[dict]:
        """The subset an earlier study with the same subset-defining settings chose (it would choose the same)."""
        mine = _subset_defining(self.settings)
        for other in self.storage.list_studies():
            if other.study_id == self.record.study_id or other.validation is None:
                continue
            if other.model_fingerprint != self.record.model_fingerprint:
                continue
            try:
                theirs = StudySettings.from_dict(other.settings)
            except RankScopeError:  # settings this version cannot read: not comparable
                continue
            if _subset_defining(theirs) == mine:
                return {**other.validation, "reused_from": other.study_id}
        return None

    def _project(self, values: dict, grouping: Optional[Grouping] = None) -> tuple[dict, Optional[dict], dict]:
        """(ranks, kept channels or None, projected values)."""
        return project_study(self.settings, self.session.shapes, self.session.method, values, self.target, grouping)

    def _measure(self, ranks: dict, channels: Optional[dict], **options):
        """`session.evaluate_ranks`, pruning `channels` as the study says (called as before when nothing is pruned)."""
        if channels:
            return self.session.evaluate_ranks(ranks, channels=channels, pruning=self.pruning, **options)
        return self.session.evaluate_ranks(ranks, **options)

    def _prepare(self, number: int, kind: TrialKind, label: str, values: dict, grouping: Optional[Grouping] = None,
                 allocation: Optional[tuple] = None, extra: Optional[dict] = None) -> "_Pending":
        """Project `values` (group ratios of `grouping`, default the study's) onto the budget.

        `allocation` = (ranks, channels) evaluates that allocation as it is (LoRAP's baseline); `values` then are
        the group values it achieves."""
        start = time.perf_counter()
        if allocation is None:
            ranks, channels, projected = self._project(values, grouping)
        else:
            (ranks, channels), projected = allocation, dict(values)
        groups = self.groups if grouping is None else grouping.search_dims(self.session.shapes, self.session.method)
        return _Pending(number, kind, label, {g: float(values.get(g, 0.0)) for g in groups}, projected, ranks,
                        channels, dict(extra or {}), time.perf_counter() - start)

    def _finish(self, pending: "_Pending", result, evaluate_s: float) -> TrialRecord:
        """Score a measured trial and store it (persisted before anything shows it)."""
        kl = result.kl_reverse if self.settings.kl == "reverse" else result.kl_forward
        counts = count_parameters(self.session.shapes, self.session.method, pending.ranks, pending.channels)
        trial = TrialRecord(
            self.record.study_id, pending.number, pending.kind, pending.label, pending.values, pending.projected,
            pending.ranks, objective(result.perplexity, kl, self.settings.beta), result.perplexity,
            result.kl_forward, result.kl_reverse, counts.decoder_compressed, counts.total_compressed,
            pending.project_s + evaluate_s,
            extra={"project_s": pending.project_s, "evaluate_s": evaluate_s, **pending.extra},
            channels=pending.channels,
        )
        self.storage.add_trial(trial)
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial

    def _evaluate(self, number: int, kind: TrialKind, label: str, values: dict, windows, reference, subset,
                  grouping: Optional[Grouping] = None, allocation: Optional[tuple] = None,
                  extra: Optional[dict] = None) -> TrialRecord:
        """Project, measure on the validation subset here, score and store one trial."""
        pending = self._prepare(number, kind, label, values, grouping, allocation, extra)
        start = time.perf_counter()
        result = self._measure(pending.ranks, pending.channels, windows=windows, reference=reference,
                               window_indices=subset)
        return self._finish(pending, result, time.perf_counter() - start)

    def _evaluate_many(self, items: list[dict], scoring: tuple) -> list[TrialRecord]:
        """Trials (`_prepare`'s arguments each) measured on the evaluator's workers at once, or here one by one;
        stored in trial-number order either way (a result that arrives early waits for the ones before it), so
        the store always holds a prefix of the study and a resumed study knows exactly what is missing."""
        if self.evaluator is None or self.evaluator.workers == 1:
            return [self._evaluate(item["number"], item["kind"], item["label"], item["values"], *scoring,
                                   item.get("grouping"), item.get("allocation"), item.get("extra"))
                    for item in items]
        subset = scoring[2]
        pendings = {p.number: p for p in (self._prepare(**item) for item in items)}
        tasks = [EvaluationTask(n, p.ranks, p.channels, self.pruning if p.channels else None, VALIDATION_WINDOWS,
                                tuple(subset) if subset is not None else None) for n, p in pendings.items()]
        arrived, stored = {}, []
        order = sorted(pendings)
        for evaluated in self.evaluator.map_unordered(tasks):
            arrived[evaluated.task.key] = evaluated
            while order and order[0] in arrived:
                number = order.pop(0)
                stored.append(self._finish(pendings[number], arrived[number].result, arrived[number].seconds))
        return stored

    def _optimizer(self):
        from skopt import Optimizer
        from skopt.learning import GaussianProcessRegressor
        from skopt.learning.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
        from skopt.space import Real

        s = self.settings
        scales = [s.length_scale(g) for g in self.groups]
        kernel = ConstantKernel(1.0, (0.01, 1000.0)) * Matern(length_scale=scales, length_scale_bounds=(0.01, 100.0), nu=2.5) \
            + WhiteKernel(noise_level=1e-3, noise_level_bounds=(1e-8, 1.0))
        gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=2, random_state=s.seed)
        return Optimizer([Real(0.0, s.max_ratio, name=g) for g in self.groups], base_estimator=gp, acq_func="EI",
                         n_initial_points=s.n_initial_points, initial_point_generator="random", random_state=s.seed)

    # -- the study -----------------------------------------------------------------------------------
    def run(self) -> StudyRecord:
        sid = self.record.study_id
        if is_complete(self.storage, self.record):
            return self.record  # nothing to add: a finished study is not replayed
        if self.record.settings.get("version", 1) < EXACT_KL_SINCE and self.storage.trials(sid):
            raise RankScopeError(
                f"Study '{sid}' scored its trials with the top-k estimate of KL that RankScope 0.1.0 used; this version "
                "computes KL exactly, and one study must not mix the two. Its trials stay readable; start a new study "
                f"to go on (`rankscope search start --warm-start-study {sid}` carries its best plan over).")
        self.storage.set_state(sid, StudyState.RUNNING, owner=this_process())
        try:
            windows, reference, subset = self._validation()
            if self.evaluator is not None:
                self.evaluator.register_windows(VALIDATION_WINDOWS, windows, reference)
            stored = {t.number: t for t in self.storage.trials(sid)}
            done_labels = {t.label for t in stored.values() if t.kind == TrialKind.BASELINE}
            baselines = self._baselines()
            missing = [(label, spec) for label, spec in baselines.items() if label not in done_labels]
            items = [dict(number=len(stored) + i, kind=TrialKind.BASELINE, label=label, values=values,
                          grouping=grouping, allocation=allocation)
                     for i, (label, (values, grouping, allocation)) in enumerate(missing)]
            stored.update({t.number: t for t in self._evaluate_many(items, (windows, reference, subset))})
            tracker = ProgressTracker(self.progress, f"study {sid}", total=self.settings.n_trials, unit="trials")
            search = self._search_trust if self.settings.strategy == "trust" else self._search_bo
            if not search(stored, baselines, (windows, reference, subset), tracker):
                return self.storage.get_study(sid)
            self._select(windows, reference, subset)
            self._remeasure()
            self.storage.set_state(sid, StudyState.FINISHED)
        except KeyboardInterrupt:
            self.storage.set_state(sid, StudyState.STOPPED, "interrupted")
            raise
        except Exception as exc:
            self.storage.set_state(sid, StudyState.FAILED, f"{type(exc).__name__}: {exc}")
            raise
        return self.storage.get_study(sid)

    def _stopped(self, told: int) -> bool:
        if self.stop_event.is_set():
            self.storage.set_state(self.record.study_id, StudyState.STOPPED, f"stopped after {told} trials")
            return True
        return False

    def _search_bo(self, stored: dict, baselines: dict, scoring: tuple, tracker: ProgressTracker) -> bool:
        """The plain scikit-optimize loop (studies made before strategies existed); False when stopped."""
        optimizer = self._optimizer()
        told = [t for t in sorted(stored.values(), key=lambda t: t.number) if t.kind != TrialKind.BASELINE]
        number = len(stored)
        for trial in told:  # replay: the optimiser ends where an uninterrupted run would be
            if trial.kind == TrialKind.SEARCH:
                optimizer.ask()
            optimizer.tell([trial.values[g] for g in self.groups], _told(trial.objective))
            tracker.advance()
        if self.settings.warm_start is not None and not any(t.kind == TrialKind.WARM_START for t in told):
            values = {g: float(self.settings.warm_start.get(g, 0.0)) for g in self.groups}
            trial = self._evaluate(number, TrialKind.WARM_START, "warm start", values, *scoring)
            optimizer.tell([values[g] for g in self.groups], _told(trial.objective))
            told.append(trial)
            number += 1
            tracker.advance()
        while len(told) < self.settings.n_trials:
            if self._stopped(len(told)):
                return False
            point = optimizer.ask()
            values = dict(zip(self.groups, (float(v) for v in point)))
            trial = self._evaluate(number, TrialKind.SEARCH, f"trial {len(told)}", values, *scoring)
            optimizer.tell(point, _told(trial.objective))
            told.append(trial)
            number += 1
            tracker.advance()
        return True

    # -- the trust strategy ------------------------------------------------------------------------------
    def _coordinates(self, trial: TrialRecord) -> tuple[float, ...]:
        """Where a trial lies in the study's scaled coordinates: its projected (evaluated) values, fitted to the
        study's coordinates (a curve's knots), over max_ratio."""
        return self._coordinates_of(trial.projected)

    def _coordinates_of(self, projected: dict) -> tuple[float, ...]:
        if self.settings.prunes:
            values = {g: projected.get(g, 0.0) for g in self.groups}
        else:
            values = self.grouping.fit(self.session.shapes, self.session.method, projected)
        return tuple(float(values[g]) / self.settings.max_ratio for g in self.groups)

    def _dim_weights(self) -> list[float]:
        """Parameters per scaled coordinate in the linear budget model (attention and pruned MLP groups alike)."""
        shapes, method = self.session.shapes, self.session.method
        if self.settings.prunes:
            rank_groups, prune_groups = pruning_groups(shapes, method, self.grouping)
            dense = {name: float(sum(u.dense_params for u in units)) for name, units in rank_groups.items()}
            dense.update({name: float(sum(m.params(None) for m in mlps)) for name, mlps in prune_groups.items()})
        else:
            dense = self.grouping.dim_params(shapes, method)
        return [dense[g] * self.settings.max_ratio for g in self.groups]

    def _told_baselines(self, baselines: dict) -> set[str]:
        """Baselines evaluated as the projection of the study's own coordinates: told as they are."""
        return {label for label, (_, grouping, allocation) in baselines.items()
                if grouping is None and allocation is None}

    def _priors(self, baselines: dict) -> list[tuple[str, dict]]:
        """(label, coordinates' values) of the prior trials: the warm start, then each baseline the coordinates
        cannot express as it is, at its nearest point of them."""
        priors = []
        if self.settings.warm_start is not None:
            priors.append(("warm start", {g: float(self.settings.warm_start.get(g, 0.0)) for g in self.groups}))
        told = self._told_baselines(baselines)
        for label, (values, grouping, allocation) in baselines.items():
            if label in told or label == "uniform":
                continue
            if allocation is not None:
                ranks, channels = allocation
                mlp = "prune" if self.settings.prunes else "low-rank"
                values = trial_values(self.session.shapes, self.session.method, self.grouping, ranks, channels, mlp)
            priors.append((f"{label} (prior)", {g: float(values.get(g, 0.0)) for g in self.groups}))
        return priors

    def _search_trust(self, stored: dict, baselines: dict, scoring: tuple, tracker: ProgressTracker) -> bool:
        """Priors, a random phase, then GP expected improvement local and global in turn, `batch` trials at a time
        (constant liar: each later point of a batch is chosen as if the earlier ones had scored the best objective so
        far); False when stopped.

        A batch's points depend only on the trials before it, so a study killed within a batch proposes the same
        batch again on resume and measures only what is missing (the store holds a prefix of the study)."""
        s = self.settings
        told_baselines = self._told_baselines(baselines)
        trials = sorted(stored.values(), key=lambda t: t.number)
        known = [proposals.Told(self._coordinates(t), _told(t.objective), "prior") for t in trials
                 if t.kind == TrialKind.BASELINE and t.label in told_baselines]
        told = [t for t in trials if t.kind != TrialKind.BASELINE]
        history = known + [proposals.Told(self._coordinates(t), _told(t.objective), t.extra.get("proposal", "prior"))
                           for t in told]
        tracker.advance(len(told))
        priors = self._priors(baselines)[:s.n_trials]
        done_priors = {t.label for t in told if t.kind in (TrialKind.PRIOR, TrialKind.WARM_START)}
        todo = [(label, values) for label, values in priors if label not in done_priors]
        if todo:
            if self._stopped(len(told)):
                return False
            items = [dict(number=len(stored) + i, kind=TrialKind.WARM_START if label == "warm start" else
                          TrialKind.PRIOR, label=label, values=values, extra={"proposal": "prior"})
                     for i, (label, values) in enumerate(todo)]
            for trial in self._evaluate_many(items, scoring):
                stored[trial.number] = trial
                told.append(trial)
                history.append(proposals.Told(self._coordinates(trial), _told(trial.objective), "prior"))
                tracker.advance()
        weights, scales = self._dim_weights(), [s.length_scale(g) for g in self.groups]
        upper = MAX_RATIO / s.max_ratio
        first_search = len(priors)
        while len(told) < s.n_trials:
            if self._stopped(len(told)):
                return False
            batch_start = first_search + (len(told) - first_search) // s.batch * s.batch
            batch_end = min(batch_start + s.batch, s.n_trials)
            before = known + history[len(known):len(known) + batch_start]  # the trials before this batch
            proposed = self._propose_batch(before, batch_start, batch_end, weights, scales, upper)
            items = [dict(number=len(stored) + i, kind=TrialKind.SEARCH, label=f"trial {index}", values=values,
                          extra={"proposal": kind})
                     for i, (index, values, kind) in enumerate(p for p in proposed if p[0] >= len(told))]
            for trial in self._evaluate_many(items, scoring):
                stored[trial.number] = trial
                told.append(trial)
                history.append(proposals.Told(self._coordinates(trial), _told(trial.objective),
                                              trial.extra["proposal"]))
                tracker.advance()
        return True

    def _propose_batch(self, before: list, start: int, end: int, weights, scales, upper) -> list[tuple[int, dict, str]]:
        """(told index, values, proposal kind) of the batch of told indices [start, end), from the history before it."""
        s, lies, out = self.settings, list(before), []
        for index in range(start, end):
            kind = proposals.phase_of(lies, s.n_initial_points)
            if kind != proposals.RANDOM and not lies:
                kind = proposals.RANDOM
            point = proposals.propose(lies, kind, weights, scales, s.seed, index,
                                      upper=1.0 if kind == proposals.RANDOM else upper)
            values = {g: float(min(MAX_RATIO, v * s.max_ratio)) for g, v in zip(self.groups, point)}
            out.append((index, values, kind))
            if index + 1 < end:  # the constant liar: as if it had scored the best objective so far
                projected = self._project(values)[2]
                lie = min((t.objective for t in lies), default=NON_FINITE_OBJECTIVE)
                lies.append(proposals.Told(self._coordinates_of(projected), lie, kind))
        return out

    def _baselines(self) -> dict[str, tuple[dict, Optional[Grouping], Optional[tuple]]]:
        """label -> (values, grouping or None for the study's, allocation or None to project the values).

        Baselines run first, in the same study and on the same windows. Without pruning: uniform (every decoder
        linear, v included, whatever the study's grouping, as `compress --uniform`), LoRD and, once a sweep is
        stored, greedy and (the `trust` strategy) the global allocation (`baselines.global_allocation`, from the
        sweep and the energies of the factors). A study that prunes MLPs has uniform on its own groups (projected) and LoRAP's allocation
        at its budget (q+k:v+o = 1:3, MLPs pruned); LoRD and greedy allocate ranks only and are skipped
        (`engine.search.baselines.skipped_baselines`)."""
        shapes, method, budget = self.session.shapes, self.session.method, self.settings.budget
        if self.settings.prunes:
            ranks, channels = lorap_allocation(shapes, budget)
            lorap_values = achieved_values(shapes, method, self.grouping, ranks, channels)
            return {"uniform": (uniform_ratios(self.groups, budget), None, None),
                    "lorap": (lorap_values, None, (ranks, channels))}
        uniform = Grouping("5x1", search_v=True)
        baselines = {"uniform": (uniform_ratios(list(uniform.groups(shapes, method)), budget), uniform, None),
                     "lord": (lord_ratios(self.groups, budget), None, None)}
        points = self.session.store.sensitivity_points(sweep_id(self.session))
        greedy = greedy_ratios(shapes, method, self.grouping, budget, points, self.session.reference.perplexity)
        if greedy is not None:
            baselines["greedy"] = (self.grouping.fit(shapes, method, greedy), None, None)  # a curve's knots
        if self.settings.strategy == "trust":  # `bo` studies keep the baselines they were made with
            ranks = global_allocation(shapes, method, budget, points, self.session.reference.perplexity,
                                      factor_energies(self.session.factorization))
            if ranks is not None:
                values = trial_values(shapes, method, self.grouping, ranks, None)
                baselines["global"] = (values, None, (ranks, None))
        return baselines

    def _select(self, windows, reference, subset) -> None:
        """The final selection: the best `select_top` distinct trials by validation objective and the study's informed
        baselines (`SELECTABLE_BASELINES`: the global allocation's exact plan, LoRAP's, greedy's, LoRD's), each
        measured on every candidate window (the subset's and the rest), stored as the study's `selection` result;
        `best_trial` is then the best of them, so the study's choice is never a plan that one of its own priors beats
        on the candidate windows. Nothing to do with `select_top` 1, when the subset is every candidate, or once
        stored."""
        sid, k = self.record.study_id, self.settings.select_top
        if k <= 1 or len(subset) >= len(windows) or SELECTION in self.storage.results(sid):
            return
        trials = sorted(self.storage.trials(sid), key=lambda t: (t.objective, t.number))
        searched = [t for t in trials if t.kind != TrialKind.BASELINE]
        informed = [t for t in trials if t.kind == TrialKind.BASELINE and t.label in SELECTABLE_BASELINES]
        finalists, seen = [], set()
        for trial in searched + informed:  # the same plan twice is measured once
            key = sha256_json([trial.ranks, trial.channels or None])
            if key not in seen and (trial.kind == TrialKind.BASELINE or len(finalists) < k):
                seen.add(key)
                finalists.append(trial)
        tracker = ProgressTracker(self.progress, f"final selection on {len(windows)} windows", total=len(finalists),
                                  unit="plans")
        candidates = []
        for trial in finalists:
            result = self._measure(trial.ranks, trial.channels, windows=windows, reference=reference)
            kl = result.kl_reverse if self.settings.kl == "reverse" else result.kl_forward
            candidates.append({"number": trial.number, "validation_objective": trial.objective,
                               "objective": objective(result.perplexity, kl, self.settings.beta),
                               "perplexity": result.perplexity, "kl_forward": result.kl_forward,
                               "kl_reverse": result.kl_reverse})
            tracker.advance()
        self.storage.put_result(sid, SELECTION, {"windows": len(windows), "candidates": candidates})

    def _remeasure(self) -> None:
        """The study's choice (`best_trial`) and the baselines on the full evaluation windows, which the search never
        saw. The choice may be a baseline: a trial measured under one label is not measured again for another."""
        trials = self.storage.trials(self.record.study_id)
        done = self.storage.results(self.record.study_id)
        metrics = ("perplexity", "kl_forward", "kl_reverse", "tokens")
        measured = {result["trial"]: {k: result[k] for k in metrics if k in result}  # trial number -> full-text metrics
                    for label, result in done.items() if label != SELECTION and "trial" in result}
        best = best_trial(self.storage, self.record.study_id)
        chosen = [("best", best)] + [(t.label, t) for t in trials if t.kind == TrialKind.BASELINE]
        for label, trial in chosen:
            if label in done and done[label].get("trial") == trial.number:
                continue
            known = measured.get(trial.number) or self._measured_elsewhere(trial)
            if known is None:
                result = self._measure(trial.ranks, trial.channels)
                known = {"perplexity": result.perplexity, "kl_forward": result.kl_forward,
                         "kl_reverse": result.kl_reverse, "tokens": result.n_tokens}
            measured[trial.number] = known
            self.storage.put_result(self.record.study_id, label, {
                "trial": trial.number, **known, "decoder_params": trial.decoder_params,
                "total_params": trial.total_params,
            })

    def _measured_elsewhere(self, trial: TrialRecord) -> Optional[dict]:
        """The full-window measurement of the same plan (ranks and kept channels) by another study of this model,
        method, texts and pruning settings, or None: the same plan on the same windows measures the same."""
        s = self.settings
        for other in self.storage.list_studies():
            if other.study_id == self.record.study_id or other.model_fingerprint != self.record.model_fingerprint:
                continue
            try:
                theirs = StudySettings.from_dict(other.settings)
            except RankScopeError:
                continue
            if (theirs.method, theirs.texts, theirs.pruning) != (s.method, s.texts, s.pruning):
                continue
            results = self.storage.results(other.study_id)
            if not results:
                continue
            numbers = {t.number: t for t in self.storage.trials(other.study_id)}
            for result in results.values():
                twin = numbers.get(result.get("trial"))
                if twin is not None and twin.ranks == trial.ranks and (twin.channels or None) == (trial.channels or None):
                    return {k: result[k] for k in ("perplexity", "kl_forward", "kl_reverse", "tokens")}
        return None

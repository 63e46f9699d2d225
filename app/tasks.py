"""The app's long actions as background jobs: calibration, spectra, sweeps, plan evaluation, search
studies, a study's best plan, recovery runs, exports and side-by-side generation.

Each `start_*` function composes engine calls into one job on the process-wide `JobBoard` and
returns it; the engine writes every result to the store before the job ends, and pages read the
store. Every use of the model holds its `ModelGuard`. Job ids are plain strings
`<model>/<kind>/<scope>/<request>` built from the settings, so the same request from two tabs
joins one job, and a page finds the jobs of its scope with `JobBoard.with_prefix`.

The Allocate page's live quality also lives here: the quick measurement of an allocation on the first
evaluation windows (a job like the others, one id per allocation, so a finished one is found again), and
`stored_estimator`, which gathers what the store knows for the instant estimate (no job: it only reads).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from app.jobs import Job, JobStopped
from app.resources import current_database, current_store, get_job_board, get_model_guard, get_session_pool, model_shapes
from app.sessions import SessionKey, SharedModelSession
from app.workspace import Workspace
from engine.compression.plan import RankPlan
from engine.compression.plan_settings import PlanSettings, plan_settings
from engine.texts.settings import TextSettings
from engine.compression.sweep import sweep_by_layer, sweep_by_type
from engine.progress import ProgressEvent
from engine.recovery.settings import RecoverySettings
from engine.recovery.training import (
    RecoveryInterrupted, RecoveryOutcome, StepReport, checkpoint_state, recover, run_key,
)
from engine.errors import RankScopeError
from engine.export import check_export_target, export_compressed, generate_side_by_side, load_compressed
from engine.export.report import SideBySide
from engine.cache.keys import digest
from engine.models.loading import LoadedModel
from engine.search.runner import StudyRunner, create_study
from engine.search.settings import StudySettings
from engine.search.summary import trial_plan
from engine.search.duckdb_storage import DuckDBStudyStorage
from engine.cache.calibration import ensure_calibration
from engine.cache.spectra import SpectraPreview, ensure_all_spectra
from engine.analysis.quality_estimate import (
    NO_SWEEP, NoEstimate, QualityEstimator, allocation_key, plan_evaluation, study_evaluations,
)
from engine.cache.keys import calibration_key, factorization_key, reference_key, sweep_key
from engine.cache.lookups import find_baseline_evaluation
from engine.compression.pruning import PruningSettings
from engine.compression.units import ModelShapes
from engine.compression.sweep import mlp_sweep_id_for
from engine.methods import get_method
from engine.records import FactorizationRecord, ReferenceRecord
from engine.store.duckdb_store import Store
from engine.texts.corpus import text_fingerprint


def model_scope(loaded: LoadedModel) -> str:
    """The id prefix of every job on this model."""
    return f"{loaded.fingerprint[:16]}/"


def calibration_scope(workspace: Workspace, loaded: LoadedModel) -> str:
    return f"{model_scope(loaded)}calibration/{digest(workspace.calibration_text, workspace.calibration_windowing, workspace.n_groups)}/"


def spectra_scope(workspace: Workspace, loaded: LoadedModel, covariance: str) -> str:
    return (f"{model_scope(loaded)}spectra/"
            f"{digest(workspace.calibration_text, workspace.calibration_windowing, workspace.n_groups, covariance)}/")


def session_scope(kind: str, workspace: Workspace, loaded: LoadedModel, method: str) -> str:
    return f"{model_scope(loaded)}{kind}/{digest(method, workspace.text_settings())}/"


def _texts_session_opener(loaded: LoadedModel, method: str, texts: TextSettings) -> Callable[[Job], SharedModelSession]:
    """A function for the worker thread that opens (or reuses) the session; app resources are looked up here,
    on the script thread, so the worker never touches Streamlit."""
    pool, store, guard = get_session_pool(), current_store(), get_model_guard(loaded.fingerprint)
    key = SessionKey(current_database(), loaded.fingerprint, method, texts, loaded.device, loaded.dtype)
    return lambda job: pool.open(key, store, loaded, guard, job.report)


def _session_opener(workspace: Workspace, loaded: LoadedModel, method: str) -> Callable[[Job], SharedModelSession]:
    return _texts_session_opener(loaded, method, workspace.text_settings())


def start_calibration(workspace: Workspace, loaded: LoadedModel) -> Job:
    """Calibration statistics for the workspace's calibration text (stored; nothing returned)."""
    store, guard = current_store(), get_model_guard(loaded.fingerprint)

    def work(job: Job) -> None:
        with guard.hold(f"calibrating on '{workspace.calibration_text}'"):
            ensure_calibration(store, loaded, workspace.calibration_text, workspace.calibration_windowing,
                               workspace.n_groups, job.report)

    return get_job_board().start(calibration_scope(workspace, loaded) + "run",
                                 f"Calibration on '{workspace.calibration_text}'", work)


# job id -> the latest spectra preview of a running spectra job (weights at once, then each calibration snapshot's
# feature spectra); a job keeps only its latest progress event, and these exist nowhere else: they are never stored
_SPECTRA_PREVIEWS: dict[str, SpectraPreview] = {}


def spectra_preview(job_id: str) -> Optional[SpectraPreview]:
    """The latest preview of the spectra job `job_id` while it calibrates, or None (none yet, or the job ended)."""
    return _SPECTRA_PREVIEWS.get(job_id)


def start_spectra(workspace: Workspace, loaded: LoadedModel, covariance: str) -> Job:
    """Calibration (if not cached), the weight and feature spectra of every decoder linear, and the
    activation-weighted spectra of LoRAP's Table 1 (so one click fills the whole page). While the calibration
    runs, `spectra_preview(job.job_id)` has the latest snapshot's spectra (`engine.cache.spectra.SpectraPreview`)."""
    store, guard = current_store(), get_model_guard(loaded.fingerprint)
    job_id = spectra_scope(workspace, loaded, covariance) + "run"

    def publish(job: Job, preview: SpectraPreview) -> None:
        if job.stop_requested:  # a snapshot's spectra take a while: stop between them too
            raise JobStopped(job.label)
        _SPECTRA_PREVIEWS[job_id] = preview

    def work(job: Job) -> None:
        try:
            with guard.hold("computing spectra"):
                ensure_all_spectra(store, loaded, workspace.calibration_text, workspace.calibration_windowing,
                                   workspace.n_groups, covariance, job.report, lambda preview: publish(job, preview))
        finally:
            _SPECTRA_PREVIEWS.pop(job_id, None)

    return get_job_board().start(job_id, "Spectra", work)


def start_type_sweep(workspace: Workspace, loaded: LoadedModel, method: str, ratios: Sequence[float],
                     types: Sequence[str]) -> Job:
    """Each type compressed alone in every layer at each ratio; resumes from the stored points."""

    open_session = _session_opener(workspace, loaded, method)

    def work(job: Job) -> int:
        session = open_session(job)
        return len(sweep_by_type(session, list(ratios), list(types), job.report))

    scope = session_scope("sweep", workspace, loaded, method)
    return get_job_board().start(scope + f"type-{digest(sorted(ratios), list(types))}",
                                 f"Per-type sweep ({method})", work, resumable=True)


def start_layer_sweep(workspace: Workspace, loaded: LoadedModel, method: str, types: Sequence[str],
                      ratio: float) -> Job:
    """For each type, each layer alone compressed at `ratio`; resumes from the stored points."""

    open_session = _session_opener(workspace, loaded, method)

    def work(job: Job) -> int:
        session = open_session(job)
        return sum(len(sweep_by_layer(session, linear_type, ratio, progress=job.report)) for linear_type in types)

    scope = session_scope("sweep", workspace, loaded, method)
    return get_job_board().start(scope + f"layer-{digest(list(types), ratio)}", f"Per-layer sweep ({method})", work,
                                 resumable=True)


# -- LoRAP views: activation-weighted spectra (Spectra page), MLP pruning sweeps (Sensitivity page) -------------


def weighted_spectra_scope(workspace: Workspace, loaded: LoadedModel) -> str:
    return (f"{model_scope(loaded)}weighted-spectra/"
            f"{digest(workspace.calibration_text, workspace.calibration_windowing, workspace.n_groups)}/")


def start_weighted_spectra(workspace: Workspace, loaded: LoadedModel) -> Job:
    """Calibration (if not cached) and the activation-weighted spectra `σ²` of `W·diag(‖X‖₂)` (LoRAP's Table 1)."""
    from engine.cache.spectra import ensure_activation_weighted_spectra

    store, guard = current_store(), get_model_guard(loaded.fingerprint)

    def work(job: Job) -> None:
        with guard.hold("computing activation-weighted spectra"):
            calibration = ensure_calibration(store, loaded, workspace.calibration_text,
                                             workspace.calibration_windowing, workspace.n_groups, job.report)
            ensure_activation_weighted_spectra(store, loaded, calibration, job.report)

    return get_job_board().start(weighted_spectra_scope(workspace, loaded) + "run", "Activation-weighted spectra", work)


def _mlp_sweep_work(workspace: Workspace, loaded: LoadedModel, method: str, sweep: Callable) -> Callable[[Job], int]:
    """A job running `sweep(session, progress)`; channels are scored first under the model guard (that may
    calibrate, and it reads the dense weights), then every point evaluates under it as other sweeps do."""
    from engine.compression.pruning import PruningSettings

    open_session, guard = _session_opener(workspace, loaded, method), get_model_guard(loaded.fingerprint)

    def work(job: Job) -> int:
        session = open_session(job)
        with guard.hold("scoring MLP channels for pruning"):
            session.channel_order(PruningSettings().aggregation, job.report)
        return len(sweep(session, job.report))

    return work


def start_mlp_type_sweep(workspace: Workspace, loaded: LoadedModel, method: str, ratios: Sequence[float],
                         forms: Sequence[str]) -> Job:
    """Every layer's MLP pruned by channels (LoRAP) and factorised at the same parameter count, at each ratio;
    resumes from the stored points."""
    from engine.compression.sweep import sweep_mlp_by_type

    work = _mlp_sweep_work(workspace, loaded, method,
                           lambda session, progress: sweep_mlp_by_type(session, list(ratios), list(forms),
                                                                       progress=progress))
    scope = session_scope("sweep", workspace, loaded, method)
    return get_job_board().start(scope + f"mlp-type-{digest(sorted(ratios), list(forms))}",
                                 f"MLP sweep, pruning against low rank ({method})", work, resumable=True)


def start_mlp_layer_sweep(workspace: Workspace, loaded: LoadedModel, method: str, ratio: float) -> Job:
    """Each layer's MLP alone pruned by channels at `ratio`; resumes from the stored points."""
    from engine.compression.sweep import sweep_mlp_by_layer

    work = _mlp_sweep_work(workspace, loaded, method,
                           lambda session, progress: sweep_mlp_by_layer(session, ratio, progress=progress))
    scope = session_scope("sweep", workspace, loaded, method)
    return get_job_board().start(scope + f"mlp-layer-{digest(ratio)}", f"Per-layer MLP pruning sweep ({method})", work,
                                 resumable=True)


@dataclass(frozen=True)
class AppliedPlan:
    """An evaluated plan and the original model's quality on the same evaluation set."""

    plan: RankPlan
    original: dict


def start_apply(workspace: Workspace, loaded: LoadedModel, method: str, ranks: Mapping[str, Optional[int]],
                grouping: Optional[dict], channels: Optional[Mapping[str, Optional[int]]] = None,
                pruning: Optional[dict] = None) -> Job:
    """Evaluate a plan (perplexity and both KLs) against the original model: its ranks and, for a mixed plan
    (`rankscope.plan/v2`), the kept channels of its pruned MLPs, chosen as `pruning` says."""

    open_session = _session_opener(workspace, loaded, method)
    pruned = {path: kept for path, kept in (channels or {}).items() if kept is not None}

    def work(job: Job) -> AppliedPlan:
        session = open_session(job)
        plan = session.plan(ranks, grouping=grouping, channels=pruned or None, pruning=pruning if pruned else None)
        return AppliedPlan(session.evaluate(plan, job.report), session.original_quality())

    scope = session_scope("apply", workspace, loaded, method)
    request = digest(sorted(ranks.items(), key=str), grouping)
    if pruned:  # a rank-only plan keeps the id it always had
        request = digest(request, sorted(pruned.items()), pruning)
    return get_job_board().start(scope + request, f"Evaluating the plan ({method})", work)


# -- search studies ------------------------------------------------------------------------------------------


def study_job_id(loaded: LoadedModel, study_id: str) -> str:
    return f"{model_scope(loaded)}study/{study_id}"


def study_plan_job_id(loaded: LoadedModel, study_id: str) -> str:
    return f"{model_scope(loaded)}study-plan/{study_id}"


def start_study(loaded: LoadedModel, settings: StudySettings, study_id: str, create: bool) -> Job:
    """Run a search study (`create`: register it first) or resume a stored one, trial by trial into the store.

    Stop is cooperative: the study stops before its next trial and is stored as stopped, resumable.
    """
    open_session = _texts_session_opener(loaded, settings.method, settings.texts)
    storage, guard = DuckDBStudyStorage(current_store()), get_model_guard(loaded.fingerprint)

    def work(job: Job) -> str:
        session = open_session(job)
        if create:
            create_study(storage, session, settings, name=study_id)
        runner = StudyRunner(storage, session, study_id, progress=job.observe, stop_event=job.stop_event)
        # the runner's first step runs the original model outside the evaluation guard: do it here, guarded, and
        # the runner finds it in the store, so no other job can have compressed the model meanwhile
        with guard.hold(f"preparing the validation windows of study {study_id}"):
            runner.validation_reference()
        return runner.run().state.value

    return get_job_board().start(study_job_id(loaded, study_id), f"Study {study_id}", work, resumable=True)


def start_study_plan(loaded: LoadedModel, study_id: str) -> Job:
    """The best trial of a study as a rank plan, with its metrics on the full evaluation text.

    The study's re-measurement is used when it has one for that trial; otherwise (a study still
    running or stopped early) the plan is evaluated now, as `rankscope search export-plan` does.
    """
    storage = DuckDBStudyStorage(current_store())
    record = storage.get_study(study_id)
    if record is None:
        raise RankScopeError(f"No study with id '{study_id}'.")
    settings = StudySettings.from_dict(record.settings)
    open_session = _texts_session_opener(loaded, settings.method, settings.texts)

    def work(job: Job) -> RankPlan:
        return trial_plan(storage, study_id, lambda _settings: open_session(job), progress=job.report)[1]

    return get_job_board().start(study_plan_job_id(loaded, study_id), f"Best plan of {study_id}", work)


# -- export ----------------------------------------------------------------------------------------------------


def export_plan_settings(workspace: Workspace, plan: RankPlan) -> PlanSettings:
    """What the Export page runs a plan with: the plan's own method and calibration (the factors it was measured
    with; refused with a `PlanError` if its calibration text moved or changed) and the sidebar's evaluation set
    (what the export report measures on; a note says when it is not the plan's). The CLI's `export` uses the
    same engine function (`plan_settings`)."""
    texts = workspace.text_settings()
    return plan_settings(plan, base=texts, evaluation=texts.evaluation_dict())


def export_job_prefix(loaded: LoadedModel) -> str:
    return f"{model_scope(loaded)}export/"


def start_export(loaded: LoadedModel, plan: RankPlan, texts: TextSettings, out_dir: Path, dense: bool, prompt: str,
                 new_tokens: int, timing_runs: int, overwrite: bool = False, evaluate_reload: bool = False) -> Job:
    """Export the plan's compressed model to `out_dir`, verified by reloading (`engine.export`); stored in the
    store's exports. Returns the directory. `overwrite`: replace an earlier export there (never other files)."""
    open_session = _texts_session_opener(loaded, plan.method, texts)
    guard = get_model_guard(loaded.fingerprint)

    def work(job: Job) -> str:
        check_export_target(out_dir, overwrite)  # a refused directory fails at once, before the session opens
        session = open_session(job)
        with guard.hold(f"exporting to {out_dir}"):
            report = export_compressed(session, plan, out_dir, dense=dense, overwrite=overwrite, prompt=prompt,
                                       progress=job.report, max_new_tokens=new_tokens, timing_runs=timing_runs,
                                       evaluate_reload=evaluate_reload)
        return report.out_dir

    return get_job_board().start(export_job_prefix(loaded) + digest(str(out_dir)), f"Export to {out_dir}", work)


def generation_job_id(loaded: LoadedModel, directory: str) -> str:
    return f"{model_scope(loaded)}generate/{digest(directory)}"


def start_generation(loaded: LoadedModel, directory: str, prompt: str, new_tokens: int) -> Job:
    """Greedy continuations of `prompt` by the original model and by the export in `directory`, reloaded."""
    guard = get_model_guard(loaded.fingerprint)

    def work(job: Job) -> SideBySide:
        compressed, _, _ = load_compressed(directory)
        with guard.hold("generating with the original model"):
            return generate_side_by_side(loaded.model, compressed, loaded.tokenizer, prompt, new_tokens)

    return get_job_board().start(generation_job_id(loaded, directory), "Side-by-side generation", work)


# -- recovery ----------------------------------------------------------------------------------------------------

# job id -> the steps its run has reported so far (dicts shaped like a finished run's `history`), for the live chart;
# a job keeps only its latest progress event, and the steps of a running recovery exist nowhere else until it ends
_RECOVERY_STEPS: dict[str, list[dict]] = {}


def recovery_job_prefix(loaded: LoadedModel) -> str:
    return f"{model_scope(loaded)}recovery/"


def recovery_run_id(loaded: LoadedModel, plan: RankPlan, settings: RecoverySettings) -> str:
    """The engine's key of the run `recover` would do for this plan and these settings (its checkpoint and stored
    result are found by it). Raises `PlanError` for a plan of another model."""
    return run_key(model_shapes(loaded), plan, settings, loaded.dtype)[2]


def recovery_job_id(loaded: LoadedModel, run_id: str) -> str:
    return recovery_job_prefix(loaded) + run_id


def recovery_steps(job_id: str) -> list[dict]:
    """The steps the job's run has reported so far (a copy), oldest first; empty before the first step."""
    return list(_RECOVERY_STEPS.get(job_id, ()))


def start_recovery(loaded: LoadedModel, plan: RankPlan, settings: RecoverySettings, label: str) -> Job:
    """Train a recovery of `plan` (`engine.recovery.training.recover`): stored, resumable; returns its
    `RecoveryOutcome`. A run that finished before comes back from the store at once.

    The model guard is held for the whole run: the shared model is compressed and trained in place. Stop is
    cooperative: before the first step it ends the job at the next progress report (nothing to keep); from then on
    the run checkpoints after its current step and the job ends as stopped, and starting it again resumes there.
    The run uses the app's session for the plan's method and texts, so its factors are not loaded twice.
    """
    store, guard = current_store(), get_model_guard(loaded.fingerprint)
    run_id = recovery_run_id(loaded, plan, settings)
    job_id = recovery_job_id(loaded, run_id)
    open_session = _texts_session_opener(loaded, plan.method, plan_settings(plan).texts)
    trained = threading.Event()  # set at this job's first step

    def on_step(report: StepReport) -> None:
        trained.set()
        _RECOVERY_STEPS[job_id].append({"step": report.step, "loss": report.loss, "seconds": report.seconds,
                                        "validation_perplexity": report.validation_perplexity,
                                        "ranks_total": report.ranks_total})

    def work(job: Job) -> RecoveryOutcome:
        # a resumed run reports only the steps after its checkpoint: the checkpoint holds the curve before them
        _RECOVERY_STEPS[job_id] = list((checkpoint_state(store, run_id) or {}).get("history", ()))

        def progress(event: ProgressEvent) -> None:
            # before the first step nothing is lost by ending at once; after it, the run stops through should_stop
            (job.observe if trained.is_set() else job.report)(event)

        session = open_session(job)
        with guard.hold(f"training a {settings.kind} recovery"):
            try:
                return recover(store, loaded, plan, settings, progress=progress, on_step=on_step,
                               should_stop=lambda: job.stop_requested, session=session)
            except RecoveryInterrupted as exc:
                raise JobStopped(label) from exc

    return get_job_board().start(job_id, label, work, resumable=True)


# -- the Allocate page's live estimate and quick measurement -------------------------------------------------

# The first evaluation windows a quick measurement runs on; bench/bench_live_estimate.py times it against a full
# evaluation on the default model.
QUICK_WINDOWS = 2

# (database, model, texts, window indices) -> the original model's perplexity on those windows, measured once
_QUICK_ORIGINAL: dict[tuple, float] = {}


@dataclass(frozen=True)
class QuickMeasurement:
    """An allocation measured on the first few evaluation windows, with the original model on the same windows."""

    perplexity: float
    kl_forward: float
    kl_reverse: float
    tokens: int
    windows: int  # windows measured
    of_windows: int  # evaluation windows in all
    original_perplexity: float
    seconds: float  # the allocation's own evaluation


def quick_window_indices(workspace: Workspace) -> list[int]:
    """The evaluation windows a quick measurement uses: the first `QUICK_WINDOWS` (all of them when fewer)."""
    return list(range(min(QUICK_WINDOWS, workspace.evaluation_windows)))


def _pruned(channels: Optional[Mapping[str, Optional[int]]]) -> dict:
    return {path: kept for path, kept in (channels or {}).items() if kept is not None}


def quick_scope(workspace: Workspace, loaded: LoadedModel, method: str) -> str:
    return session_scope("quick", workspace, loaded, method)


def quick_job_id(workspace: Workspace, loaded: LoadedModel, method: str, ranks: Mapping[str, Optional[int]],
                 channels: Optional[Mapping[str, Optional[int]]] = None, pruning: Optional[dict] = None) -> str:
    """One id per allocation (and pruning settings), so a finished measurement is found again by its allocation."""
    pruned = _pruned(channels)
    request = allocation_key(ranks, pruned)
    if pruned:
        request = digest(request, pruning)
    return quick_scope(workspace, loaded, method) + request


def session_ready(workspace: Workspace, loaded: LoadedModel, method: str) -> bool:
    """Whether opening this method's session only reads the store (or it is open already): its factors and the
    original model's reference on the evaluation windows are stored. A quick measurement starts by itself only
    then; preparing a method can take minutes, and that waits for a click (Apply)."""
    texts = workspace.text_settings()
    if get_session_pool().peek(SessionKey(current_database(), loaded.fingerprint, method, texts, loaded.device,
                                          loaded.dtype)) is not None:
        return True
    store = current_store()
    calibration_id = calibration_key(loaded.fingerprint, text_fingerprint(texts.calibration_text),
                                     texts.calibration_windowing, texts.n_groups, loaded.dtype) \
        if get_method(method).needs else ""
    reference_id = reference_key(loaded.fingerprint, text_fingerprint(texts.evaluation_text),
                                 texts.evaluation_windowing, loaded.dtype)
    return (store.get_record(FactorizationRecord, factorization_key(loaded.fingerprint, method, calibration_id,
                                                                    loaded.dtype))
            is not None and store.get_record(ReferenceRecord, reference_id) is not None)


def start_quick_measurement(workspace: Workspace, loaded: LoadedModel, method: str,
                            ranks: Mapping[str, Optional[int]], channels: Optional[Mapping[str, Optional[int]]] = None,
                            pruning: Optional[dict] = None) -> Job:
    """Measure an allocation on the first `QUICK_WINDOWS` evaluation windows (`session.evaluate_ranks` with
    `window_indices`), with the original model's perplexity on the same windows (once per model and texts). Returns a
    `QuickMeasurement`. Stop it when a newer allocation supersedes it: it ends at its next window (before its
    first one if it is still waiting for the model)."""
    open_session = _session_opener(workspace, loaded, method)
    pruned = _pruned(channels)
    indices = quick_window_indices(workspace)
    original_key = (current_database(), loaded.fingerprint, workspace.text_settings(), tuple(indices))

    def work(job: Job) -> QuickMeasurement:
        session = open_session(job)
        if job.stop_requested:  # superseded while the session opened
            raise JobStopped(job.label)
        options = {"channels": pruned, "pruning": pruning} if pruned else {}
        start = time.perf_counter()
        result = session.evaluate_ranks(ranks, job.report, indices, **options)
        seconds = time.perf_counter() - start
        original = _QUICK_ORIGINAL.get(original_key)
        if original is None:
            original = _QUICK_ORIGINAL[original_key] = _original_perplexity(session, job, indices)
        return QuickMeasurement(result.perplexity, result.kl_forward, result.kl_reverse, result.n_tokens,
                                len(indices), workspace.evaluation_windows, original, seconds)

    job_id = quick_job_id(workspace, loaded, method, ranks, channels, pruning)
    return get_job_board().start(job_id, f"Quick measurement on {len(indices)} windows ({method})", work)


def _original_perplexity(session: SharedModelSession, job: Job, indices: list[int]) -> float:
    """The original model's perplexity on the quick windows: from its stored evaluation on the evaluation windows
    (each window's mean NLL; every window predicts the same number of tokens) when the Model page measured it,
    else measured here once."""
    texts = session.texts
    stored = find_baseline_evaluation(session.store, session.loaded.fingerprint, texts.evaluation_text,
                                      texts.evaluation_windowing, session.loaded.dtype)
    if stored is not None and len(stored.window_nll) > max(indices):
        return math.exp(sum(stored.window_nll[i] for i in indices) / len(indices))
    return session.evaluate_ranks({}, job.report, indices).perplexity


def live_estimator(workspace: Workspace, loaded: LoadedModel, method: str, pruning: Optional[dict],
                   plans: Sequence[tuple[str, dict]] = ()) -> QualityEstimator | NoEstimate:
    """The Allocate page's instant estimator for the workspace's model and texts (`stored_estimator` on the app's
    store)."""
    return stored_estimator(current_store(), model_shapes(loaded), method, workspace.text_settings(), pruning, plans,
                            loaded.dtype)


def stored_estimator(store: Store, shapes: ModelShapes, method: str, texts: TextSettings, pruning: Optional[dict],
                     plans: Sequence[tuple[str, dict]] = (), dtype: str = "float32") -> QualityEstimator | NoEstimate:
    """The instant estimator for this model, method and texts (`engine.analysis.quality_estimate`), from `store`:
    the per-type (and per-layer) sweep, the MLP sweep for `pruning` (LoRAP's l2 and 1% when None), every finished
    study of the same model, method and texts, and the measured `plans` (label, plan dict) that match them.
    Returns a `QualityEstimator`, or a `NoEstimate` saying what to run. No Streamlit: bench/bench_live_estimate.py
    times this very function."""
    fingerprint = shapes.fingerprint
    settings = PruningSettings.from_dict(pruning)
    needs = get_method(method).needs
    calibration = {"text_fingerprint": text_fingerprint(texts.calibration_text), **texts.calibration_dict()}
    calibration_id = calibration_key(fingerprint, calibration["text_fingerprint"], texts.calibration_windowing,
                                     texts.n_groups, dtype) if needs else ""
    reference_id = reference_key(fingerprint, text_fingerprint(texts.evaluation_text), texts.evaluation_windowing,
                                 dtype)
    reference = store.get_record(ReferenceRecord, reference_id)
    if reference is None:
        return NoEstimate(NO_SWEEP)
    points = store.sensitivity_points(sweep_key(fingerprint, method, factorization_key(fingerprint, method,
                                                                                      calibration_id, dtype),
                                                reference_id))
    if not points:
        return NoEstimate(NO_SWEEP)
    mlp_points = (store.sensitivity_points(mlp_sweep_id_for(fingerprint, method, texts, settings, dtype))
                  if shapes.mlps else [])

    evaluations = []
    storage = DuckDBStudyStorage(store)
    for record in storage.list_studies():
        if record.model_fingerprint != fingerprint or record.settings.get("method") != method \
                or record.settings.get("version", 1) < 2:
            continue  # another model or method, or scored with RankScope 0.1.0's KL estimate
        try:
            if TextSettings.from_dict(record.settings.get("texts")) != texts:
                continue
        except RankScopeError:
            continue
        results = storage.results(record.study_id)
        if results:  # without re-measured results its trials cannot be put on the evaluation windows
            evaluations += study_evaluations(record.study_id, record.settings, storage.trials(record.study_id), results)
    evaluation = {"text_fingerprint": reference.text_fingerprint, "window_len": reference.window_len,
                  "n_windows": reference.n_windows}
    for label, plan in plans:
        if plan.get("channels"):
            plan = {**plan, "pruning": PruningSettings.from_dict(plan.get("pruning")).to_dict()}
        found = plan_evaluation(plan, label, fingerprint, method, evaluation, calibration if needs else None)
        if found is not None:
            evaluations.append(found)
    return QualityEstimator(shapes, method, reference.perplexity, points, mlp_points, evaluations, settings.to_dict())

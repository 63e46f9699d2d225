"""The app's long actions as background jobs: calibration, spectra, sweeps and plan evaluation.

Each `start_*` function composes engine calls into one job on the process-wide `JobBoard` and
returns it; the engine writes every result to the store before the job ends, and pages read the
store. Every use of the model holds its `ModelGuard`. Job ids are plain strings
`<model>/<kind>/<scope>/<request>` built from the settings, so the same request from two tabs
joins one job, and a page finds the jobs of its scope with `JobBoard.with_prefix`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from app.jobs import Job
from app.resources import current_database, current_store, get_job_board, get_model_guard, get_session_pool
from app.sessions import SessionKey, SharedModelSession
from app.workspace import Workspace
from engine.compression.plan import RankPlan
from engine.compression.sweep import sweep_by_layer, sweep_by_type
from engine.hashing import sha256_json
from engine.models.loading import LoadedModel
from engine.workspace import ensure_calibration, ensure_spectra


def _digest(*parts) -> str:
    return sha256_json([repr(part) for part in parts])[:16]


def model_scope(loaded: LoadedModel) -> str:
    """The id prefix of every job on this model."""
    return f"{loaded.fingerprint[:16]}/"


def calibration_scope(workspace: Workspace, loaded: LoadedModel) -> str:
    return f"{model_scope(loaded)}calibration/{_digest(workspace.calibration_text, workspace.calibration_windowing, workspace.n_groups)}/"


def spectra_scope(workspace: Workspace, loaded: LoadedModel, covariance: str) -> str:
    return (f"{model_scope(loaded)}spectra/"
            f"{_digest(workspace.calibration_text, workspace.calibration_windowing, workspace.n_groups, covariance)}/")


def session_scope(kind: str, workspace: Workspace, loaded: LoadedModel, method: str) -> str:
    return f"{model_scope(loaded)}{kind}/{_digest(method, workspace.text_settings())}/"


def session_key(workspace: Workspace, loaded: LoadedModel, method: str) -> SessionKey:
    return SessionKey(current_database(), loaded.fingerprint, method, workspace.text_settings())


def _session_opener(workspace: Workspace, loaded: LoadedModel, method: str) -> Callable[[Job], SharedModelSession]:
    """A function for the worker thread that opens (or reuses) the session; app resources are looked up here,
    on the script thread, so the worker never touches Streamlit."""
    pool, store, guard = get_session_pool(), current_store(), get_model_guard(loaded.fingerprint)
    key = session_key(workspace, loaded, method)
    return lambda job: pool.open(key, store, loaded, guard, job.report)


def start_calibration(workspace: Workspace, loaded: LoadedModel) -> Job:
    """Calibration statistics for the workspace's calibration text (stored; nothing returned)."""
    store, guard = current_store(), get_model_guard(loaded.fingerprint)

    def work(job: Job) -> None:
        with guard.hold(f"calibrating on '{workspace.calibration_text}'"):
            ensure_calibration(store, loaded, workspace.calibration_text, workspace.calibration_windowing,
                               workspace.n_groups, job.report)

    return get_job_board().start(calibration_scope(workspace, loaded) + "run",
                                 f"Calibration on '{workspace.calibration_text}'", work)


def start_spectra(workspace: Workspace, loaded: LoadedModel, covariance: str) -> Job:
    """Calibration (if not cached) and the weight and feature spectra of every decoder linear."""
    store, guard = current_store(), get_model_guard(loaded.fingerprint)

    def work(job: Job) -> None:
        with guard.hold("computing spectra"):
            calibration = ensure_calibration(store, loaded, workspace.calibration_text,
                                             workspace.calibration_windowing, workspace.n_groups, job.report)
            ensure_spectra(store, loaded, calibration, covariance, job.report)

    return get_job_board().start(spectra_scope(workspace, loaded, covariance) + "run", "Spectra", work)


def start_type_sweep(workspace: Workspace, loaded: LoadedModel, method: str, ratios: Sequence[float],
                     types: Sequence[str]) -> Job:
    """Each type compressed alone in every layer at each ratio; resumes from the stored points."""

    open_session = _session_opener(workspace, loaded, method)

    def work(job: Job) -> int:
        session = open_session(job)
        return len(sweep_by_type(session, list(ratios), list(types), job.report))

    scope = session_scope("sweep", workspace, loaded, method)
    return get_job_board().start(scope + f"type-{_digest(sorted(ratios), list(types))}",
                                 f"Per-type sweep ({method})", work, resumable=True)


def start_layer_sweep(workspace: Workspace, loaded: LoadedModel, method: str, types: Sequence[str],
                      ratio: float) -> Job:
    """For each type, each layer alone compressed at `ratio`; resumes from the stored points."""

    open_session = _session_opener(workspace, loaded, method)

    def work(job: Job) -> int:
        session = open_session(job)
        return sum(len(sweep_by_layer(session, linear_type, ratio, progress=job.report)) for linear_type in types)

    scope = session_scope("sweep", workspace, loaded, method)
    return get_job_board().start(scope + f"layer-{_digest(list(types), ratio)}", f"Per-layer sweep ({method})", work,
                                 resumable=True)


@dataclass(frozen=True)
class AppliedPlan:
    """An evaluated plan and the original model's quality on the same evaluation set."""

    plan: RankPlan
    original: dict


def start_apply(workspace: Workspace, loaded: LoadedModel, method: str, ranks: Mapping[str, Optional[int]],
                grouping: Optional[dict]) -> Job:
    """Evaluate a rank plan (perplexity and both KLs) against the original model."""

    open_session = _session_opener(workspace, loaded, method)

    def work(job: Job) -> AppliedPlan:
        session = open_session(job)
        plan = session.plan(ranks, grouping=grouping)
        return AppliedPlan(session.evaluate(plan, job.report), session.original_quality())

    scope = session_scope("apply", workspace, loaded, method)
    return get_job_board().start(scope + _digest(sorted(ranks.items(), key=str), grouping),
                                 f"Evaluating the plan ({method})", work)

"""Reading studies back: warm-start ratios from a plan or study, summaries, and a trial as a plan."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Optional

from engine.compression.grouping import Grouping
from engine.compression.plan import RankPlan
from engine.compression.units import ModelShapes
from engine.errors import RankScopeError
from engine.progress import ProgressCallback
from engine.search.records import (
    SELECTION, StudyRecord, StudyState, StudyStorage, TrialKind, TrialRecord, is_interrupted,
)
from engine.search.baselines import skipped_baselines
from engine.search.settings import StudySettings

if TYPE_CHECKING:
    from engine.compression.session import CompressionSession


def ratios_from_ranks(shapes: ModelShapes, method: str, grouping: Grouping, ranks: dict) -> dict[str, float]:
    """Each group's achieved parameter reduction under `ranks`: a warm start for that grouping."""
    ratios = {}
    for name, units in grouping.groups(shapes, method).items():
        dense = sum(u.dense_params for u in units)
        kept = sum(u.params(ranks.get(u.paths[0])) for u in units)
        ratios[name] = max(0.0, 1.0 - kept / dense)
    return ratios


def warm_start_from_plan(plan: RankPlan, shapes: ModelShapes, method: str, grouping: Grouping,
                         mlp: str = "low-rank") -> dict[str, float]:
    """Group ratios from a saved plan; a plan for another model is refused (PlanError). With `mlp="prune"`, the
    attention groups' ratios and each `mlp-prune` group's share of channels the plan removes (0 where the plan
    does not prune: its low-rank MLPs have no counterpart in such a study)."""
    plan.validate_for(shapes)
    if mlp == "prune":
        return trial_values(shapes, method, grouping, plan.ranks, plan.channels, mlp)
    return grouping.fit(shapes, method, ratios_from_ranks(shapes, method, grouping, plan.ranks))


def trial_values(shapes: ModelShapes, method: str, grouping: Grouping, ranks: dict, channels: Optional[dict],
                 mlp: str = "low-rank") -> dict[str, float]:
    """A trial's (or plan's) achieved values in a study's coordinates (groups; a curve's knots, fitted) and MLP form."""
    if mlp == "prune":
        from engine.search.baselines import achieved_values

        return achieved_values(shapes, method, grouping, ranks, channels or {})
    return grouping.fit(shapes, method, ratios_from_ranks(shapes, method, grouping, ranks))


def best_trial(storage: StudyStorage, study_id: str) -> Optional[TrialRecord]:
    """The study's choice: the best plan of its final selection (the best few re-measured on every candidate
    window, an informed baseline among them possibly) once it has one, else the trial with the lowest validation
    objective."""
    trials = storage.trials(study_id)
    searched = [t for t in trials if t.kind != TrialKind.BASELINE]
    if not searched:
        return None
    selection = storage.results(study_id).get(SELECTION)
    if selection:
        chosen = min(selection["candidates"], key=lambda c: c["objective"])["number"]
        return next(t for t in trials if t.number == chosen)
    return min(searched, key=lambda t: t.objective)


def is_complete(storage: StudyStorage, record: StudyRecord) -> bool:
    """Finished, with all its trials and its best plan re-measured on the full evaluation text: resuming adds nothing."""
    if record.state != StudyState.FINISHED:
        return False
    told = [t for t in storage.trials(record.study_id) if t.kind != TrialKind.BASELINE]
    return len(told) >= record.settings["n_trials"] and "best" in storage.results(record.study_id)


def resume_command(study_id: str) -> str:
    return f"rankscope search resume --study {study_id}"


def study_summary(storage: StudyStorage, study_id: str) -> dict:
    """State, counts, best trial, baselines, and full-text re-measurements of one study."""
    record = storage.get_study(study_id)
    if record is None:
        raise RankScopeError(f"No study with id '{study_id}'. `rankscope search status` lists the studies.")
    trials = storage.trials(study_id)
    results = storage.results(study_id)
    best = best_trial(storage, study_id)

    def brief(t: TrialRecord) -> dict:
        return {"number": t.number, "kind": t.kind.value, "label": t.label, "objective": t.objective,
                "perplexity": t.perplexity, "kl_forward": t.kl_forward, "kl_reverse": t.kl_reverse,
                "decoder_params": t.decoder_params, "total_params": t.total_params, "projected": t.projected,
                "seconds": t.seconds}

    searched = [t for t in trials if t.kind != TrialKind.BASELINE]
    return {
        "study_id": study_id,
        "name": record.name,
        "state": "interrupted" if is_interrupted(record) else record.state.value,
        "message": record.message,
        "owner": record.owner,
        "resume": None if is_complete(storage, record) else resume_command(study_id),
        "settings": record.settings,
        "validation": None if record.validation is None else
        {k: record.validation[k] for k in ("kind", "windows", "reason") if k in record.validation},
        "trials_done": len(searched),
        "trials_planned": record.settings["n_trials"],
        "best": None if best is None else brief(best),
        "baselines": [brief(t) for t in trials if t.kind == TrialKind.BASELINE],
        **({"skipped_baselines": skipped} if (skipped := skipped_baselines(record.settings)) else {}),
        # label -> the plan re-measured on the full evaluation windows; the final selection is kept apart
        "full_text": {label: result for label, result in results.items() if label != SELECTION},
        "selection": results.get(SELECTION),
        "mean_trial_seconds": sum(t.seconds for t in searched) / len(searched) if searched else None,
    }


def trial_plan_grouping(settings: Mapping, trial: TrialRecord) -> dict:
    """The `grouping` section of a plan made from a trial: the study's grouping, the trial's values, the budget."""
    grouping = Grouping.parse(settings["grouping"], settings.get("search_v", False))
    section = {**grouping.to_dict(), "values": dict(trial.projected), "budget": settings["budget"]}
    return {**section, "mlp": "prune"} if settings.get("mlp") == "prune" else section


def trial_plan(storage: StudyStorage, study_id: str, open_session: Callable[[StudySettings], "CompressionSession"],
               number: Optional[int] = None, progress: Optional[ProgressCallback] = None
               ) -> tuple[TrialRecord, RankPlan]:
    """A study's best trial (or trial `number`) and its rank plan, with metrics on the full evaluation text.

    The study's own re-measurement is used when it has one for that trial; otherwise (a study still
    running, stopped early, or another trial) the plan is evaluated now. `open_session(settings)`
    opens the session of the study's model, method and texts; it is called only once the study and
    the trial are known to exist.
    """
    record = storage.get_study(study_id)
    if record is None:
        raise RankScopeError(f"No study with id '{study_id}'. `rankscope search status` lists the studies.")
    settings = StudySettings.from_dict(record.settings)
    chosen = best_trial(storage, study_id) if number is None else \
        next((t for t in storage.trials(study_id) if t.number == number), None)
    if chosen is None:
        raise RankScopeError(f"Study '{study_id}' has no trial {'yet' if number is None else number}.")
    session = open_session(settings)
    full = storage.results(study_id).get("best")
    pruning = settings.pruning if chosen.channels else None
    metrics = full if full and full.get("trial") == chosen.number else \
        (session.evaluate_ranks(chosen.ranks, progress, channels=chosen.channels, pruning=pruning) if chosen.channels
         else session.evaluate_ranks(chosen.ranks, progress)).to_dict()
    plan = session.plan(chosen.ranks, grouping=trial_plan_grouping(record.settings, chosen), seed=settings.seed,
                        study_id=study_id, channels=chosen.channels, pruning=pruning)
    return chosen, plan.with_metrics({k: metrics[k] for k in ("perplexity", "kl_forward", "kl_reverse", "tokens")})

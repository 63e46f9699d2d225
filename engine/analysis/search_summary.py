"""Search studies shaped for display: trial tables, the best-so-far curve, group values, re-measurements.

Trials come from a `StudyStorage` (`storage.trials(study_id)`), in trial-number order. *Told*
trials (searched and warm start) are the optimiser's; baselines (uniform, LoRD, greedy) are
evaluated on the same validation windows for comparison but never told. A non-finite objective
(perplexity overflowed) is shown as missing, never plotted as infinity.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from engine.compression.grouping import Grouping
from engine.compression.units import ModelShapes
from engine.search.records import StudyRecord, StudyState, TrialKind, TrialRecord
from engine.search.summary import ratios_from_ranks, trial_values

KIND_LABELS = {TrialKind.SEARCH.value: "search", TrialKind.WARM_START.value: "warm start", TrialKind.PRIOR.value: "prior",
               TrialKind.BASELINE.value: "baseline"}
INTERRUPTED = "interrupted"  # stored as running, but nothing in this process runs it (the app was restarted)


def _finite(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def _told(trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    return sorted((t for t in trials if t.kind != TrialKind.BASELINE), key=lambda t: t.number)


def achieved_ratios(trials: Sequence[TrialRecord], shapes: ModelShapes, method: str,
                    grouping: Grouping, mlp: str = "low-rank") -> dict[int, dict[str, float]]:
    """Trial number -> each group's achieved share of parameters removed under the study's grouping.

    Baselines have their own grouping (uniform compresses v too); measured on the study's groups,
    every trial sits on the same axes. A study that prunes MLPs (`mlp="prune"`) has attention groups and
    `mlp-prune` groups (the share of channels removed); a curve study has its knots (fitted to the layers).
    """
    return {t.number: trial_values(shapes, method, grouping, t.ranks, t.channels, mlp) for t in trials}


def best_so_far_rows(trials: Sequence[TrialRecord]) -> list[dict]:
    """One row per told trial in the order run: its objective and the lowest objective up to it."""
    rows, best = [], None
    for order, trial in enumerate(_told(trials), start=1):
        objective = _finite(trial.objective)
        if objective is not None:
            best = objective if best is None else min(best, objective)
        rows.append({"trial": order, "number": trial.number, "label": trial.label, "kind": KIND_LABELS[trial.kind.value],
                     "objective": objective, "best_so_far": best})
    return rows


def trial_rows(trials: Sequence[TrialRecord], ratios: Optional[Mapping[int, Mapping[str, float]]] = None) -> list[dict]:
    """One row per trial: kind, metrics, parameters, time, and (with `ratios`) one column per group."""
    best = {row["number"]: row["best_so_far"] for row in best_so_far_rows(trials)}
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        row = {"number": trial.number, "label": trial.label, "kind": KIND_LABELS[trial.kind.value],
               "objective": _finite(trial.objective), "best_so_far": best.get(trial.number),
               "perplexity": _finite(trial.perplexity), "kl_forward": _finite(trial.kl_forward),
               "kl_reverse": _finite(trial.kl_reverse), "decoder_params": trial.decoder_params,
               "total_params": trial.total_params, "seconds": trial.seconds}
        if ratios is not None:
            row.update(ratios.get(trial.number, {}))
        rows.append(row)
    return rows


def baseline_marks(trials: Sequence[TrialRecord]) -> list[dict]:
    """Where to label the baselines: one mark per distinct result, naming every baseline that has it.

    Baselines that are the same plan (LoRD equals uniform when the study already keeps v dense and
    the budget leaves q/k no room) give identical numbers; one label `uniform = lord` keeps them legible.
    """
    marks: dict[tuple, list[str]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.kind == TrialKind.BASELINE and _finite(t.objective) is not None:
            marks.setdefault((t.objective, t.perplexity, t.decoder_params), []).append(t.label)
    return [{"objective": objective, "perplexity": perplexity, "decoder_params": params, "label": " = ".join(labels)}
            for (objective, perplexity, params), labels in marks.items()]


def full_text_rows(results: Mapping[str, dict], trials: Sequence[TrialRecord]) -> list[dict]:
    """The re-measurements on the full evaluation text: best first, then the baselines in the order run.

    `perplexity_vs_best` is each plan's perplexity relative to the best plan's (0.05 = 5% higher).
    """
    labels = ["best"] + [t.label for t in sorted(trials, key=lambda t: t.number) if t.kind == TrialKind.BASELINE]
    best = results.get("best", {}).get("perplexity")
    rows = []
    for label in labels:
        if label not in results:
            continue
        r = results[label]
        rows.append({"plan": label, "trial": r.get("trial"), "perplexity": r["perplexity"],
                     "kl_forward": r["kl_forward"], "kl_reverse": r["kl_reverse"],
                     "decoder_params": r.get("decoder_params"), "total_params": r.get("total_params"),
                     "perplexity_vs_best": None if not best else r["perplexity"] / best - 1.0})
    return rows


def selection_rows(selection: Optional[Mapping]) -> list[dict]:
    """The final selection (`engine.search.runner.StudyRunner._select`), the study's choice first: each finalist's
    validation objective and its objective and metrics on every candidate window."""
    if not selection:
        return []
    rows = [{"trial": c["number"], "validation objective": c["validation_objective"],
             f"objective ({selection['windows']} windows)": c["objective"], "perplexity": c["perplexity"],
             "kl_forward": c["kl_forward"], "kl_reverse": c["kl_reverse"]} for c in selection["candidates"]]
    key = f"objective ({selection['windows']} windows)"
    return sorted(rows, key=lambda r: r[key])


def study_state(record: StudyRecord, running_here: bool) -> str:
    """The state to show: the stored one, or `interrupted` for a study stored as running that nothing runs."""
    if record.state == StudyState.RUNNING and not running_here:
        return INTERRUPTED
    return record.state.value


def study_rows(summaries: Sequence[dict], running_ids: set[str]) -> list[dict]:
    """One row per stored study (from `study_summary`): settings, progress, and its best numbers so far."""
    rows = []
    for s in summaries:
        settings, best, full = s["settings"], s["best"], s["full_text"].get("best")
        state = s["state"]
        if state == StudyState.RUNNING.value and s["study_id"] not in running_ids:
            state = INTERRUPTED
        rows.append({
            "study": s["study_id"], "state": state, "method": settings["method"], "grouping": settings["grouping"],
            "budget": settings["budget"], "trials": f"{s['trials_done']}/{s['trials_planned']}",
            "best_objective": None if best is None else _finite(best["objective"]),
            "best_perplexity": None if full is None else full["perplexity"],
        })
    return rows

"""Recovery runs shaped for display: quality before and after, parameters, the training curve, the run's cost.

Everything here reads plain values: a run's result dict (`RecoveryOutcome.result`, which the store
keeps as `RecoveryRecord.result_json`: `before`/`after` quality on the plan's evaluation set,
`validation` on held-out windows of the training text, `history` per step, `parameters` before and
after), the steps a live run has reported so far (dicts with the keys of a `history` entry), and the
record's counts. So this module needs neither torch nor `engine.recovery`, and a page only draws.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from engine.metric_definitions import metric_labels
from engine.records import RecoveryRecord

GIB = 2 ** 30
QUALITY_KEYS = ("perplexity", "kl_forward", "kl_reverse")
VALIDATION_LABEL = "Perplexity (held-out training text)"
PARAMETER_SCOPES = (("decoder_linear", "decoder linears"), ("total", "whole model"))


def _change(before: Optional[float], after: Optional[float]) -> Optional[float]:
    """After relative to before (-0.05: 5% lower), or None when either is missing or before is 0."""
    if before is None or after is None or not before:
        return None
    return after / before - 1.0


def _text_name(text: Optional[str]) -> str:
    return "?" if not text else str(text)


def quality_rows(result: Mapping[str, Any], evaluation: Optional[Mapping[str, Any]] = None) -> list[dict]:
    """Perplexity and both KLs on the evaluation set, and perplexity on the held-out training windows, before and
    after the run; `change` is after relative to before. `evaluation` is the plan's evaluation section (for the
    text's name and window count)."""
    labels = metric_labels()
    evaluation = dict(evaluation or {})
    on = f"'{_text_name(evaluation.get('text'))}'"
    if evaluation.get("n_windows"):
        on += f", {evaluation['n_windows']} windows"
    before, after = result.get("before") or {}, result.get("after") or {}
    rows = [{"measure": labels[key], "on": on, "before": before.get(key), "after": after.get(key),
             "change": _change(before.get(key), after.get(key))} for key in QUALITY_KEYS]
    validation = result.get("validation") or {}
    rows.append({"measure": VALIDATION_LABEL,
                 "on": f"'{_text_name(validation.get('text'))}', {validation.get('n_windows', '?')} held-out windows",
                 "before": validation.get("before"), "after": validation.get("after"),
                 "change": _change(validation.get("before"), validation.get("after"))})
    return rows


def parameter_rows(result: Mapping[str, Any]) -> list[dict]:
    """Parameters of the decoder linears and of the whole model, dense, before and after the run, with the share
    removed each time (a basis run that prunes removes more; the others keep the plan's count)."""
    sections = result.get("parameters") or {}
    before, after = sections.get("before") or {}, sections.get("after") or {}
    rows = []
    for key, label in PARAMETER_SCOPES:
        b, a = before.get(key) or {}, after.get(key) or {}
        rows.append({"parameters": label, "dense": b.get("dense", a.get("dense")), "before": b.get("compressed"),
                     "after": a.get("compressed"), "removed_before": b.get("reduction"),
                     "removed_after": a.get("reduction")})
    return rows


def history_rows(history: Iterable[Mapping[str, Any]], validation_before: Optional[float] = None) -> list[dict]:
    """One row per training step (step, loss, validation perplexity where measured, kept directions for basis),
    ordered by step; `validation_before` (measured before the first step) adds a step-0 row without a loss."""
    rows = [{"step": 0, "loss": None, "validation_perplexity": validation_before, "ranks_total": None}] \
        if validation_before is not None else []
    by_step = {int(entry["step"]): entry for entry in history}  # a resumed run may report a step again
    rows += [{"step": step, "loss": entry.get("loss"), "validation_perplexity": entry.get("validation_perplexity"),
              "ranks_total": entry.get("ranks_total")} for step, entry in sorted(by_step.items())]
    return rows


def loss_points(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """The rows of `history_rows` that have a loss (a line of the training loss per step)."""
    return [{"step": r["step"], "loss": r["loss"]} for r in rows if r.get("loss") is not None]


def validation_points(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """The rows of `history_rows` where validation perplexity was measured (every eval_every steps, and the last)."""
    return [{"step": r["step"], "validation_perplexity": r["validation_perplexity"]} for r in rows
            if r.get("validation_perplexity") is not None]


def run_overview(record: RecoveryRecord, result: Mapping[str, Any]) -> dict:
    """The run's cost and where it came from: steps, tokens trained on, training seconds, peak memory of the
    process (GiB), the step it resumed from (0: it ran in one go) and the directions kept (basis)."""
    history = result.get("history") or []
    kept = next((entry.get("ranks_total") for entry in reversed(history) if entry.get("ranks_total") is not None), None)
    return {"run_id": record.run_id, "kind": record.kind, "steps": record.steps, "tokens": record.tokens,
            "seconds": record.seconds, "peak_memory_gib": record.peak_rss_bytes / GIB,
            "resumed_from": int(result.get("resumed_from") or 0), "directions_kept": kept}

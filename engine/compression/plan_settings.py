"""The settings a plan reproduces with: its own method, calibration and evaluation, checked before any work.

A plan records the method it was factorised with, the calibration (text, its fingerprint, windows,
window length, groups) and the evaluation set its metrics were measured on. Every command that
takes a plan (the CLI's `compress`, `evaluate`, `export`, a search's warm start, and the app's
Export page) asks `plan_settings` what to run with:

- by default, exactly what the plan records, so a plan found in the browser reproduces in a script;
- a calibration setting or method given explicitly that contradicts the plan is refused (`PlanError`
  naming both values and how to proceed): other factors would make another model than the plan's;
- another evaluation set is allowed (measuring a plan on another text is meaningful) and reported
  as a note, so the output says the numbers are not the plan's recorded ones;
- a plan that only seeds a search (`transfer=True`: a warm start) may also be given another method
  or calibration, since carrying an allocation over to other settings is the point; that is noted too;
- each text is located by its recorded fingerprint: a given text counts as the plan's when its
  content has the plan's fingerprint (a moved file is fine), and a plan whose text file is missing
  or changed is refused with the fingerprint and the path it expected.

Everything here is cheap (text fingerprints hash a file; no model is loaded), so a contradiction is
reported in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from engine.compression.plan import PlanError, RankPlan
from engine.errors import CorpusError
from engine.texts.corpus import text_fingerprint
from engine.texts.settings import TextSettings

# option names a front end shows for each setting, used in messages
CALIBRATION_OPTIONS = {"text": "--calibration-text", "n_windows": "--calibration-windows",
                       "window_len": "--window-len", "n_groups": "--groups"}
EVALUATION_OPTIONS = {"text": "--eval-text", "n_windows": "--eval-windows", "window_len": "--window-len"}


@dataclass(frozen=True)
class PlanSettings:
    """What to run a plan with, and how that departs from what the plan recorded (for the output)."""

    method: str
    texts: TextSettings
    notes: tuple[str, ...] = ()  # departures from the plan's record, to show with the results


def plan_settings(
    plan: RankPlan,
    base: TextSettings = TextSettings(),
    method: Optional[str] = None,
    calibration: Optional[Mapping[str, Any]] = None,
    evaluation: Optional[Mapping[str, Any]] = None,
    transfer: bool = False,
) -> PlanSettings:
    """The method and texts to run `plan` with.

    `base` fills what the plan does not record (a hand-written plan without sections). `method`,
    `calibration` and `evaluation` are what the user gave explicitly, in the keys of
    `TextSettings.calibration_dict()`/`evaluation_dict()` (`text`, `n_windows`, `window_len`,
    `n_groups`); None or missing keys mean "not given". Raises `PlanError` for a contradiction, unless
    `transfer` (the plan seeds a search on other settings): then the given method and calibration are
    used and a note says how they differ from the plan's.
    """
    calibration, evaluation = dict(calibration or {}), dict(evaluation or {})
    notes: list[str] = []
    if transfer:
        return _transferred(plan, base, method, calibration, evaluation, notes)
    if method is not None and method != plan.method:
        raise PlanError(
            f"The plan was made with method '{plan.method}'; --method {method} contradicts it. Leave --method out to "
            f"use the plan's method, or make a plan for {method} (rankscope compress --method {method} ...)."
        )
    calibration_section = base.calibration_dict()
    if plan.calibration is None:
        calibration_section.update(calibration)
        if calibration:
            notes.append(f"The plan's method ({plan.method}) uses no calibration: calibration options have no effect.")
    else:
        calibration_section = _calibration(plan.calibration, calibration)
    evaluation_section = _evaluation(plan.evaluation, evaluation, base, notes)
    texts = base.with_sections(calibration=calibration_section, evaluation=evaluation_section)
    return PlanSettings(plan.method, texts, tuple(notes))


def _transferred(plan: RankPlan, base: TextSettings, method: Optional[str], calibration: dict, evaluation: dict,
                 notes: list[str]) -> PlanSettings:
    """The plan's settings where nothing is given, the given ones where they differ (each difference noted)."""
    if method is not None and method != plan.method:
        notes.append(f"The plan was made with {plan.method}; it seeds a {method} study.")
    recorded = plan.calibration
    if recorded is None:
        section = {**base.calibration_dict(), **calibration}
    else:
        section = {key: recorded.get(key) for key in CALIBRATION_OPTIONS}
        section.update({k: v for k, v in calibration.items() if k != "text"})
        given_text = calibration.get("text")
        same_text = given_text is None or text_fingerprint(given_text) == recorded.get("text_fingerprint")
        section["text"] = _located_text(recorded, given_text, "calibration", CALIBRATION_OPTIONS["text"]) \
            if same_text else given_text
        if not same_text or any(section[k] != recorded.get(k) for k in ("n_windows", "window_len", "n_groups")):
            notes.append(
                f"The plan was calibrated on '{recorded.get('text')}' ({recorded.get('n_windows')} windows of "
                f"{recorded.get('window_len')} tokens, {recorded.get('n_groups')} groups); the study calibrates on "
                f"'{section['text']}' ({section['n_windows']} windows of {section['window_len']} tokens, "
                f"{section['n_groups']} groups)."
            )
    evaluation_section = _evaluation(plan.evaluation, evaluation, base, notes)
    texts = base.with_sections(calibration=section, evaluation=evaluation_section)
    return PlanSettings(method or plan.method, texts, tuple(notes))


def _calibration(recorded: Mapping[str, Any], given: Mapping[str, Any]) -> dict:
    """The plan's calibration, with a given text accepted only when its content is the plan's."""
    section = {key: recorded.get(key) for key in CALIBRATION_OPTIONS}
    differing = [key for key in ("n_windows", "window_len", "n_groups")
                 if given.get(key) is not None and given[key] != recorded.get(key)]
    if differing:
        told = ", ".join(f"{CALIBRATION_OPTIONS[k]} {given[k]} (the plan: {recorded.get(k)})" for k in differing)
        raise PlanError(
            f"The plan's factors were calibrated on '{recorded.get('text')}' with {recorded.get('n_windows')} windows "
            f"of {recorded.get('window_len')} tokens and {recorded.get('n_groups')} groups; {told} contradict it, and "
            "other factors would make another model than the plan's. Leave those options out to use the plan's "
            "calibration, or make a new plan with the calibration you want."
        )
    section["text"] = _located_text(recorded, given.get("text"), "calibration", CALIBRATION_OPTIONS["text"])
    return section


def _evaluation(recorded: Optional[Mapping[str, Any]], given: Mapping[str, Any], base: TextSettings,
                notes: list[str]) -> dict:
    """The plan's evaluation set unless another is given (then a note says so)."""
    if recorded is None:
        return {**base.evaluation_dict(), **{k: v for k, v in given.items() if v is not None}}
    section = {key: recorded.get(key) for key in EVALUATION_OPTIONS}
    changed = {k: v for k, v in given.items() if v is not None and k != "text" and v != recorded.get(k)}
    text = given.get("text")
    other_text = text is not None and text_fingerprint(text) != recorded.get("text_fingerprint")
    if other_text:
        section["text"] = text
    else:
        section["text"] = _located_text(recorded, text, "evaluation", EVALUATION_OPTIONS["text"])
    section.update(changed)
    if other_text or changed:
        notes.append(
            f"Evaluated on '{section['text']}', {section['n_windows']} windows of {section['window_len']} tokens; the "
            f"plan's metrics were measured on '{recorded.get('text')}', {recorded.get('n_windows')} windows of "
            f"{recorded.get('window_len')} tokens."
        )
    return section


def _located_text(recorded: Mapping[str, Any], given: Optional[str], role: str, option: str) -> str:
    """The text to read for a plan's `role` text: the given one or the recorded one, with the recorded content."""
    expected = recorded.get("text_fingerprint")
    source = given if given is not None else recorded.get("text")
    if expected is None:  # a hand-written plan without fingerprints: nothing to check against
        return source
    try:
        found = text_fingerprint(source)
    except CorpusError as exc:
        found, problem = None, f"cannot be read ({exc})"
    else:
        problem = f"has other content (fingerprint {found[:12]})"
    if found == expected:
        return source
    raise PlanError(
        f"The plan's {role} text is '{recorded.get('text')}' with fingerprint {expected[:12]}, but '{source}' "
        f"{problem}. Put the original text back at that path, or give {option} with a file whose content is the "
        "plan's (same fingerprint)."
    )

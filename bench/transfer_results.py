"""Plan transfer on the default model, written to docs/transfer-results.md.

Question (issue 4, Build item 5): a rank plan found for one budget, or with one calibration text,
is re-used as the warm start of a short study on another. How close is it to the best plan known
for the target, before the short search and after it?

Target: feature-pca, 5x1, 20% decoder-linear budget, calibration 128 x 512 tokens of War and Peace:
the setting of `goals-5x1-s0` (50 trials of the `trust` search, from bench/search_goals.py, with its
validation settings), whose best plan is the reference ("best known"). Sources, 25 trials each:
1. the same setting at a 30% budget (the plan is projected down onto 20% when it is re-used);
2. the same setting calibrated on 128 x 512 tokens of History of the United States (the plan's
   ranks are re-used with the War and Peace factors).
Each source's best plan seeds a short target study of 15 trials (the warm start and the global
allocation's prior, 3 random points, then 10 trials of expected improvement, local around the incumbent
and global in turn; LoRD and greedy are told as measured). A cold short study with the same settings and
seed and no warm start is the control. Every perplexity is re-measured on the evaluation windows (first 8,192 tokens of Sherlock
Holmes), which no study saw. Closeness is the perplexity excess over the best known plan, and the
mean absolute difference of the projected group ratios from the best known plan's.

Studies are stored in the cache database and resumed if the script is interrupted.
Run: `.venv/bin/python bench/transfer_results.py`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import kl_note, rendered_from_stored, write_json  # noqa: E402
from bench.search_goals import COMMON, SETTINGS, study_name  # noqa: E402
from bench.search_results import full_text_result  # noqa: E402
from engine.compression.grouping import Grouping  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.search.records import StudyState, TrialKind  # noqa: E402
from engine.search.runner import StudyRunner, create_study  # noqa: E402
from engine.search.settings import StudySettings  # noqa: E402
from engine.search.summary import study_summary  # noqa: E402
from engine.search.summary import best_trial, ratios_from_ranks  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.search.duckdb_storage import DuckDBStudyStorage  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "transfer-results.md"
TEXTS = COMMON["texts"]
TARGET = study_name("5x1", 0)
SOURCE_TRIALS = 25
SHORT = dict(grouping="5x1", n_trials=15, n_initial_points=3)
SOURCES = {
    "budget": ("transfer-source-budget30", dict(grouping="5x1", n_trials=SOURCE_TRIALS, budget=0.3),
               "30% budget, War and Peace calibration"),
    "calibration": ("transfer-source-us-history",
                    dict(grouping="5x1", n_trials=SOURCE_TRIALS,
                         texts=replace(TEXTS, calibration_text="us-history")),
                    "20% budget, History of the United States calibration"),
}
COLD = "transfer-cold-15"


def run_study(storage, session, name: str, overrides: dict) -> dict:
    """Create (bench/search_goals.py's settings, seed 0, with `overrides`) or resume, then summarise."""
    if storage.get_study(name) is None:
        settings = StudySettings(**{**COMMON, "seed": 0, **overrides})
        create_study(storage, session, settings, name=name)
    if storage.get_study(name).state != StudyState.FINISHED:
        StudyRunner(storage, session, name, progress=TerminalProgress()).run()
    return study_summary(storage, name)


GROUPS = ("qk", "o", "gate", "up", "down")  # 5x1 with v dense


def ratio_distance(a: dict, b: dict) -> float:
    """Mean absolute difference of two plans' projected group ratios (a dense group may be absent: ratio 0)."""
    return sum(abs(a.get(g, 0.0) - b.get(g, 0.0)) for g in GROUPS) / len(GROUPS)


def main() -> None:
    store = open_store()
    storage = DuckDBStudyStorage(store)
    loaded = load_model("smollm2-135m", store, TerminalProgress())
    target = CompressionSession.open(store, loaded, "feature-pca", TEXTS, TerminalProgress())
    run_study(storage, target, TARGET, SETTINGS["5x1"])
    reference = best_trial(storage, TARGET)
    reference_full = full_text_result(storage, target, TARGET, "best", reference)
    cold = run_study(storage, target, COLD, SHORT)

    transfers = {}
    for kind, (source, overrides, description) in SOURCES.items():
        texts = overrides.get("texts", TEXTS)
        record = storage.get_study(source)
        finished = record is not None and record.state == StudyState.FINISHED
        # a finished study is only read back, so its calibration is not loaded again
        source_session = target if texts == TEXTS or finished else CompressionSession.open(
            store, loaded, "feature-pca", texts, TerminalProgress())
        source_summary = run_study(storage, source_session, source, overrides)
        del source_session
        plan = best_trial(storage, source)
        warm = f"transfer-warm-{kind}"
        ratios = ratios_from_ranks(target.shapes, "feature-pca", Grouping.parse("5x1", False), plan.ranks)
        warm_summary = run_study(storage, target, warm, {**SHORT, "warm_start": ratios})
        start = next(t for t in storage.trials(warm) if t.kind == TrialKind.WARM_START)
        before = full_text_result(storage, target, warm, "warm start", start)
        after_trial = best_trial(storage, warm)
        transfers[kind] = {
            "description": description, "source": source_summary, "warm": warm_summary,
            "source_ratios": plan.projected,
            "before": {**before, "projected": start.projected, "objective": start.objective,
                       "ratio_distance": ratio_distance(start.projected, reference.projected)},
            "after": {**storage.results(warm)["best"], "projected": after_trial.projected,
                      "objective": after_trial.objective,
                      "from_warm_start": after_trial.number == start.number,
                      "ratio_distance": ratio_distance(after_trial.projected, reference.projected)},
        }
    cold_best = best_trial(storage, COLD)
    payload = {
        "original": target.original_quality(),
        "reference": {**reference_full, "study": TARGET, "projected": reference.projected},
        "target_baselines": {k: v for k, v in storage.results(TARGET).items() if k in ("uniform", "lord", "greedy")},
        "cold": {**storage.results(COLD)["best"], "study": COLD, "projected": cold_best.projected,
                 "objective": cold_best.objective,
                 "ratio_distance": ratio_distance(cold_best.projected, reference.projected),
                 "mean_trial_seconds": cold["mean_trial_seconds"]},
        "transfers": transfers,
    }
    path = write_json("transfer_results", payload)
    DOC.write_text(render(json.loads(path.read_text())))  # the written file carries the environment too
    print(f"wrote {DOC} and {path}")


def _excess(r: dict, reference: dict) -> str:
    return f"{r['perplexity'] / reference['perplexity'] - 1:+.1%}"


def render(p: dict) -> str:
    ref, base = p["reference"], p["target_baselines"]
    env = p["environment"]
    lines = [
        "# Plan transfer on the default model",
        "",
        "Generated by `.venv/bin/python bench/transfer_results.py` (do not edit by hand; rerun it).",
        f"Measured {env['measured_at'][:16]} UTC, RankScope {env['engine_version']}, {env['threads']} torch threads.",
        "",
        "A plan found on one budget or calibration text seeds a short study (15 trials: the plan itself, the global "
        "allocation's prior, 3 random points, 10 trials of expected improvement; LoRD and greedy told as measured) "
        "on the target: SmolLM2-135M, feature-pca with War and Peace calibration, 5x1 grouping, "
        "remove 20% of decoder-linear parameters, v dense. *Best known* is the best plan of the 50-trial study "
        f"`{ref['study']}`. Perplexities are on the evaluation windows (first 8,192 tokens of Sherlock Holmes), "
        "which no study saw; *excess* is the perplexity above the best known plan; *ratio distance* is the mean "
        f"absolute difference of the five projected group ratios from the best known plan's. {kl_note(env)}",
        "",
        f"Target references: original {p['original']['perplexity']:.3f}, best known {ref['perplexity']:.3f}, "
        + ", ".join(f"{k} {v['perplexity']:.3f}" for k, v in base.items()) + ".",
        "",
        "| plan | perplexity | excess over best known | ratio distance | KL(P_comp‖P_orig) |",
        "|---|---|---|---|---|",
        f"| best known (`{ref['study']}`, 50 trials) | {ref['perplexity']:.3f} | +0.0% | 0.000 | {ref['kl_reverse']:.4f} |",
        f"| cold short study (`{p['cold']['study']}`, 15 trials, no warm start) | {p['cold']['perplexity']:.3f} | "
        f"{_excess(p['cold'], ref)} | {p['cold']['ratio_distance']:.3f} | {p['cold']['kl_reverse']:.4f} |",
    ]
    for kind, t in p["transfers"].items():
        lines.append(f"| {kind} transfer, before (the plan from {t['description']}, projected) | "
                     f"{t['before']['perplexity']:.3f} | {_excess(t['before'], ref)} | "
                     f"{t['before']['ratio_distance']:.3f} | {t['before']['kl_reverse']:.4f} |")
        note = " (the warm start stayed best)" if t["after"]["from_warm_start"] else ""
        lines.append(f"| {kind} transfer, after the 15-trial warm study{note} | {t['after']['perplexity']:.3f} | "
                     f"{_excess(t['after'], ref)} | {t['after']['ratio_distance']:.3f} | "
                     f"{t['after']['kl_reverse']:.4f} |")
    lines += ["", "## Reading", ""]
    cold = p["cold"]
    for kind, t in p["transfers"].items():
        before, after = t["before"], t["after"]
        found = ("the short search found nothing better on the validation windows, so the transferred plan stayed "
                 "the study's best" if after["from_warm_start"] else
                 f"the short search improved the validation objective from {before['objective']:.4f} to "
                 f"{after['objective']:.4f} (perplexity {before['perplexity']:.3f} to {after['perplexity']:.3f})")
        versus = "better" if before["objective"] < cold["objective"] else "worse"
        lines.append(f"- {kind.capitalize()} transfer: the plan arrives {_excess(before, ref)} above the best known "
                     f"plan; {found}. Its validation objective ({before['objective']:.4f}) is {versus} than the best "
                     f"of the cold short study ({cold['objective']:.4f}, {_excess(cold, ref)} on the full text).")
    lines += ["", "Validation objective: log PPL + KL(P_comp‖P_orig) on the 4 validation windows (lower is better), "
              "the quantity the studies minimise.", ""]
    groups = GROUPS
    lines += ["", "Projected group ratios:", "", "| plan | " + " | ".join(groups) + " |",
              "|---|" + "---|" * len(groups),
              "| best known | " + " | ".join(f"{ref['projected'].get(g, 0.0):.3f}" for g in groups) + " |",
              "| cold short study | " + " | ".join(f"{p['cold']['projected'].get(g, 0.0):.3f}" for g in groups) + " |"]
    for kind, t in p["transfers"].items():
        lines.append(f"| {kind} source's own best ({t['description']}) | "
                     + " | ".join(f"{t['source_ratios'].get(g, 0.0):.3f}" for g in groups) + " |")
        lines.append(f"| {kind} transfer, before | " + " | ".join(f"{t['before']['projected'].get(g, 0.0):.3f}" for g in groups) + " |")
        lines.append(f"| {kind} transfer, after | " + " | ".join(f"{t['after']['projected'].get(g, 0.0):.3f}" for g in groups) + " |")
    lines += ["", "Sources, each on its own setting (full text):", "",
              "| source | trials | best perplexity | uniform | LoRD |", "|---|---|---|---|---|"]
    for t in p["transfers"].values():
        full = t["source"]["full_text"]
        lines.append(f"| `{t['source']['study_id']}` ({t['description']}) | {t['source']['trials_done']} | "
                     f"{full['best']['perplexity']:.3f} | {full['uniform']['perplexity']:.3f} | "
                     f"{full['lord']['perplexity']:.3f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--render-only" in sys.argv:  # the doc again from the stored JSON, e.g. after a wording change
        rendered_from_stored("transfer_results", render, DOC)
    else:
        main()
